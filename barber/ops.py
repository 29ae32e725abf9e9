"""Typed wrappers around the native ops (the only module that calls torch.ops.barber).

Each op has a fake (meta) implementation so it traces under torch.compile, and a
`backend` argument: "auto" uses the native kernel when the extension is built and the
pure-torch reference (barber.reference) otherwise; "native" insists on the kernel;
"torch" forces the reference. Masks are not differentiable.
"""

from __future__ import annotations

from typing import Literal

import torch

from barber import _native, reference

Backend = Literal["auto", "native", "torch"]

build_info = _native.build_info

# --- which device types have native kernels ------------------------------------------

_devices: str | None = None  # comma-separated device types with native kernels; "" without the extension


def _constant_under_compile(fn):
    """`torch.compiler.assume_constant_result`, without importing torch._dynamo at import time.

    The torch decorator imports torch._dynamo (about 1.5 s and 70 MB per process, paid by every
    CLI run that never compiles) only to set this marker attribute, which dynamo reads when it
    traces a call. tests/test_mask_ops.py checks that the torch decorator still sets exactly this.
    """
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile
def _native_devices() -> str:
    """Comma-separated device types with native kernels ("" without the extension).

    Decided once; registers every op's fake kernel then. Runs eagerly even while torch.compile
    traces a wrapper (so the wrapper's branch is a constant in the graph). Raises when
    BARBER_REQUIRE_NATIVE is set and the extension is missing.
    """
    global _devices
    if _devices is None:
        if _native.available():
            _register_mask_fakes()
            _register_pack_fakes()
            _devices = "cpu,meta,cuda" if "cuda" in _native.build_info() else "cpu,meta"
        else:
            _devices = ""
    return _devices


def _use_native(op: str, backend: Backend, device: torch.device) -> bool:
    """Whether op `op` runs the native kernel for a tensor on `device`.

    "auto" uses it when the extension is built with kernels for the device (otherwise the
    reference); "native" raises instead of falling back; "torch" never uses it.
    """
    if backend == "torch":
        return False
    if backend not in ("auto", "native"):
        raise ValueError(f"barber.ops.{op}: expected backend 'auto', 'native' or 'torch', got {backend!r}")
    native_devices = _native_devices()
    if device.type in native_devices.split(","):
        return True
    if backend == "native":
        if not native_devices:
            raise RuntimeError(f"barber.ops.{op}: backend='native' but the barber._C extension is not available")
        raise RuntimeError(
            f"barber.ops.{op}: backend='native' but the extension (built for {native_devices}) "
            f"has no kernel for device {device.type}"
        )
    return False


# --- mask ops: topk_mask, nm_mask, rebuild_mask ------------------------------------


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


def _register_mask_fakes() -> None:
    """Fake (meta) kernels of the mask ops, so they trace under torch.compile and opcheck.

    They need the op schemas, which only the loaded native library defines; the checks
    mirror csrc/checks.h for what is visible without values (NaN and N:M errors are not).
    """

    def check_scores(op: str, scores: torch.Tensor) -> None:
        torch._check(
            scores.dim() == 2,
            lambda: f"barber::{op}: expected scores to be 2-D [rows, cols], got shape {list(scores.shape)}",
        )
        torch._check(
            scores.dtype in (torch.float32, torch.float16, torch.bfloat16),
            lambda: f"barber::{op}: expected scores of dtype float32, float16 or bfloat16, got {scores.dtype}",
        )

    @torch.library.register_fake("barber::topk_mask")
    def _(scores: torch.Tensor, k: int) -> torch.Tensor:
        check_scores("topk_mask", scores)
        torch._check(0 <= k <= scores.shape[1], lambda: f"barber::topk_mask: expected 0 <= k <= cols, got k={k}")
        return torch.empty_like(scores, dtype=torch.bool, memory_format=torch.contiguous_format)

    @torch.library.register_fake("barber::nm_mask")
    def _(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
        check_scores("nm_mask", scores)
        torch._check(m >= 1 and 0 <= n <= m, lambda: f"barber::nm_mask: expected 0 <= n <= m, m >= 1, got {n}:{m}")
        torch._check(scores.shape[1] % m == 0, lambda: f"barber::nm_mask: expected cols divisible by m={m}")
        return torch.empty_like(scores, dtype=torch.bool, memory_format=torch.contiguous_format)

    @torch.library.register_fake("barber::rebuild_mask")
    def _(scores: torch.Tensor, mask: torch.Tensor, ratio: float, m: int = 0) -> torch.Tensor:
        check_scores("rebuild_mask", scores)
        torch._check(mask.dtype == torch.bool, lambda: f"barber::rebuild_mask: expected a bool mask, got {mask.dtype}")
        torch._check(mask.shape == scores.shape, lambda: "barber::rebuild_mask: expected mask of the shape of scores")
        return torch.empty_like(scores, dtype=torch.bool, memory_format=torch.contiguous_format)


# --- packing ops: pack_24, unpack_24, pack_bitmask, unpack_bitmask -----------------

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


def unpack_24(values: torch.Tensor, meta: torch.Tensor, backend: Backend = "auto") -> torch.Tensor:
    """Inverse of pack_24: dense [rows, cols] with +0.0 at pruned positions.

    Args:
        values: [rows, cols/2] float16, bfloat16 or int8.
        meta: [rows, cols/16] int16 (int8 values: [rows, cols/32] int32) from pack_24.
    """
    if _use_native("unpack_24", backend, values.device):
        return torch.ops.barber.unpack_24(values, meta)
    return reference.unpack_24(values, meta)


def pack_bitmask(mask: torch.Tensor, backend: Backend = "auto") -> torch.Tensor:
    """Bool mask [rows, cols] -> uint8 [rows, ceil(cols/8)], bit j of byte b = column 8b+j.

    Same bytes as numpy.packbits(mask, axis=-1, bitorder="little"); padding bits are zero.
    """
    if _use_native("pack_bitmask", backend, mask.device):
        return torch.ops.barber.pack_bitmask(mask)
    return reference.pack_bitmask(mask)


def unpack_bitmask(bits: torch.Tensor, cols: int, backend: Backend = "auto") -> torch.Tensor:
    """uint8 bits [rows, ceil(cols/8)] -> bool mask [rows, cols]; padding bits are ignored."""
    if _use_native("unpack_bitmask", backend, bits.device):
        return torch.ops.barber.unpack_bitmask(bits, cols)
    return reference.unpack_bitmask(bits, cols)


def _register_pack_fakes() -> None:
    """Fake (meta) kernels of the packing ops, so they trace under torch.compile and opcheck.

    They need the op schemas, which only the loaded native library defines; the checks
    mirror csrc/pack_checks.h (shapes and dtypes only: values are not visible).
    """

    def layout(dtype: torch.dtype) -> tuple[torch.dtype, int]:
        torch._check(dtype in (torch.float16, torch.bfloat16, torch.int8), lambda: f"unsupported dtype {dtype}")
        return (torch.int32, 32) if dtype == torch.int8 else (torch.int16, 16)

    @torch.library.register_fake("barber::pack_24")
    def _(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        torch._check(dense.dim() == 2, lambda: "barber::pack_24: expected a 2-D dense tensor")
        meta_dtype, word_cols = layout(dense.dtype)
        rows, cols = dense.shape
        torch._check(cols % word_cols == 0, lambda: f"barber::pack_24: bad cols {cols}")
        values = dense.new_empty((rows, cols // 2))
        return values, dense.new_empty((rows, cols // word_cols), dtype=meta_dtype)

    @torch.library.register_fake("barber::unpack_24")
    def _(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        torch._check(values.dim() == 2 and meta.dim() == 2, lambda: "barber::unpack_24: expected 2-D inputs")
        meta_dtype, word_cols = layout(values.dtype)
        torch._check(meta.dtype == meta_dtype, lambda: f"barber::unpack_24: expected meta of dtype {meta_dtype}")
        rows, half = values.shape
        torch._check(meta.shape[0] == rows and meta.shape[1] * word_cols == 2 * half, lambda: "bad meta shape")
        return values.new_empty((rows, 2 * half))

    @torch.library.register_fake("barber::pack_bitmask")
    def _(mask: torch.Tensor) -> torch.Tensor:
        torch._check(mask.dim() == 2 and mask.dtype == torch.bool, lambda: "barber::pack_bitmask: bad mask")
        rows, cols = mask.shape
        return mask.new_empty((rows, (cols + 7) // 8), dtype=torch.uint8)

    @torch.library.register_fake("barber::unpack_bitmask")
    def _(bits: torch.Tensor, cols: int) -> torch.Tensor:
        torch._check(bits.dim() == 2 and bits.dtype == torch.uint8, lambda: "barber::unpack_bitmask: bad bits")
        torch._check(bits.shape[1] == (cols + 7) // 8, lambda: "barber::unpack_bitmask: cols do not match")
        return bits.new_empty((bits.shape[0], cols), dtype=torch.bool)
