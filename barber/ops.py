"""Typed wrappers around the native ops (the only module that calls torch.ops.barber).

Importing this module loads the extension barber._C once (about a millisecond after `import
torch`), records which device types have native kernels in the module constant
`_NATIVE_DEVICES`, and registers every op's fake (meta) kernel, so that the ops trace under
torch.compile and FakeTensorMode. csrc/ops.cpp names this module with `set_python_module`.
The fakes check what the kernels check without reading values, with the same messages
(csrc/mask_checks.h, csrc/pack_checks.h, barber/reference.py).

Each op has a `backend` argument: "auto" uses the native kernel when the extension is built
for the tensor's device and the pure-torch reference (barber.reference) otherwise; "native"
insists on the kernel; "torch" forces the reference. Masks are not differentiable.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

from barber import _native, reference

Backend = Literal["auto", "native", "torch"]

build_info = _native.build_info


# --- which device types have native kernels ------------------------------------------


def _probe() -> tuple[tuple[str, ...], str]:
    """(device types with native kernels, the error to raise on use), decided once at import.

    Device types are () without the extension; "meta" runs the fakes. The error is "" unless
    BARBER_REQUIRE_NATIVE is set and barber._C is missing: then every op call with backend
    "auto" or "native" raises it (importing barber stays possible, e.g. for --help).
    """
    try:
        loaded = _native.available()
    except RuntimeError as exc:
        return (), str(exc)
    if not loaded:
        return (), ""
    return ("cpu", "meta", "cuda") if "cuda" in _native.build_info() else ("cpu", "meta"), ""


# Module constants: torch.compile reads them as ordinary globals (a constant branch in the graph).
_NATIVE_DEVICES, _NATIVE_ERROR = _probe()


def _fake(op: str) -> Callable[[Callable], Callable]:
    """Registers the decorated function as the fake kernel of barber::`op` (if the extension is loaded)."""

    def register(fn: Callable) -> Callable:
        if _NATIVE_DEVICES:
            torch.library.register_fake(f"barber::{op}", fn)
        return fn

    return register


def _use_native(op: str, backend: Backend, device: torch.device) -> bool:
    """Whether op `op` runs the native kernel for a tensor on `device`.

    "auto" uses it when the extension is built with kernels for the device (otherwise the
    reference); "native" raises instead of falling back; "torch" never uses it.
    """
    if backend == "torch":
        return False
    if backend not in ("auto", "native"):
        raise ValueError(f"barber.ops.{op}: expected backend 'auto', 'native' or 'torch', got {backend!r}")
    if device.type in _NATIVE_DEVICES:
        return True
    if _NATIVE_ERROR:
        raise RuntimeError(_NATIVE_ERROR)
    if backend == "native":
        if not _NATIVE_DEVICES:
            raise RuntimeError(f"barber.ops.{op}: backend='native' but the barber._C extension is not available")
        raise RuntimeError(
            f"barber.ops.{op}: backend='native' but the extension (built for {','.join(_NATIVE_DEVICES)}) "
            f"has no kernel for device {device.type}"
        )
    return False


# --- mask ops: topk_mask, nm_mask, rebuild_mask ------------------------------------
#
# Fakes: the checks of csrc/mask_checks.h that need no values. NaN scores, invalid N:M masks and
# overfull groups are only seen by the kernels.

_SCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_scores(op: str, scores: torch.Tensor) -> None:
    """mask_checks.h check_scores: 2-D, a score dtype, fewer than 2^31 columns."""
    torch._check(
        scores.dim() == 2,
        lambda: f"barber::{op}: expected scores to be 2-D [rows, cols], got shape {list(scores.shape)}",
    )
    torch._check(
        scores.dtype in _SCORE_DTYPES,
        lambda: f"barber::{op}: expected scores of dtype float32, float16 or bfloat16, got {scores.dtype}",
    )
    torch._check(
        scores.shape[1] < 2**31, lambda: f"barber::{op}: expected fewer than 2^31 columns, got {scores.shape[1]}"
    )


def _empty_mask(scores: torch.Tensor) -> torch.Tensor:
    """The kernels' output: a new contiguous bool tensor of the shape of scores."""
    return torch.empty_like(scores, dtype=torch.bool, memory_format=torch.contiguous_format)


def topk_mask(scores: torch.Tensor, k: int, backend: Backend = "auto") -> torch.Tensor:
    """Keep the k best entries of every row.

    Args:
        scores: [rows, cols] float32, float16 or bfloat16 (any strides).
        k: entries kept per row, 0 <= k <= cols.
        backend: "auto", "native" or "torch" (module docstring).

    Returns:
        bool [rows, cols] with exactly k True per row. Ties: among equal scores the lower
        column ranks first (-0.0 equals +0.0). NaN raises; +-inf are ordinary values. Not
        differentiable.
    """
    if _use_native("topk_mask", backend, scores.device):
        return torch.ops.barber.topk_mask(scores, k)
    return reference.topk_mask(scores, k)


@_fake("topk_mask")
def _topk_mask_fake(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Fake: mask_checks.h check_topk; a bool [rows, cols] result."""
    _check_scores("topk_mask", scores)
    cols = scores.shape[1]
    torch._check(k >= 0 and k <= cols, lambda: f"barber::topk_mask: expected 0 <= k <= cols={cols}, got k={k}")
    return _empty_mask(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int, backend: Backend = "auto") -> torch.Tensor:
    """N:M mask: in every group of m consecutive columns keep the n best.

    Args:
        scores: [rows, cols] float32, float16 or bfloat16, cols divisible by m.
        n, m: 0 <= n <= m, m >= 1 (2:4 is n=2, m=4).
        backend: "auto", "native" or "torch".

    Returns:
        bool [rows, cols] with exactly n True in every group; ties in a group go to the
        lower column. NaN raises.
    """
    if _use_native("nm_mask", backend, scores.device):
        return torch.ops.barber.nm_mask(scores, n, m)
    return reference.nm_mask(scores, n, m)


@_fake("nm_mask")
def _nm_mask_fake(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Fake: mask_checks.h check_nm; a bool [rows, cols] result."""
    _check_scores("nm_mask", scores)
    cols = scores.shape[1]
    torch._check(m >= 1, lambda: f"barber::nm_mask: expected m >= 1, got m={m}")
    torch._check(n >= 0 and n <= m, lambda: f"barber::nm_mask: expected 0 <= n <= m={m}, got n={n}")
    torch._check(
        cols % m == 0,
        lambda: f"barber::nm_mask: expected the number of columns to be divisible by m={m}, got {cols}",
    )
    return _empty_mask(scores)


def rebuild_mask(
    scores: torch.Tensor, mask: torch.Tensor, ratio: float, m: int = 0, backend: Backend = "auto"
) -> torch.Tensor:
    """LLM-Barber rebuild of `mask` by `scores`, per row; see barber.reference.rebuild_mask.

    Per row the s = floor(ratio * R) best pruned entries regrow and the s worst kept ones
    are pruned, R being the number of beneficial (pruned, kept) pairs; the kept count per
    row is unchanged. m > 0: N:M variant, the pruned partners come from the regrowing
    group, so every group keeps its count.

    Args:
        scores: [rows, cols] float32, float16 or bfloat16.
        mask: bool [rows, cols] on the same device, True = kept.
        ratio: 0 <= ratio <= 1; 0 returns the mask unchanged.
        m: 0 (unstructured) or the N:M group size (cols divisible by m).
        backend: "auto", "native" or "torch".

    Returns:
        The rebuilt bool mask [rows, cols]. Ties follow the total order (lower column
        first). NaN scores, an invalid N:M mask or an overfull group raise.
    """
    if _use_native("rebuild_mask", backend, scores.device):
        return torch.ops.barber.rebuild_mask(scores, mask, float(ratio), m)
    return reference.rebuild_mask(scores, mask, ratio, m)


@_fake("rebuild_mask")
def _rebuild_mask_fake(scores: torch.Tensor, mask: torch.Tensor, ratio: float, m: int = 0) -> torch.Tensor:
    """Fake: mask_checks.h check_rebuild; a bool [rows, cols] result."""
    op = "barber::rebuild_mask"
    _check_scores("rebuild_mask", scores)
    torch._check(mask.dtype == torch.bool, lambda: f"{op}: expected mask of dtype torch.bool, got {mask.dtype}")
    torch._check(
        mask.shape == scores.shape,
        lambda: f"{op}: expected mask of the shape of scores {list(scores.shape)}, got {list(mask.shape)}",
    )
    torch._check(
        mask.device == scores.device,
        lambda: f"{op}: expected mask on the device of scores ({scores.device}), got {mask.device}",
    )
    torch._check(0.0 <= ratio <= 1.0, lambda: f"{op}: expected 0 <= ratio <= 1, got ratio={ratio!r}")
    torch._check(m >= 0, lambda: f"{op}: expected m >= 0 (0: unstructured), got m={m}")
    cols = scores.shape[1]
    torch._check(
        m == 0 or cols % m == 0, lambda: f"{op}: expected the number of columns to be divisible by m={m}, got {cols}"
    )
    return _empty_mask(scores)


# --- packing ops: pack_24, unpack_24, pack_bitmask, unpack_bitmask -----------------
#
# Fakes: the checks of csrc/pack_checks.h that need no values. Groups with more than 2 nonzeros
# and invalid meta codes are only seen by the kernels.

# Per element dtype: meta dtype, dense columns per meta word, CUTLASS minimum (and multiple) rows, cols.
_LAYOUT_24 = {
    torch.float16: (torch.int16, 16, 32, 64),
    torch.bfloat16: (torch.int16, 16, 32, 64),
    torch.int8: (torch.int32, 32, 16, 128),
}


def _check_24_dtype(op: str, arg: str, dtype: torch.dtype) -> tuple[torch.dtype, int, int, int]:
    """pack_checks.h check_24_dtype; returns the _LAYOUT_24 entry of `dtype`."""
    hint = ""
    if dtype == torch.float32:
        hint = " (float32 uses CUTLASS's 1:2 TF32 layout, which barber does not produce; cast to float16 or bfloat16)"
    torch._check(
        dtype in _LAYOUT_24, lambda: f"{op}: expected {arg} of dtype float16, bfloat16 or int8, got {dtype}{hint}"
    )
    return _LAYOUT_24[dtype]


def _check_24_dense_shape(op: str, dtype: torch.dtype, rows: int, cols: int) -> None:
    """pack_checks.h check_24_dense_shape: the CUTLASS minimum shape and its multiples."""
    min_rows, min_cols = _LAYOUT_24[dtype][2:]
    torch._check(
        rows >= min_rows and rows % min_rows == 0 and cols >= min_cols and cols % min_cols == 0,
        lambda: f"{op}: expected a dense shape [rows, cols] with rows a positive multiple of {min_rows} and cols "
        f"a positive multiple of {min_cols} (CUTLASS 2:4 minimum for {dtype}), got [{rows}, {cols}]",
    )


def pack_24(dense: torch.Tensor, backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """2:4 compression in PyTorch's CUTLASS (sm80) layout; see barber.reference.pack_24.

    Args:
        dense: [rows, cols] float16, bfloat16 or int8 with at most 2 nonzeros per group of
            4 columns; rows, cols positive multiples of 32, 64 (int8: 16, 128).

    Returns:
        (values [rows, cols/2] same dtype, meta [rows, cols/16] int16 or, for int8,
        [rows, cols/32] int32), bit-identical to torch's
        sparse_semi_structured_from_dense_cutlass. Raises on groups with 3 or 4 nonzeros.
    """
    if _use_native("pack_24", backend, dense.device):
        values, meta = torch.ops.barber.pack_24(dense)
        return values, meta
    return reference.pack_24(dense)


@_fake("pack_24")
def _pack_24_fake(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake: pack_checks.h check_pack_24; values [rows, cols/2] and meta [rows, cols/word_cols]."""
    op = "barber::pack_24"
    torch._check(dense.dim() == 2, lambda: f"{op}: expected a 2-D dense tensor, got {dense.dim()} dimensions")
    meta_dtype, word_cols = _check_24_dtype(op, "dense", dense.dtype)[:2]
    rows, cols = dense.shape
    _check_24_dense_shape(op, dense.dtype, rows, cols)
    return dense.new_empty((rows, cols // 2)), dense.new_empty((rows, cols // word_cols), dtype=meta_dtype)


def unpack_24(values: torch.Tensor, meta: torch.Tensor, backend: Backend = "auto") -> torch.Tensor:
    """Inverse of pack_24: dense [rows, cols] with +0.0 at pruned positions.

    Args:
        values: [rows, cols/2] float16, bfloat16 or int8.
        meta: [rows, cols/16] int16 (int8 values: [rows, cols/32] int32) from pack_24.
    """
    if _use_native("unpack_24", backend, values.device):
        return torch.ops.barber.unpack_24(values, meta)
    return reference.unpack_24(values, meta)


@_fake("unpack_24")
def _unpack_24_fake(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Fake: pack_checks.h check_unpack_24; dense [rows, cols] of the dtype of values."""
    op = "barber::unpack_24"
    torch._check(values.dim() == 2, lambda: f"{op}: expected 2-D values, got {values.dim()} dimensions")
    torch._check(meta.dim() == 2, lambda: f"{op}: expected 2-D meta, got {meta.dim()} dimensions")
    meta_dtype, word_cols = _check_24_dtype(op, "values", values.dtype)[:2]
    torch._check(
        meta.device == values.device,
        lambda: f"{op}: expected meta on the device of values ({values.device}), got {meta.device}",
    )
    torch._check(
        meta.dtype == meta_dtype,
        lambda: f"{op}: expected meta of dtype {meta_dtype} for {values.dtype} values, got {meta.dtype}",
    )
    rows, cols = values.shape[0], 2 * values.shape[1]
    _check_24_dense_shape(op, values.dtype, rows, cols)
    torch._check(
        meta.shape[0] == rows and meta.shape[1] * word_cols == cols,
        lambda: f"{op}: expected meta of shape [{rows}, {cols // word_cols}] for values of shape "
        f"[{rows}, {cols // 2}], got [{meta.shape[0]}, {meta.shape[1]}]",
    )
    return values.new_empty((rows, cols))


def pack_bitmask(mask: torch.Tensor, backend: Backend = "auto") -> torch.Tensor:
    """Bool mask [rows, cols] -> uint8 [rows, ceil(cols/8)], bit j of byte b = column 8b+j.

    Same bytes as numpy.packbits(mask, axis=-1, bitorder="little"); padding bits are zero.
    """
    if _use_native("pack_bitmask", backend, mask.device):
        return torch.ops.barber.pack_bitmask(mask)
    return reference.pack_bitmask(mask)


@_fake("pack_bitmask")
def _pack_bitmask_fake(mask: torch.Tensor) -> torch.Tensor:
    """Fake: pack_checks.h check_pack_bitmask; uint8 [rows, ceil(cols/8)]."""
    op = "barber::pack_bitmask"
    torch._check(mask.dim() == 2, lambda: f"{op}: expected a 2-D mask, got {mask.dim()} dimensions")
    torch._check(mask.dtype == torch.bool, lambda: f"{op}: expected mask of dtype bool, got {mask.dtype}")
    rows, cols = mask.shape
    return mask.new_empty((rows, (cols + 7) // 8), dtype=torch.uint8)


def unpack_bitmask(bits: torch.Tensor, cols: int, backend: Backend = "auto") -> torch.Tensor:
    """uint8 bits [rows, ceil(cols/8)] -> bool mask [rows, cols]; padding bits are ignored."""
    if _use_native("unpack_bitmask", backend, bits.device):
        return torch.ops.barber.unpack_bitmask(bits, cols)
    return reference.unpack_bitmask(bits, cols)


@_fake("unpack_bitmask")
def _unpack_bitmask_fake(bits: torch.Tensor, cols: int) -> torch.Tensor:
    """Fake: pack_checks.h check_unpack_bitmask; bool [rows, cols]."""
    op = "barber::unpack_bitmask"
    torch._check(bits.dim() == 2, lambda: f"{op}: expected 2-D bits, got {bits.dim()} dimensions")
    torch._check(bits.dtype == torch.uint8, lambda: f"{op}: expected bits of dtype uint8, got {bits.dtype}")
    torch._check(cols >= 0, lambda: f"{op}: expected cols >= 0, got {cols}")
    nbytes = (cols + 7) // 8
    torch._check(
        bits.shape[1] == nbytes,
        lambda: f"{op}: expected bits.size(1) == ceil(cols/8) = {nbytes} for cols={cols}, got {bits.shape[1]}",
    )
    return bits.new_empty((bits.shape[0], cols), dtype=torch.bool)
