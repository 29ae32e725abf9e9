"""Input errors visible without reading values: the same message from all three implementations.

For every such error case the pure-torch reference (barber.reference), the native kernels
(torch.ops.barber, on every device of conftest.devices()) and the fakes that torch.compile
traces with (registered by barber.ops, run here under FakeTensorMode) must raise the identical
message, which is also spelled out here. Errors that need the values (NaN scores, invalid N:M
masks, more than 2 nonzeros in a group, bad meta codes) are tested in test_mask_ops.py and
test_pack_ops.py; no fake can see them.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import pytest
import torch
from conftest import devices, skip_or_fail
from torch._subclasses import FakeTensorMode

from barber import ops, reference

IMPLS = ("torch", "native", "fake")
PACK24_HINT = " (float32 uses CUTLASS's 1:2 TF32 layout, which barber does not produce; cast to float16 or bfloat16)"


class Case(NamedTuple):
    """One error: op name, args from the device, the message ({dev}, {other}: the two devices)."""

    id: str
    op: str
    args: Callable[[str], tuple]
    message: str
    impls: tuple[str, ...] = IMPLS
    # Devices on which the native kernel sees this error (a meta input dispatches to the fake).
    native_on: tuple[str, ...] = ("cpu", "cuda")


def _other(device: str) -> str:
    """A second device for the device-mismatch cases: meta next to cpu, cpu next to a GPU."""
    return "meta" if device == "cpu" else "cpu"


def _x(device: str) -> torch.Tensor:
    return torch.zeros(4, 8, device=device)


def _m24(device: str) -> torch.Tensor:
    return torch.tensor([[True, True, False, False] * 2] * 4, device=device)


def _dense(rows: int, cols: int, device: str, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return torch.zeros(rows, cols, dtype=dtype, device=device)


def _packed(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """values [32, 32] float16 and meta [32, 4] int16: valid unpack_24 inputs of a 32x64 matrix."""
    return _dense(32, 32, device), torch.zeros(32, 4, dtype=torch.int16, device=device)


def _bits(device: str) -> torch.Tensor:
    return torch.zeros(2, 2, dtype=torch.uint8, device=device)


TOPK = "barber::topk_mask: "
NM = "barber::nm_mask: "
REBUILD = "barber::rebuild_mask: "
SCORE_DTYPE = "expected scores of dtype float32, float16 or bfloat16, got "
RATIO = REBUILD + "expected 0 <= ratio <= 1, got ratio="
P24 = "barber::pack_24: "
U24 = "barber::unpack_24: "
SHAPE = "expected a dense shape [rows, cols] with rows a positive multiple of {} and cols a positive multiple of {}"
SHAPE_16BIT = SHAPE.format(32, 64)
SHAPE_INT8 = SHAPE.format(16, 128)

CASES = [
    Case(
        "topk 3-D",
        "topk_mask",
        lambda d: (_x(d)[None], 1),
        TOPK + "expected scores to be 2-D [rows, cols], got shape [1, 4, 8]",
    ),
    Case(
        "topk 1-D",
        "topk_mask",
        lambda d: (_x(d)[0], 1),
        TOPK + "expected scores to be 2-D [rows, cols], got shape [8]",
    ),
    Case("topk f64", "topk_mask", lambda d: (_x(d).double(), 1), TOPK + SCORE_DTYPE + "torch.float64"),
    Case("topk int32", "topk_mask", lambda d: (_x(d).int(), 1), TOPK + SCORE_DTYPE + "torch.int32"),
    Case("topk k<0", "topk_mask", lambda d: (_x(d), -1), TOPK + "expected 0 <= k <= cols=8, got k=-1"),
    Case("topk k>cols", "topk_mask", lambda d: (_x(d), 9), TOPK + "expected 0 <= k <= cols=8, got k=9"),
    Case(
        "topk 2^31 cols",  # a kernel limit (int32 columns); the reference has none
        "topk_mask",
        lambda d: (torch.zeros(1, 1, device=d).expand(1, 2**31), 1),
        TOPK + "expected fewer than 2^31 columns, got 2147483648",
        impls=("native", "fake"),
    ),
    Case("nm bool", "nm_mask", lambda d: (_x(d).bool(), 2, 4), NM + SCORE_DTYPE + "torch.bool"),
    Case("nm m=0", "nm_mask", lambda d: (_x(d), 0, 0), NM + "expected m >= 1, got m=0"),
    Case("nm m<0", "nm_mask", lambda d: (_x(d), 0, -4), NM + "expected m >= 1, got m=-4"),
    Case("nm n>m", "nm_mask", lambda d: (_x(d), 5, 4), NM + "expected 0 <= n <= m=4, got n=5"),
    Case("nm n<0", "nm_mask", lambda d: (_x(d), -1, 4), NM + "expected 0 <= n <= m=4, got n=-1"),
    Case(
        "nm cols",
        "nm_mask",
        lambda d: (_x(d), 2, 3),
        NM + "expected the number of columns to be divisible by m=3, got 8",
    ),
    Case(
        "rebuild 3-D",
        "rebuild_mask",
        lambda d: (_x(d)[None], _m24(d)[None], 0.5),
        REBUILD + "expected scores to be 2-D [rows, cols], got shape [1, 4, 8]",
    ),
    Case(
        "rebuild f64",
        "rebuild_mask",
        lambda d: (_x(d).double(), _m24(d), 0.5),
        REBUILD + SCORE_DTYPE + "torch.float64",
    ),
    Case(
        "rebuild mask dtype",
        "rebuild_mask",
        lambda d: (_x(d), _m24(d).float(), 0.5),
        REBUILD + "expected mask of dtype torch.bool, got torch.float32",
    ),
    Case(
        "rebuild mask shape",
        "rebuild_mask",
        lambda d: (_x(d), _m24(d)[:, :4], 0.5),
        REBUILD + "expected mask of the shape of scores [4, 8], got [4, 4]",
    ),
    Case(
        "rebuild mask device",
        "rebuild_mask",
        lambda d: (_x(d), _m24(_other(d)), 0.5),
        REBUILD + "expected mask on the device of scores ({dev}), got {other}",
        native_on=("cuda",),
    ),
    Case("rebuild ratio 1.5", "rebuild_mask", lambda d: (_x(d), _m24(d), 1.5), RATIO + "1.5"),
    Case("rebuild ratio 2.0", "rebuild_mask", lambda d: (_x(d), _m24(d), 2.0), RATIO + "2.0"),
    Case("rebuild ratio 1+1e-7", "rebuild_mask", lambda d: (_x(d), _m24(d), 1.0000001), RATIO + "1.0000001"),
    Case("rebuild ratio -1e-5", "rebuild_mask", lambda d: (_x(d), _m24(d), -1e-05), RATIO + "-1e-05"),
    Case("rebuild ratio 1e20", "rebuild_mask", lambda d: (_x(d), _m24(d), 1e20), RATIO + "1e+20"),
    Case("rebuild ratio nan", "rebuild_mask", lambda d: (_x(d), _m24(d), float("nan")), RATIO + "nan"),
    Case(
        "rebuild m<0",
        "rebuild_mask",
        lambda d: (_x(d), _m24(d), 0.5, -1),
        REBUILD + "expected m >= 0 (0: unstructured), got m=-1",
    ),
    Case(
        "rebuild m cols",
        "rebuild_mask",
        lambda d: (_x(d), _m24(d), 0.5, 3),
        REBUILD + "expected the number of columns to be divisible by m=3, got 8",
    ),
    Case(
        "pack_24 3-D",
        "pack_24",
        lambda d: (_dense(32, 64, d)[None],),
        P24 + "expected a 2-D dense tensor, got 3 dimensions",
    ),
    Case(
        "pack_24 f32",
        "pack_24",
        lambda d: (_dense(32, 64, d, torch.float32),),
        P24 + "expected dense of dtype float16, bfloat16 or int8, got torch.float32" + PACK24_HINT,
    ),
    Case(
        "pack_24 f64",
        "pack_24",
        lambda d: (_dense(32, 64, d, torch.float64),),
        P24 + "expected dense of dtype float16, bfloat16 or int8, got torch.float64",
    ),
    Case(
        "pack_24 rows 16",
        "pack_24",
        lambda d: (_dense(16, 64, d),),
        P24 + SHAPE_16BIT + " (CUTLASS 2:4 minimum for torch.float16), got [16, 64]",
    ),
    Case(
        "pack_24 rows 48",
        "pack_24",
        lambda d: (_dense(48, 64, d),),
        P24 + SHAPE_16BIT + " (CUTLASS 2:4 minimum for torch.float16), got [48, 64]",
    ),
    Case(
        "pack_24 rows 0",
        "pack_24",
        lambda d: (_dense(0, 64, d),),
        P24 + SHAPE_16BIT + " (CUTLASS 2:4 minimum for torch.float16), got [0, 64]",
    ),
    Case(
        "pack_24 cols 48",
        "pack_24",
        lambda d: (_dense(32, 48, d, torch.bfloat16),),
        P24 + SHAPE_16BIT + " (CUTLASS 2:4 minimum for torch.bfloat16), got [32, 48]",
    ),
    Case(
        "pack_24 int8 16x64",
        "pack_24",
        lambda d: (_dense(16, 64, d, torch.int8),),
        P24 + SHAPE_INT8 + " (CUTLASS 2:4 minimum for torch.int8), got [16, 64]",
    ),
    Case(
        "unpack_24 3-D values",
        "unpack_24",
        lambda d: (_packed(d)[0][None], _packed(d)[1]),
        U24 + "expected 2-D values, got 3 dimensions",
    ),
    Case(
        "unpack_24 1-D meta",
        "unpack_24",
        lambda d: (_packed(d)[0], _packed(d)[1][0]),
        U24 + "expected 2-D meta, got 1 dimensions",
    ),
    Case(
        "unpack_24 f32 values",
        "unpack_24",
        lambda d: (_packed(d)[0].float(), _packed(d)[1]),
        U24 + "expected values of dtype float16, bfloat16 or int8, got torch.float32" + PACK24_HINT,
    ),
    Case(
        "unpack_24 meta device",
        "unpack_24",
        lambda d: (_packed(d)[0], _packed(_other(d))[1]),
        U24 + "expected meta on the device of values ({dev}), got {other}",
        native_on=("cuda",),
    ),
    Case(
        "unpack_24 meta int32",
        "unpack_24",
        lambda d: (_packed(d)[0], _packed(d)[1].int()),
        U24 + "expected meta of dtype torch.int16 for torch.float16 values, got torch.int32",
    ),
    Case(
        "unpack_24 int8 meta int16",
        "unpack_24",
        lambda d: (_dense(16, 64, d, torch.int8), torch.zeros(16, 4, dtype=torch.int16, device=d)),
        U24 + "expected meta of dtype torch.int32 for torch.int8 values, got torch.int16",
    ),
    Case(
        "unpack_24 rows 16",
        "unpack_24",
        lambda d: (_packed(d)[0][:16], _packed(d)[1][:16]),
        U24 + SHAPE_16BIT + " (CUTLASS 2:4 minimum for torch.float16), got [16, 64]",
    ),
    Case(
        "unpack_24 meta shape",
        "unpack_24",
        lambda d: (_packed(d)[0], _packed(d)[1][:, :2]),
        U24 + "expected meta of shape [32, 4] for values of shape [32, 32], got [32, 2]",
    ),
    Case(
        "pack_bitmask 1-D",
        "pack_bitmask",
        lambda d: (torch.zeros(8, dtype=torch.bool, device=d),),
        "barber::pack_bitmask: expected a 2-D mask, got 1 dimensions",
    ),
    Case(
        "pack_bitmask uint8",
        "pack_bitmask",
        lambda d: (_bits(d),),
        "barber::pack_bitmask: expected mask of dtype bool, got torch.uint8",
    ),
    Case(
        "unpack_bitmask 3-D",
        "unpack_bitmask",
        lambda d: (_bits(d)[None], 16),
        "barber::unpack_bitmask: expected 2-D bits, got 3 dimensions",
    ),
    Case(
        "unpack_bitmask bool",
        "unpack_bitmask",
        lambda d: (_bits(d).bool(), 16),
        "barber::unpack_bitmask: expected bits of dtype uint8, got torch.bool",
    ),
    Case(
        "unpack_bitmask cols<0",
        "unpack_bitmask",
        lambda d: (_bits(d)[:, :0], -1),
        "barber::unpack_bitmask: expected cols >= 0, got -1",
    ),
    Case(
        "unpack_bitmask cols",
        "unpack_bitmask",
        lambda d: (_bits(d), 17),
        "barber::unpack_bitmask: expected bits.size(1) == ceil(cols/8) = 3 for cols=17, got 2",
    ),
]


def _run(impl: str, op: str, args: tuple) -> None:
    """Calls op `op` of implementation `impl` ("torch", "native" or "fake") on `args`."""
    if impl == "torch":
        getattr(reference, op)(*args)
    elif impl == "native":
        getattr(torch.ops.barber, op)(*args)
    else:
        mode = FakeTensorMode()
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with mode:
            getattr(torch.ops.barber, op)(*fake_args)


def _message(impl: str, op: str, args: tuple) -> str:
    """The first line of the RuntimeError that the call raises, or "(no error)"."""
    try:
        _run(impl, op, args)
    except RuntimeError as exc:
        return str(exc).splitlines()[0]
    return "(no error)"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_same_message_from_reference_native_and_fake(device: str, case: Case) -> None:
    impls = [impl for impl in case.impls if impl != "native" or device in case.native_on]
    if not ops._NATIVE_DEVICES:  # no barber._C, hence no fakes: the reference alone
        impls = [impl for impl in impls if impl == "torch"]
        if not impls:
            skip_or_fail("barber._C is not built: only the kernels and fakes see this error")
    args = case.args(device)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    want = case.message.format(dev=tensors[0].device, other=tensors[-1].device)
    assert {impl: _message(impl, case.op, args) for impl in impls} == {impl: want for impl in impls}
