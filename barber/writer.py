"""Writing safetensors files one tensor at a time, and the output directory layout.

`write_safetensors` writes the header first (every dtype and shape is known in advance),
then streams each tensor's bytes as it is produced, so a multi-GB shard never has to be
held in memory (safetensors' own `save_file` needs the whole dict). Files are written
under a temporary name, fsynced and renamed: a file that exists is complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from barber.errors import BarberError

SAFETENSORS_DTYPES = {
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

WEIGHT_SUFFIXES = (".safetensors",)
INDEX_NAME = "model.safetensors.index.json"


class OutputError(BarberError):
    """The output could not be written (disk full, permissions)."""

    exit_code = 5


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, dtype and shape, and how to produce its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _header(specs: list[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for spec in specs:
        if spec.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{spec.name}: dtype {spec.dtype} cannot be stored in safetensors")
        header[spec.name] = {
            "dtype": SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file tensor by tensor (sorted by name); returns the data bytes.

    Each `produce()` is called once, in order, and must return a tensor of the announced
    dtype and shape; it is written and released before the next is produced.
    """
    specs = sorted(specs, key=lambda s: s.name)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(_header(specs, metadata))
            for spec in specs:
                tensor = spec.produce()
                if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                    raise ValueError(
                        f"{spec.name}: produced {tensor.dtype} {list(tensor.shape)}, "
                        f"announced {spec.dtype} {list(spec.shape)}"
                    )
                data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                f.write(memoryview(data.numpy()))
                del tensor, data
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return sum(s.nbytes for s in specs)


def write_json_atomic(path: Path, payload: object) -> None:
    """Write JSON to `path` through a temporary file, fsync and rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy every regular non-weight file (config, tokenizer, ...) from `src` to `dst`."""
    copied = []
    for item in sorted(src.iterdir()):
        if not item.is_file() or item.suffix in WEIGHT_SUFFIXES or item.name == INDEX_NAME:
            continue
        if item.name.startswith("."):
            continue
        try:
            shutil.copy2(item, dst / item.name)
        except OSError as exc:
            raise OutputError(f"cannot copy {item.name} to {dst}: {exc.strerror or exc}") from None
        copied.append(item.name)
    return copied


def fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
