"""Packing ops (pack_24, unpack_24, pack_bitmask, unpack_bitmask): reference and native.

Oracles: torch's own CUTLASS converters (sparse_semi_structured_from_dense_cutlass /
_to_dense_cutlass, plain tensor ops that run on CPU) compared bit for bit, and numpy
packbits(bitorder="little") for the bitmask. Every test runs the pure-torch reference
("torch") and the native kernels ("native") on every device of conftest.devices().
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import devices
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

from barber import ops

DTYPES_24 = [torch.float16, torch.bfloat16, torch.int8]
DTYPE_IDS = {torch.float16: "f16", torch.bfloat16: "bf16", torch.int8: "i8"}
# Shapes per dtype: the CUTLASS minimum, a few multiples, and a LLaMA-like aspect scaled down.
SHAPES_24 = {
    torch.float16: [(32, 64), (64, 192), (256, 1024), (320, 896)],
    torch.bfloat16: [(32, 64), (64, 192), (256, 1024), (320, 896)],
    torch.int8: [(16, 128), (48, 256), (256, 1024), (320, 896)],
}
CASES_24 = [(dt, shape) for dt in DTYPES_24 for shape in SHAPES_24[dt]]
CASE_IDS = [f"{DTYPE_IDS[dt]}-{r}x{c}" for dt, (r, c) in CASES_24]
@pytest.fixture(params=devices())
def device(request) -> str:
    return request.param


def bits(t: torch.Tensor) -> torch.Tensor:
    """Exact bit patterns (so -0.0 != +0.0 and NaN == NaN)."""
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int8)


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    assert torch.equal(bits(a.cpu()), bits(b.cpu()))


def random_24(rows: int, cols: int, dtype: torch.dtype, seed: int, device: str = "cpu") -> torch.Tensor:
    """A dense [rows, cols] matrix with 0, 1 or 2 nonzeros in every group of 4 (mostly 2),
    and some zeros written as -0.0 (float dtypes)."""
    gen = torch.Generator().manual_seed(seed)
    groups = cols // 4
    order = torch.rand(rows, groups, 4, generator=gen).argsort(-1)
    kept_count = torch.multinomial(torch.tensor([0.05, 0.15, 0.8]), rows * groups, True, generator=gen)
    rank = order.argsort(-1)  # rank of each position in a random permutation
    keep = rank < kept_count.view(rows, groups, 1)
    if dtype == torch.int8:
        vals = torch.randint(1, 128, (rows, groups, 4), generator=gen, dtype=torch.int8)
        vals = vals * torch.where(torch.rand(rows, groups, 4, generator=gen) < 0.5, -1, 1).to(torch.int8)
        zero = torch.zeros((), dtype=torch.int8)
        dense = torch.where(keep, vals, zero)
    else:
        vals = torch.randn(rows, groups, 4, generator=gen).to(dtype)
        vals = torch.where(vals == 0, torch.ones((), dtype=dtype), vals)
        neg_zero = torch.rand(rows, groups, 4, generator=gen) < 0.3
        zeros = torch.where(neg_zero, torch.tensor(-0.0, dtype=dtype), torch.tensor(0.0, dtype=dtype))
        dense = torch.where(keep, vals, zeros)
    return dense.view(rows, cols).to(device)


# --- pack_24 / unpack_24 ---------------------------------------------------------------


def test_literal_uniform_codes(backend: str, device: str) -> None:
    """Hand-checkable: every row keeps columns {0,1}, {0,2}, {1,2}, {0,3} of its 4 groups per
    16 columns, so every meta word is 0xC984 whatever the CUTLASS reorder."""
    pattern = torch.tensor([1, 1, 0, 0, 1, 0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)
    keep = pattern.repeat(32, 4)
    dense = torch.arange(1, 32 * 64 + 1, dtype=torch.float32).view(32, 64).to(torch.float16)
    dense = torch.where(keep, dense, torch.zeros((), dtype=torch.float16)).to(device)
    values, meta = ops.pack_24(dense, backend=backend)
    assert values.shape == (32, 32) and meta.shape == (32, 4) and meta.dtype == torch.int16
    assert torch.equal(values.cpu(), dense.cpu()[keep].view(32, 32))
    assert torch.equal(meta.cpu(), torch.full((32, 4), 0xC984 - 0x10000, dtype=torch.int16))
    assert_bits_equal(ops.unpack_24(values, meta, backend=backend), dense)


def test_literal_zero_and_one_nonzero_groups(backend: str, device: str) -> None:
    """Groups with 0 or 1 nonzeros take torch's positions: none/{2}/{3} -> 0xE, {0} -> 0x8, {1} -> 0x9.

    The same 16-column pattern repeats, so every meta word is 0xEE98 whatever the reorder."""
    dense = torch.zeros(32, 64, dtype=torch.bfloat16)
    dense[:, 0::16] = 5.0  # group 0: {0} -> 0x8
    dense[:, 5::16] = -3.0  # group 1: {1} -> 0x9
    dense[:, 10::16] = 2.0  # group 2: {2} -> 0xE
    # group 3 (columns 12..15) all zero -> 0xE, with a -0.0 that is stored as it is
    dense[:, 14::16] = -0.0
    dense = dense.to(device)
    values, meta = ops.pack_24(dense, backend=backend)
    assert torch.equal(meta.cpu(), torch.full((32, 4), 0xEE98 - 0x10000, dtype=torch.int16))
    row = bits(values.cpu()[0, :8]).tolist()
    neg_zero = bits(torch.tensor([-0.0], dtype=torch.bfloat16)).item()
    expect = torch.tensor([5.0, 0.0, -3.0, 0.0, 2.0, 0.0, -0.0, 0.0], dtype=torch.bfloat16)
    assert row == bits(expect).tolist() and row[6] == neg_zero
    assert_bits_equal(values, sparse_semi_structured_from_dense_cutlass(dense.cpu())[0])


@pytest.mark.parametrize(("dtype", "shape"), CASES_24, ids=CASE_IDS)
def test_pack_24_matches_torch_converter(backend: str, device: str, dtype: torch.dtype, shape) -> None:
    dense = random_24(*shape, dtype, seed=shape[0] * 7 + shape[1], device=device)
    values, meta = ops.pack_24(dense, backend=backend)
    want_values, want_meta = sparse_semi_structured_from_dense_cutlass(dense.cpu())
    assert values.device == dense.device and meta.device == dense.device
    assert torch.equal(values.cpu(), want_values) and torch.equal(meta.cpu(), want_meta)
    assert_bits_equal(values, want_values)
    assert_bits_equal(meta, want_meta)


@pytest.mark.parametrize(("dtype", "shape"), CASES_24, ids=CASE_IDS)
def test_unpack_24_matches_torch_and_round_trips(backend: str, device: str, dtype: torch.dtype, shape) -> None:
    dense = random_24(*shape, dtype, seed=shape[1] * 3 + 1, device=device)
    values, meta = ops.pack_24(dense, backend=backend)
    back = ops.unpack_24(values, meta, backend=backend)
    assert back.device == dense.device
    assert_bits_equal(back, sparse_semi_structured_to_dense_cutlass(values.cpu(), meta.cpu()))
    # Numerically the round trip is exact; bit for bit, unstored -0.0 zeros come back as +0.0.
    assert torch.equal(back.cpu(), dense.cpu())
    if dtype != torch.int8:
        unstored_neg_zero = (bits(back.cpu()) != bits(dense.cpu())).nonzero()
        assert all(dense.cpu()[r, c].item() == 0 for r, c in unstored_neg_zero.tolist())


def test_nan_and_inf_are_nonzero(backend: str, device: str) -> None:
    dense = torch.zeros(32, 64, dtype=torch.float16)
    dense[:, 3] = float("nan")
    dense[:, 1] = float("-inf")
    dense[:, 6] = float("inf")
    dense = dense.to(device)
    values, meta = ops.pack_24(dense, backend=backend)
    want_values, want_meta = sparse_semi_structured_from_dense_cutlass(dense.cpu())
    assert_bits_equal(values, want_values)
    assert torch.equal(meta.cpu(), want_meta)
    assert_bits_equal(ops.unpack_24(values, meta, backend=backend), dense)


def test_pack_24_noncontiguous(backend: str, device: str) -> None:
    base = random_24(64, 256, torch.bfloat16, seed=11, device=device)
    sliced = base[:, 64:192]  # strided rows
    col_major = random_24(64, 64, torch.float16, seed=12, device=device).t().contiguous().t()
    for dense in (sliced, col_major):
        assert not dense.is_contiguous()
        values, meta = ops.pack_24(dense, backend=backend)
        want_values, want_meta = sparse_semi_structured_from_dense_cutlass(dense.cpu().contiguous())
        assert_bits_equal(values, want_values)
        assert torch.equal(meta.cpu(), want_meta)
    values, meta = ops.pack_24(sliced, backend=backend)
    wide = torch.empty(values.shape[0], 2 * values.shape[1], dtype=values.dtype, device=device)
    wide[:, ::2] = values
    assert_bits_equal(ops.unpack_24(wide[:, ::2], meta, backend=backend), ops.unpack_24(values, meta, backend=backend))


def test_pack_24_rejects_more_than_two_nonzeros(backend: str, device: str) -> None:
    dense = random_24(32, 64, torch.float16, seed=3)
    dense[3, 8:12] = torch.tensor([1.0, 2.0, 0.0, 3.0], dtype=torch.float16)
    dense[5, 0:4] = 1.0
    too_many = r"barber::pack_24: expected at most 2 nonzeros .* got 3 in row 3, columns 8\.\.11"
    with pytest.raises(RuntimeError, match=too_many):
        ops.pack_24(dense.to(device), backend=backend)
    int8 = torch.zeros(16, 128, dtype=torch.int8)
    int8[15, 124:128] = 1
    with pytest.raises(RuntimeError, match=r"got 4 in row 15, columns 124\.\.127"):
        ops.pack_24(int8.to(device), backend=backend)


def test_unpack_24_rejects_invalid_codes(backend: str, device: str) -> None:
    """Shape and dtype errors: tests/test_op_errors.py (the same for reference, kernels and fakes)."""
    values, meta = ops.pack_24(random_24(32, 64, torch.float16, seed=5, device=device), backend=backend)
    corrupt = meta.clone()
    corrupt.view(-1)[0] = 0x0F44  # logical (row 0, word 0): group 2 has code 0xF
    invalid = r"barber::unpack_24: expected valid 2:4 metadata codes, .* row 0, columns 8\.\.11"
    with pytest.raises(RuntimeError, match=invalid):
        ops.unpack_24(values, corrupt, backend=backend)


# --- pack_bitmask / unpack_bitmask -----------------------------------------------------

BITMASK_SHAPES = [(1, 1), (3, 7), (4, 8), (5, 9), (7, 37), (16, 64), (33, 129), (0, 5), (4, 0), (128, 1000)]


@pytest.mark.parametrize("shape", BITMASK_SHAPES, ids=[f"{r}x{c}" for r, c in BITMASK_SHAPES])
def test_pack_bitmask_matches_numpy(backend: str, device: str, shape) -> None:
    gen = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    mask = torch.rand(shape, generator=gen) < 0.5
    packed = ops.pack_bitmask(mask.to(device), backend=backend)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], (shape[1] + 7) // 8)
    want = np.packbits(mask.numpy(), axis=-1, bitorder="little")
    assert np.array_equal(packed.cpu().numpy(), want.reshape(packed.shape))
    back = ops.unpack_bitmask(packed, shape[1], backend=backend)
    assert back.dtype == torch.bool and back.device == packed.device
    assert torch.equal(back.cpu(), mask)


def test_bitmask_literal(backend: str, device: str) -> None:
    mask = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1, 0, 1], [0, 1, 0, 0, 0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    packed = ops.pack_bitmask(mask.to(device), backend=backend)
    assert packed.cpu().tolist() == [[0x81, 0x02], [0x02, 0x01]]


def test_unpack_bitmask_ignores_padding_bits(backend: str, device: str) -> None:
    packed = torch.tensor([[0xFF, 0xFF]], dtype=torch.uint8, device=device)
    assert ops.unpack_bitmask(packed, 10, backend=backend).cpu().tolist() == [[True] * 10]


def test_bitmask_noncontiguous(backend: str, device: str) -> None:
    mask = (torch.rand(40, 24, generator=torch.Generator().manual_seed(1)) < 0.3).to(device)
    for view in (mask.t(), mask[:, 3:20], mask[::2]):
        assert not view.is_contiguous()
        packed = ops.pack_bitmask(view, backend=backend)
        want = np.packbits(view.cpu().numpy(), axis=-1, bitorder="little")
        assert np.array_equal(packed.cpu().numpy(), want)
        wide = torch.zeros(packed.shape[0], 2 * packed.shape[1], dtype=torch.uint8, device=device)
        wide[:, ::2] = packed
        assert torch.equal(ops.unpack_bitmask(wide[:, ::2], view.shape[1], backend=backend).cpu(), view.cpu())


# --- dispatcher-level checks of the native ops -------------------------------------------

def test_opcheck(native, device: str) -> None:
    dense = random_24(32, 64, torch.bfloat16, seed=9, device=device)
    values, meta = torch.ops.barber.pack_24(dense)
    int8 = random_24(16, 128, torch.int8, seed=10, device=device)
    mask = torch.rand(5, 13, device=device) < 0.5
    torch.library.opcheck(torch.ops.barber.pack_24.default, (dense,))
    torch.library.opcheck(torch.ops.barber.pack_24.default, (int8,))
    torch.library.opcheck(torch.ops.barber.unpack_24.default, (values, meta))
    torch.library.opcheck(torch.ops.barber.pack_bitmask.default, (mask,))
    torch.library.opcheck(torch.ops.barber.unpack_bitmask.default, (torch.ops.barber.pack_bitmask(mask), 13))


def test_compile_fullgraph(native, device: str) -> None:
    torch._dynamo.reset()
    dense = random_24(64, 128, torch.float16, seed=13, device=device)

    def round_trip(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, meta = ops.pack_24(x, backend="native")
        mask = ops.unpack_24(values, meta, backend="native") != 0
        return ops.unpack_24(values, meta, backend="native"), ops.pack_bitmask(mask, backend="native")

    back, packed = torch.compile(round_trip, fullgraph=True)(dense)
    assert_bits_equal(back, ops.unpack_24(*ops.pack_24(dense, backend="native"), backend="native"))
    assert torch.equal(packed.cpu(), ops.pack_bitmask(dense.cpu() != 0, backend="torch"))


def test_backend_argument_is_checked() -> None:
    with pytest.raises(ValueError, match=r"barber.ops.pack_bitmask: expected backend 'auto', 'native' or 'torch'"):
        ops.pack_bitmask(torch.zeros(1, 1, dtype=torch.bool), backend="cuda")  # type: ignore[arg-type]
