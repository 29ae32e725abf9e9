"""Mask ops: topk_mask, nm_mask, rebuild_mask.

The pure-torch reference is checked on hand-made cases; the native kernels (CPU, and CUDA
wherever a GPU exists) must equal it bit for bit (torch.equal) on random and adversarial
inputs: heavy ties, all-equal rows, -0.0 next to +0.0, +-inf, one column, k = 0 and k = cols,
LLaMA-width rows, non-contiguous inputs and every score dtype.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import devices

from barber import _native, ops
from barber import reference as ref

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
INF = float("inf")


def _scores(kind: str, rows: int, cols: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "randn":
        x = torch.randn(rows, cols, generator=gen)
    elif kind == "ties":  # integer-valued: heavy ties in every dtype
        x = torch.randint(-3, 4, (rows, cols), generator=gen).float()
    elif kind == "equal":  # all equal, half of them -0.0
        x = torch.zeros(rows, cols)
        x[:, 1::2] = -0.0
    elif kind == "inf":
        x = torch.randn(rows, cols, generator=gen)
        x[x > 0.8] = INF
        x[x < -0.8] = -INF
    elif kind == "narrow":  # many float32 keys sharing their high 16 bits
        x = 1.0 + 1e-6 * torch.randint(0, 8, (rows, cols), generator=gen).float()
    else:
        raise ValueError(kind)
    return x.to(dtype).to(device)


def _random_mask(rows: int, cols: int, frac: float, device: str, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(rows, cols, generator=gen) < frac).to(device)


def _beneficial_pairs(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """R per row by the literal rule (sorted values, strict comparison), for invariants."""
    s = scores.float()
    best_pruned = torch.sort(torch.where(mask, -INF, s), dim=1, descending=True).values
    worst_kept = torch.sort(torch.where(mask, s, INF), dim=1).values
    pairs = torch.minimum((~mask).sum(1), mask.sum(1))
    valid = torch.arange(s.shape[1], device=s.device) < pairs[:, None]
    return ((best_pruned > worst_kept) & valid).sum(1)


# --- reference: hand-checked cases ------------------------------------------------------


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _b(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def test_topk_literal(backend: str) -> None:
    x = _t([[3, 1, 2, 3, 0], [1, 1, 1, 1, 1], [-0.0, 0.0, -1, INF, -INF]])
    assert torch.equal(ops.topk_mask(x, 2, backend=backend), _b([[1, 0, 0, 1, 0], [1, 1, 0, 0, 0], [1, 0, 0, 1, 0]]))
    assert torch.equal(ops.topk_mask(x, 0, backend=backend), torch.zeros(3, 5, dtype=torch.bool))
    assert torch.equal(ops.topk_mask(x, 5, backend=backend), torch.ones(3, 5, dtype=torch.bool))
    assert torch.equal(ops.topk_mask(_t([[0.0, -0.0]]), 1, backend=backend), _b([[1, 0]]))  # -0.0 == +0.0: lower column


def test_nm_literal(backend: str) -> None:
    x = _t([[4, 3, 2, 1, 1, 2, 3, 4], [1, 1, 1, 1, -0.0, 0.0, 5, -5]])
    assert torch.equal(ops.nm_mask(x, 2, 4, backend=backend), _b([[1, 1, 0, 0, 0, 0, 1, 1], [1, 1, 0, 0, 1, 0, 1, 0]]))
    assert torch.equal(ops.nm_mask(x, 4, 8, backend=backend), _b([[1, 1, 0, 0, 0, 0, 1, 1], [1, 1, 1, 0, 0, 0, 1, 0]]))
    assert torch.equal(ops.nm_mask(x, 1, 1, backend=backend), torch.ones(2, 8, dtype=torch.bool))
    assert torch.equal(ops.nm_mask(x, 0, 2, backend=backend), torch.zeros(2, 8, dtype=torch.bool))


def test_rebuild_literal(backend: str) -> None:
    # P best-first: 5@0, 3@2, 1@4; K worst-first: 0@5, 2@3, 4@1 -> R = 2 (1 > 4 fails).
    x = _t([[5, 4, 3, 2, 1, 0]])
    mask = _b([[0, 1, 0, 1, 0, 1]])
    assert torch.equal(ops.rebuild_mask(x, mask, 1.0, backend=backend), _b([[1, 1, 1, 0, 0, 0]]))
    assert torch.equal(ops.rebuild_mask(x, mask, 0.5, backend=backend), _b([[1, 1, 0, 1, 0, 0]]))
    assert torch.equal(ops.rebuild_mask(x, mask, 0.49, backend=backend), mask)  # floor(0.98) = 0
    assert torch.equal(ops.rebuild_mask(x, mask, 0.0, backend=backend), mask)
    # Ties at the thresholds: the lower pruned column regrows, the higher kept column drops.
    got = ops.rebuild_mask(_t([[2, 1, 2, 1]]), _b([[0, 1, 0, 1]]), 0.5, backend=backend)
    assert torch.equal(got, _b([[1, 1, 0, 0]]))
    # Equal scores are never beneficial; -0.0 == +0.0.
    ties = _b([[0, 1], [0, 1], [0, 1]])
    assert torch.equal(ops.rebuild_mask(_t([[1, 1], [0.0, -0.0], [-0.0, 0.0]]), ties, 1.0, backend=backend), ties)
    assert torch.equal(ops.rebuild_mask(_t([[INF, -INF]]), _b([[0, 1]]), 1.0, backend=backend), _b([[1, 0]]))


def test_rebuild_nm_literal(backend: str) -> None:
    # P best-first 8@4, 7@5, 4@3, 2@1; K worst-first 1@0, 3@2, 5@7, 6@6 -> R = 2.
    x = _t([[1, 2, 3, 4, 8, 7, 6, 5]])
    mask = _b([[1, 0, 1, 0, 0, 0, 1, 1]])
    # s = 2: both regrow in group 1, which drops its two previously kept entries.
    assert torch.equal(ops.rebuild_mask(x, mask, 1.0, 4, backend=backend), _b([[1, 0, 1, 0, 1, 1, 0, 0]]))
    # s = 1: column 4 regrows; group 1 drops its worst kept entry (5@7).
    assert torch.equal(ops.rebuild_mask(x, mask, 0.5, 4, backend=backend), _b([[1, 0, 1, 0, 1, 0, 1, 0]]))
    # One group spanning the row is the unstructured rebuild.
    whole_row = ops.rebuild_mask(x, mask, 1.0, 8, backend=backend)
    assert torch.equal(whole_row, ops.rebuild_mask(x, mask, 1.0, backend=backend))


# --- errors that need the values (the rest: tests/test_op_errors.py) ---------------------


def _value_error_cases() -> list[tuple[str, tuple, str]]:
    """(id, (op, *args), message regex) of errors only a look at the values finds (no fake sees them)."""
    x = torch.randn(4, 8)
    nan = x.clone()
    nan[1, 3] = float("nan")
    m24 = ref.nm_mask(x, 2, 4)
    not_nm = _b([[1, 1, 0, 0, 1, 0, 0, 0]] * 4)
    one_to_four = (_t([[0, 9, 8, 0.5, 1, 0.1, 0.2, 0.3]]), _b([[1, 0, 0, 0, 1, 0, 0, 0]]))
    return [
        ("topk nan", ("topk_mask", nan, 2), r"barber::topk_mask: scores contain NaN"),
        ("topk nan k=0", ("topk_mask", nan, 0), r"barber::topk_mask: scores contain NaN"),
        ("nm nan", ("nm_mask", nan, 2, 4), r"barber::nm_mask: scores contain NaN"),
        ("rebuild nan", ("rebuild_mask", nan, m24, 0.0), r"barber::rebuild_mask: scores contain NaN"),
        ("rebuild not N:M", ("rebuild_mask", x, not_nm, 0.5, 4), r"rebuild_mask: expected an N:M mask that keeps"),
        ("rebuild overfull", ("rebuild_mask", *one_to_four, 1.0, 4), r"a group of m=4 columns regrows more entries"),
    ]


@pytest.mark.parametrize("case", _value_error_cases(), ids=lambda c: c[0])
def test_value_errors(backend: str, case) -> None:
    _, (op, *args), message = case
    with pytest.raises(RuntimeError, match=message):
        getattr(ops, op)(*args, backend=backend)


def test_bad_backend() -> None:
    with pytest.raises(ValueError, match="expected backend 'auto', 'native' or 'torch'"):
        ops.topk_mask(torch.randn(2, 2), 1, backend="gpu")  # type: ignore[arg-type]


# --- native == reference -----------------------------------------------------------------

SHAPES = [(1, 1), (3, 7), (5, 64), (2, 4096), (2, 13824)]
KINDS = ["randn", "ties", "equal", "inf", "narrow"]


def _ks(cols: int) -> list[int]:
    return sorted({0, 1, cols // 2, max(cols - 1, 0), cols})


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", KINDS)
def test_topk_matches_reference(native, device: str, dtype: torch.dtype, shape, kind: str) -> None:
    x = _scores(kind, *shape, dtype, device)
    for k in _ks(shape[1]):
        got = ops.topk_mask(x, k, backend="native")
        assert got.dtype == torch.bool and got.shape == x.shape and got.device == x.device
        assert torch.equal(got, ref.topk_mask(x, k)), f"k={k}"
        assert bool((got.sum(1) == k).all())


NM_PATTERNS = [(2, 4), (1, 4), (3, 4), (4, 8), (3, 7), (0, 1), (1, 1), (5, 40), (16, 64)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_nm_matches_reference(native, device: str, dtype: torch.dtype, kind: str) -> None:
    for n, m in NM_PATTERNS:
        for rows, cols in [(3, 2240), (1, m), (2, 4480)]:  # 2240 = 4 * 7 * 80 = 64 * 35
            if cols % m:
                continue
            x = _scores(kind, rows, cols, dtype, device, seed=n * 100 + m)
            got = ops.nm_mask(x, n, m, backend="native")
            assert torch.equal(got, ref.nm_mask(x, n, m)), f"{n}:{m} {rows}x{cols}"
            assert bool((got.reshape(rows, cols // m, m).sum(-1) == n).all())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", KINDS)
def test_rebuild_matches_reference(native, device: str, dtype: torch.dtype, shape, kind: str) -> None:
    x = _scores(kind, *shape, dtype, device)
    for frac in (0.0, 0.3, 0.5, 1.0):
        mask = _random_mask(*shape, frac, device, seed=int(frac * 10))
        for ratio in (0.0, 0.01, 0.5, 1.0):
            got = ops.rebuild_mask(x, mask, ratio, backend="native")
            assert torch.equal(got, ref.rebuild_mask(x, mask, ratio)), f"frac={frac} ratio={ratio}"
            assert torch.equal(got.sum(1), mask.sum(1))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (32, 64)], ids=lambda p: f"{p[0]}:{p[1]}")
def test_rebuild_nm_matches_reference(native, device: str, dtype: torch.dtype, kind: str, nm) -> None:
    n, m = nm
    rows, cols = 4, 1024
    x = _scores(kind, rows, cols, dtype, device)
    mask = ref.nm_mask(_scores("randn", rows, cols, torch.float32, device, seed=7), n, m)
    for ratio in (0.0, 0.1, 0.5, 1.0):
        got = ops.rebuild_mask(x, mask, ratio, m, backend="native")
        assert torch.equal(got, ref.rebuild_mask(x, mask, ratio, m)), f"ratio={ratio}"
        assert bool((got.reshape(rows, cols // m, m).sum(-1) == n).all())


def _outcome(call):
    try:
        return call()
    except RuntimeError as exc:
        return str(exc).splitlines()[0]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("nm", [(1, 4), (16, 64)], ids=lambda p: f"{p[0]}:{p[1]}")
def test_rebuild_sparse_nm_agrees(native, device: str, nm) -> None:
    """n < m - n: a group may regrow more than it kept; both backends raise on the same inputs."""
    n, m = nm
    x = _scores("randn", 8, 256, torch.float32, device, seed=11)
    mask = ref.nm_mask(_scores("randn", 8, 256, torch.float32, device, seed=12), n, m)
    outcomes = set()
    for ratio in (0.05, 0.3, 1.0):
        got = _outcome(lambda: ops.rebuild_mask(x, mask, ratio, m, backend="native"))
        want = _outcome(lambda: ref.rebuild_mask(x, mask, ratio, m))
        if isinstance(want, str):
            assert got == want
        else:
            assert torch.equal(got, want)
        outcomes.add(isinstance(want, str))
    assert outcomes == {True, False} or m == 4  # 16:64 sees both a result and the error


@pytest.mark.parametrize("device", devices())
def test_non_contiguous_inputs(native, device: str) -> None:
    base = _scores("ties", 64, 96, torch.bfloat16, device)
    for x in (base.t(), base[:, ::2], base[::3, 1:]):
        assert not x.is_contiguous()
        cols = x.shape[1]
        assert torch.equal(ops.topk_mask(x, cols // 3, backend="native"), ref.topk_mask(x, cols // 3))
        if cols % 4 == 0:
            assert torch.equal(ops.nm_mask(x, 2, 4, backend="native"), ref.nm_mask(x, 2, 4))
        mask = _random_mask(*x.shape, 0.5, device).t().contiguous().t()  # column-major mask
        assert torch.equal(ops.rebuild_mask(x, mask, 0.5, backend="native"), ref.rebuild_mask(x, mask, 0.5))


@pytest.mark.parametrize("device", devices())
def test_empty_tensors(native, device: str) -> None:
    for rows, cols in [(0, 8), (3, 0), (0, 0)]:
        x = torch.randn(rows, cols, device=device)
        assert ops.topk_mask(x, 0, backend="native").shape == (rows, cols)
        assert ops.nm_mask(x, 1, 4 if cols else 1, backend="native").shape == (rows, cols)
        assert ops.rebuild_mask(x, x > 0, 0.5, backend="native").shape == (rows, cols)


# --- invariants ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_rebuild_invariants(backend: str, kind: str) -> None:
    x = _scores(kind, 16, 512, torch.float32, "cpu", seed=3)
    mask = _random_mask(16, 512, 0.5, "cpu")
    r = _beneficial_pairs(x, mask)
    assert bool((r > 0).all())
    assert torch.equal(ops.rebuild_mask(x, mask, 0.0, backend=backend), mask)
    full = ops.rebuild_mask(x, mask, 1.0, backend=backend)
    assert torch.equal(full.sum(1), mask.sum(1))
    # ratio 1 leaves no beneficial pair: every pruned score <= every kept score.
    assert bool((_beneficial_pairs(x, full) == 0).all())
    best_pruned = torch.where(full, -INF, x).amax(1)
    worst_kept = torch.where(full, x, INF).amin(1)
    assert bool((best_pruned <= worst_kept).all())
    # ratio a swaps floor(a * R) pairs per row.
    half = ops.rebuild_mask(x, mask, 0.5, backend=backend)
    assert torch.equal((half & ~mask).sum(1), torch.floor(0.5 * r.double()).long())


def test_ratio_is_floored_in_double() -> None:
    # 0.29 * 100 == 28.999999999999996 in double: 28 swaps, not 29.
    x = torch.arange(200, dtype=torch.float32)[None]
    mask = torch.arange(200)[None] < 100  # the 100 worst kept, the 100 best pruned: R = 100
    assert int(_beneficial_pairs(x, mask)[0]) == 100
    assert int((ref.rebuild_mask(x, mask, 0.29) & ~mask).sum()) == 28
    if _native.available():
        assert torch.equal(ops.rebuild_mask(x, mask, 0.29, backend="native"), ref.rebuild_mask(x, mask, 0.29))


# --- torch.library integration ------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
def test_opcheck(native, device: str) -> None:
    x = torch.randn(6, 16, device=device)
    mask = ref.nm_mask(x, 2, 4)
    torch.library.opcheck(torch.ops.barber.topk_mask.default, (x, 5))
    torch.library.opcheck(torch.ops.barber.nm_mask.default, (x.bfloat16(), 2, 4))
    torch.library.opcheck(torch.ops.barber.rebuild_mask.default, (x.half(), x > 0, 0.5, 0))
    torch.library.opcheck(torch.ops.barber.rebuild_mask.default, (x, mask, 0.25, 4))


def test_compile_fullgraph(native) -> None:
    def prune(scores: torch.Tensor) -> torch.Tensor:
        mask = ops.topk_mask(scores, 8)
        return ops.rebuild_mask(scores, mask, 0.5) & ops.nm_mask(scores, 2, 4)

    x = torch.randn(4, 16)
    compiled = torch.compile(prune, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), prune(x))


def test_import_is_light_and_first_call_may_be_compiled(native) -> None:
    """Importing barber.ops probes the extension and registers the fakes but does not import
    torch._dynamo, and the very first mask op call of a process may happen under
    torch.compile(fullgraph=True)."""
    script = textwrap.dedent(
        """
        import sys
        import torch
        import barber.ops as ops
        assert "torch._dynamo" not in sys.modules, "barber.ops imported torch._dynamo"
        assert ops._NATIVE_DEVICES[:2] == ("cpu", "meta")
        assert torch.ops.barber.topk_mask(torch.empty(4, 8, device="meta"), 3).shape == (4, 8)  # the fake
        f = torch.compile(lambda s: ops.topk_mask(s, 3), fullgraph=True, backend="eager")
        x = torch.randn(4, 8)
        assert torch.equal(f(x), ops.reference.topk_mask(x, 3))
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_auto_falls_back_to_reference_without_native(monkeypatch) -> None:
    monkeypatch.setattr(ops, "_NATIVE_DEVICES", ())
    x = torch.randn(3, 8)
    assert torch.equal(ops.topk_mask(x, 3), ref.topk_mask(x, 3))
    with pytest.raises(RuntimeError, match="backend='native' but the barber._C extension is not available"):
        ops.topk_mask(x, 3, backend="native")
    mask = ref.nm_mask(x, 2, 4)  # the packing ops decide with the same probe
    assert torch.equal(ops.pack_bitmask(mask), ref.pack_bitmask(mask))
    with pytest.raises(RuntimeError, match=r"ops.pack_bitmask: backend='native' but the barber._C extension is not"):
        ops.pack_bitmask(mask, backend="native")


def test_required_but_missing_raises_on_use(monkeypatch) -> None:
    """BARBER_REQUIRE_NATIVE=1 without barber._C: importing works, every non-"torch" op call raises."""
    monkeypatch.setattr(ops, "_NATIVE_DEVICES", ())
    monkeypatch.setattr(ops, "_NATIVE_ERROR", "BARBER_REQUIRE_NATIVE is set but barber._C could not be imported")
    x = torch.randn(3, 8)
    for backend in ("auto", "native"):
        with pytest.raises(RuntimeError, match="BARBER_REQUIRE_NATIVE is set but barber._C could not be imported"):
            ops.topk_mask(x, 3, backend=backend)
    assert torch.equal(ops.topk_mask(x, 3, backend="torch"), ref.topk_mask(x, 3))
