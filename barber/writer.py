"""Writing safetensors files one tensor at a time, and other files, atomically (temporary name, fsync, rename).

`write_safetensors` writes the header first (every dtype and shape is known in advance),
then streams each tensor's bytes as it is produced, so a multi-GB shard never has to be
held in memory (safetensors' own `save_file` needs the whole dict). Tensors are written in
chunks of at most `CHUNK_BYTES` (a GPU tensor is copied to the host one chunk at a time).
Files are written under a temporary name (`.NAME.tmp`), fsynced and renamed: a file that
exists is complete. Every byte goes through `_write_bytes`, so tests can simulate a full disk.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from barber.errors import OutputError
from barber.layout import INDEX_FILE, REPORT_FILE, REPORT_MD, REPORT_PNG
from barber.safetensors_format import DTYPE_NAMES

WEIGHT_SUFFIXES = (".safetensors",)
CHUNK_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, dtype and shape, and how to produce its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor | Iterable[torch.Tensor]]  # the tensor, or its pieces along dim 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _header(specs: list[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for spec in specs:
        if spec.dtype not in DTYPE_NAMES:
            raise ValueError(f"{spec.name}: dtype {spec.dtype} cannot be stored in safetensors")
        header[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def _write_bytes(f, data) -> None:
    """Write a bytes-like object to an open binary file (the single place file data is written)."""
    f.write(data)


def temporary_path(path: Path) -> Path:
    """The name a file is written under before it is renamed to `path`."""
    return path.with_name(f".{path.name}.tmp")


def _write_tensor(f, tensor: torch.Tensor) -> None:
    """Stream a tensor's raw bytes (C order) to `f`, at most CHUNK_BYTES at a time."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    for start in range(0, flat.numel(), CHUNK_BYTES):
        chunk = flat[start : start + CHUNK_BYTES].to("cpu")
        _write_bytes(f, memoryview(chunk.numpy()))


@contextlib.contextmanager
def _atomic(path: Path, what: str) -> Iterator[BinaryIO]:
    """Write `path` through a temporary file: yield it open, then fsync and rename it into place.

    Any failure removes the temporary file; an OSError (disk full, permissions) becomes a one-line
    OutputError that says `what` failed.
    """
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{what}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_safetensors(path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file tensor by tensor (sorted by name); returns the data bytes.

    Each `produce()` is called once, in order, and returns either a tensor of the announced dtype
    and shape or an iterable of pieces that concatenate along dim 0 to it (so that a large tensor
    need never be whole in memory); each is written and released before the next is produced.
    """
    specs = sorted(specs, key=lambda s: s.name)
    with _atomic(path, f"cannot write {path}") as f:
        _write_bytes(f, _header(specs, metadata))
        for spec in specs:
            produced = spec.produce()
            pieces = [produced] if isinstance(produced, torch.Tensor) else produced
            rows = 0
            for piece in pieces:
                if (
                    piece.dtype != spec.dtype
                    or tuple(piece.shape[1:]) != spec.shape[1:]
                    or piece.dim() != len(spec.shape)
                ):
                    raise ValueError(
                        f"{spec.name}: produced {piece.dtype} {list(piece.shape)}, "
                        f"announced {spec.dtype} {list(spec.shape)}"
                    )
                rows += piece.shape[0] if spec.shape else 1
                _write_tensor(f, piece)
                del piece
            if rows != (spec.shape[0] if spec.shape else 1):
                raise ValueError(f"{spec.name}: produced {rows} rows, announced {list(spec.shape)}")
            del produced, pieces
    return sum(s.nbytes for s in specs)


def write_json_atomic(path: Path, payload: object) -> None:
    """Write JSON to `path` through a temporary file, fsync and rename."""
    data = (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode()
    with _atomic(path, f"cannot write {path}") as f:
        _write_bytes(f, data)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file, fsync and rename."""
    with _atomic(path, f"cannot write {path}") as f:
        _write_bytes(f, data)


def copy_file_atomic(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` (data and permission bits/times) through a temporary name, fsync and rename."""
    with _atomic(dst, f"cannot copy {src.name} to {dst.parent}") as fout, open(src, "rb") as fin:
        while block := fin.read(CHUNK_BYTES):
            _write_bytes(fout, block)
        fout.flush()  # before copystat: a later write would change the copied times
        shutil.copystat(src, fout.name)


def copy_side_files(src: Path, dst: Path, skip: Collection[str] = ()) -> list[str]:
    """Copy every regular non-weight file (config, tokenizer, ...) from `src` to `dst`, except `skip`.

    From a barber output (it has REPORT_FILE), its report.md and report.png are not copied either.
    """
    copied = []
    if (src / REPORT_FILE).is_file():
        skip = {*skip, REPORT_MD, REPORT_PNG}
    for item in sorted(src.iterdir()):
        if not item.is_file() or item.suffix in WEIGHT_SUFFIXES or item.name == INDEX_FILE or item.name in skip:
            continue
        if item.name.startswith("."):
            continue
        copy_file_atomic(item, dst / item.name)
        copied.append(item.name)
    return copied


def fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise OutputError(f"cannot sync {path}: {exc.strerror or exc}") from None
