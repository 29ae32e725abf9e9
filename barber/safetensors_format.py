"""The safetensors file format: its dtype names and a bounded, validating header reader.

A safetensors file is an 8-byte little-endian header length, a JSON header (optional string map
``__metadata__``; per tensor its ``dtype``, ``shape`` and ``data_offsets`` into the data section),
then the data. `read_header` parses the header here, not with the safetensors library, with bounded
reads (length capped at `MAX_HEADER_BYTES`; every entry checked against the file size), so a
corrupt or hostile file gives a one-line `CheckpointError` rather than a crash or a huge allocation.
`barber.writer` writes the same format with the same dtype table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from barber.errors import CheckpointError

#: Largest accepted safetensors JSON header (the safetensors library uses the same 100 MB cap).
MAX_HEADER_BYTES = 100 * 1024 * 1024

#: torch dtype -> its safetensors name.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
#: safetensors name -> torch dtype.
DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its shard file, dtype, shape and absolute byte range in the file."""

    shard: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    """One file's header: `raw` (the 8-byte length and the JSON, as stored), metadata, tensors."""

    raw: bytes
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]


def read_header(path: Path, shard: str | None = None) -> Header:
    """Parse and validate the header of one safetensors file.

    Args:
        path: the file.
        shard: the name recorded in each `TensorInfo` (default: the file name).

    Returns:
        the raw header bytes, the metadata and every tensor's `TensorInfo` (absolute file offsets).

    Raises:
        CheckpointError: unreadable, truncated, oversized header, bad JSON, or entries that do not fit the file.
    """
    shard = shard or path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            n = int.from_bytes(prefix, "little")
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: corrupt safetensors header (claims {n} bytes)")
            if 8 + n > size:
                raise CheckpointError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, oversized integers, absurd nesting
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start, data_size = 8 + n, size - 8 - n
    metadata: dict[str, str] = {}
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not a string map)")
            metadata = dict(entry)
            continue
        out[name] = _tensor_info(path, shard, name, entry, data_start, data_size)
    return Header(prefix + raw, metadata, out)


def read_safetensors_header(path: Path, shard: str | None = None) -> dict[str, TensorInfo]:
    """tensor name -> `TensorInfo` of one safetensors file (`read_header`'s tensors)."""
    return read_header(path, shard).tensors


def _tensor_info(path: Path, shard: str, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    """Validate one header entry: dtype known, shape of non-negative ints, offsets matching and inside the file."""
    bad = f"{path}: corrupt safetensors header (entry {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{bad} is not an object)")
    dtype_name = entry.get("dtype")
    dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise CheckpointError(f"{bad} has unsupported dtype {entry.get('dtype')!r})")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
        raise CheckpointError(f"{bad} has an invalid shape)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise CheckpointError(f"{bad} has invalid data_offsets)")
    begin, end = offsets
    nbytes = _nbytes(shape, dtype.itemsize, data_size)
    if nbytes is None:
        raise CheckpointError(f"{path}: truncated safetensors file (tensor {name!r} of shape {shape} exceeds the file)")
    if not 0 <= begin <= end or end - begin != nbytes:
        raise CheckpointError(f"{bad}: data_offsets {offsets} do not match shape {shape})")
    if end > data_size:
        raise CheckpointError(f"{path}: truncated safetensors file (tensor {name!r} ends past the end of the file)")
    return TensorInfo(shard, dtype, tuple(shape), data_start + begin, data_start + end)


def _nbytes(shape: list[int], itemsize: int, limit: int) -> int | None:
    """Bytes of a tensor of `shape`, or None when that exceeds `limit` (computed without huge integers)."""
    if 0 in shape:
        return 0
    n = itemsize
    for s in shape:
        n *= s
        if n > limit:
            return None
    return n


