"""The packed output format (`--save-format packed`): what is stored for a pruned linear, packing and unpacking.

A packed output is a barber output whose shards, shard names and every tensor other than a pruned linear
are those of the dense output; each pruned linear ``NAME`` (a ``....weight`` [rows, cols]) is replaced by
two tensors, in one of two encodings (`ENCODINGS`):

- ``cutlass-2:4`` (2:4 runs of float16/bfloat16 weights whose shape CUTLASS accepts: rows a multiple of 32,
  cols of 64): ``NAME.values`` [rows, cols/2] (the weight's dtype) and ``NAME.meta`` [rows, cols/16] int16,
  PyTorch's CUTLASS (sm80) semi-structured layout, bit-identical to torch's
  ``sparse_semi_structured_from_dense_cutlass`` (`barber.ops.pack_24`); `torch.sparse.to_sparse_semi_structured`
  rebuilds its own layout from the dense weight on the GPU at load time (`barber.load`).
- ``bitmask`` (4:8, unstructured, and 2:4 linears the CUTLASS layout cannot hold): ``NAME.values`` [nnz]
  (the weight's dtype), the stored entries in row-major order, and ``NAME.bitmask`` uint8 [rows, ceil(cols/8)],
  bit j of byte b of a row = column 8b+j (numpy ``packbits(bitorder="little")``, compressed-tensors'
  layout). An entry is stored when its bits are not all zero, so a kept -0.0 survives and +0.0 is implied.

Unpacking gives the dense output bit for bit: every position not stored is +0.0. `plan` checks that (a
CUTLASS round trip that would not be exact, e.g. a group with 3 nonzeros or a kept -0.0, falls back to
``bitmask``). Where the encodings are recorded (config.json's ``barber`` section, each shard's
``__metadata__``) is `barber.output`'s; this module is math and names only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from barber.errors import CheckpointError, UsageError
from barber.safetensors_format import DTYPE_NAMES, DTYPES

__all__ = ["BITMASK", "CUTLASS_24", "ENCODINGS", "FORMAT_VERSION", "SAVE_FORMATS", "Packed", "SaveFormat",
           "component_names", "pack", "plan", "unpack"]

CUTLASS_24 = "cutlass-2:4"
BITMASK = "bitmask"
#: encoding -> its two tensors' name suffixes (values first).
ENCODINGS = {CUTLASS_24: (".values", ".meta"), BITMASK: (".values", ".bitmask")}
SAVE_FORMATS = ("dense", "packed")
#: Version of the packed layout (config.json barber.version).
FORMAT_VERSION = 1

_CUTLASS_DTYPES = (torch.float16, torch.bfloat16)
_CUTLASS_MULTIPLE = (32, 64)  # rows, cols


@dataclass(frozen=True)
class SaveFormat:
    """How the output is stored: `format` "dense" or "packed", and `dtype` (None: each tensor's input dtype).

    Neither changes which weights are kept, only how they are written, so neither is part of a run's
    fingerprint: a resumed run may pick another one.
    """

    format: str = "dense"
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.format not in SAVE_FORMATS:
            raise UsageError(f"--save-format must be one of {', '.join(SAVE_FORMATS)}, got {self.format!r}")
        if self.dtype is not None and not self.dtype.is_floating_point:
            raise UsageError(f"--save-dtype must be a floating dtype, got {self.dtype}")

    @property
    def is_default(self) -> bool:
        """Dense in the input's dtypes: the output is written exactly as without a save format."""
        return self.format == "dense" and self.dtype is None

    def check(self, pattern, weight_dtype: torch.dtype) -> None:
        """Refuse a combination that cannot be stored as asked (UsageError, one line).

        A packed 2:4 output needs 16-bit weights (CUTLASS has no float32 2:4 layout): the input's dtype
        `weight_dtype` when no `dtype` is given.
        """
        if self.format != "packed" or not (pattern.structured and pattern.m == 4 and pattern.n <= 2):
            return
        dtype = self.dtype or weight_dtype
        if dtype not in _CUTLASS_DTYPES:
            name = str(dtype).removeprefix("torch.")
            given = f"--save-dtype {name}" if self.dtype is not None else f"the checkpoint's weights are {name}"
            raise UsageError(
                f"--save-format packed with --pattern {pattern} stores CUTLASS 2:4, which needs 16-bit weights, "
                f"but {given}; add --save-dtype bfloat16 (or float16)"
            )

    def describe(self) -> dict:
        return {"format": self.format, "dtype": None if self.dtype is None else str(self.dtype).removeprefix("torch.")}


@dataclass(frozen=True)
class Packed:
    """How one pruned linear is stored: its encoding, dense shape and dtype, and the stored entry count."""

    encoding: str
    shape: tuple[int, int]
    dtype: torch.dtype
    nnz: int  # bitmask: entries in NAME.values; cutlass-2:4: rows * cols / 2

    def component_shapes(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """suffix -> (dtype, shape) of the two stored tensors."""
        rows, cols = self.shape
        values, second = ENCODINGS[self.encoding]
        if self.encoding == CUTLASS_24:
            return {values: (self.dtype, (rows, cols // 2)), second: (torch.int16, (rows, cols // 16))}
        return {values: (self.dtype, (self.nnz,)), second: (torch.uint8, (rows, (cols + 7) // 8))}

    @property
    def nbytes(self) -> int:
        """Bytes of the two stored tensors."""
        return sum(d.itemsize * _numel(s) for d, s in self.component_shapes().values())

    def to_json(self) -> dict:
        return {"encoding": self.encoding, "shape": list(self.shape), "dtype": DTYPE_NAMES[self.dtype],
                "nnz": self.nnz}

    @classmethod
    def from_json(cls, name: str, d: object) -> Packed:
        """Read one entry of config.json's barber.tensors (CheckpointError when malformed)."""
        try:
            encoding, shape, dtype, nnz = d["encoding"], d["shape"], DTYPES[d["dtype"]], int(d["nnz"])
            ok = encoding in ENCODINGS and len(shape) == 2 and all(type(s) is int and s > 0 for s in shape)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"config.json: barber.tensors[{name!r}] is not a valid packed-tensor entry")
        return cls(encoding, (shape[0], shape[1]), dtype, nnz)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def component_names(name: str, packed: Packed) -> list[str]:
    """The two stored tensors' names of packed linear `name` (values first)."""
    return [name + suffix for suffix in ENCODINGS[packed.encoding]]


def _bits_nonzero(w: torch.Tensor) -> torch.Tensor:
    """Entries whose bits are not all zero (+0.0 is the only float with all-zero bits)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[w.dtype.itemsize]
    return w.view(ints) != 0


def _cutlass_fits(w: torch.Tensor, pattern) -> bool:
    rows, cols = w.shape
    return (
        pattern.structured and pattern.m == 4 and pattern.n <= 2 and w.dtype in _CUTLASS_DTYPES
        and rows % _CUTLASS_MULTIPLE[0] == 0 and cols % _CUTLASS_MULTIPLE[1] == 0
    )


def _cutlass_exact(w: torch.Tensor) -> bool:
    """Whether CUTLASS 2:4 holds `w` bit for bit: at most 2 stored entries per group of 4, no -0.0 among them."""
    stored = _bits_nonzero(w)
    if bool((stored.view(w.shape[0], -1, 4).sum(-1) > 2).any()):
        return False
    return not bool((stored & (w == 0)).any())  # a -0.0 entry: pack_24 would not keep its sign


def plan(w: torch.Tensor, pattern) -> Packed:
    """The encoding of pruned linear `w` [rows, cols] of a run with `pattern` (see the module doc)."""
    shape = (int(w.shape[0]), int(w.shape[1]))
    if _cutlass_fits(w, pattern) and _cutlass_exact(w):
        return Packed(CUTLASS_24, shape, w.dtype, shape[0] * shape[1] // 2)
    return Packed(BITMASK, shape, w.dtype, int(_bits_nonzero(w).sum()))


def pack(w: torch.Tensor, packed: Packed) -> dict[str, torch.Tensor]:
    """suffix -> stored tensor of `w` in the encoding `plan` chose for it."""
    from barber import ops

    values, second = ENCODINGS[packed.encoding]
    if packed.encoding == CUTLASS_24:
        v, meta = ops.pack_24(w.contiguous())
        return {values: v, second: meta}
    stored = _bits_nonzero(w)
    return {values: w[stored], second: ops.pack_bitmask(stored)}


def unpack(packed: Packed, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense weight from its two stored tensors (suffix -> tensor), +0.0 where nothing is stored."""
    from barber import ops

    values, second = ENCODINGS[packed.encoding]
    if packed.encoding == CUTLASS_24:
        return ops.unpack_24(parts[values], parts[second])
    mask = ops.unpack_bitmask(parts[second], packed.shape[1])
    if int(mask.sum()) != parts[values].numel():
        raise CheckpointError(f"a bitmask marks {int(mask.sum())} entries for {parts[values].numel()} stored values")
    dense = torch.zeros(packed.shape, dtype=packed.dtype)
    dense[mask] = parts[values]
    return dense
