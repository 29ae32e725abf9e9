"""Hidden-state buffers [N, T, d]: on the compute device, in host memory, or in a mapped file.

`Placement` names the three; `barber.budget` chooses one, `HiddenBuffer` holds the states there.
A host buffer on a GPU run is page-locked and copied to the GPU one micro-batch at a time; a disk
buffer is a file under the work directory, mapped and read one micro-batch at a time, its pages
dropped after each use so they never accumulate in RSS. Placement never changes a value.
"""

from __future__ import annotations

import enum
import math
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from barber.sysmem import drop_pages


class Placement(enum.StrEnum):
    """Where hidden states live. A member equals its value ("device", "host", "disk") as a string."""

    DEVICE = "device"  # the compute device: GPU memory, or plain RAM on a CPU run
    HOST = "host"  # host RAM (page-locked on a GPU run), copied to the device one micro-batch at a time
    DISK = "disk"  # a file under the work directory, mapped and read one micro-batch at a time

    @classmethod
    def _missing_(cls, value: object) -> "Placement | None":
        # "pinned" was HOST's name before: old commands, reports and states keep working
        return cls.HOST if value == "pinned" else None


class HiddenBuffer:
    """A [N, T, d] buffer of hidden states on the device, in host memory or in a mapped file.

    `get(rows)` returns those samples on the compute device (a view when they already live there,
    else a copy); `put(rows, value)` stores them. A disk buffer drops the mapped pages after every
    access, so only the micro-batch in use counts towards RSS; the data stays in the file (and the
    page cache).

    Attributes:
        tensor: the whole buffer (for a disk buffer: backed by the file mapping).
        placement: a `Placement` (given as one or as its value; "pinned" means HOST).
    """

    def __init__(self, tensor: torch.Tensor, placement: Placement | str, device: torch.device,
                 path: Path | None = None, mapping: mmap.mmap | None = None):
        self.tensor = tensor
        self.placement = Placement(placement)
        self.device = device
        self.path = path
        self._mapping = mapping
        self._row_bytes = tensor[0].numel() * tensor.element_size() if tensor.shape[0] else 0
        self._map_offset = 0  # where the tensor starts in `mapping`
        self._writable = True  # False for a mapped state file (map_file)

    @classmethod
    def allocate(cls, shape: tuple[int, ...], dtype: torch.dtype, placement: Placement | str,
                 device: str | torch.device, path: Path | None = None) -> "HiddenBuffer":
        """An uninitialised buffer; `path` is the file of a disk buffer (created, truncated to size).

        A host buffer is page-locked when `device` is a GPU (faster copies), plain memory otherwise.

        Raises:
            ValueError: an unknown placement, or a disk buffer without `path`.
        """
        device = torch.device(device)
        placement = Placement(placement)
        if placement is Placement.DEVICE:
            return cls(torch.empty(shape, dtype=dtype, device=device), placement, device)
        if placement is Placement.HOST:
            pin = device.type == "cuda"
            return cls(torch.empty(shape, dtype=dtype, pin_memory=pin), placement, device)
        if path is None:
            raise ValueError("a disk buffer needs a path")
        nbytes = math.prod(shape) * dtype.itemsize
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w+b") as f:
            f.truncate(max(nbytes, 1))
            mapping = mmap.mmap(f.fileno(), max(nbytes, 1))
        flat = (
            torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes) if nbytes else torch.empty(0, dtype=torch.uint8)
        )
        return cls(flat.view(dtype).view(shape), placement, device, path, mapping)

    @classmethod
    def map_file(cls, path: Path, offset: int, shape: tuple[int, ...], dtype: torch.dtype,
                 device: str | torch.device = "cpu") -> "HiddenBuffer":
        """A copy-on-write mapping of `shape` x `dtype` bytes at `offset` in the file `path`.

        Nothing is read up front, and `get` drops the pages it read, as for a disk buffer; the
        file is never written nor removed (`close` leaves it).

        Raises:
            OSError, ValueError: the file cannot be mapped or is shorter than the tensor.
        """
        nbytes = math.prod(shape) * dtype.itemsize
        device = torch.device(device)
        if nbytes == 0:
            return cls(torch.empty(shape, dtype=dtype), Placement.HOST, device)
        with open(path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if len(mapping) < offset + nbytes:
            raise ValueError(f"{path} is shorter than the {nbytes} bytes at offset {offset}")
        flat = torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=offset)
        buf = cls(flat.view(dtype).view(shape), Placement.DISK, device, None, mapping)
        buf._map_offset, buf._writable = offset, False
        return buf

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    def host_pieces(self, max_bytes: int = 64 * 1024 * 1024) -> Iterator[torch.Tensor]:
        """The whole buffer as consecutive pieces along samples, each at most about `max_bytes`.

        A disk buffer yields host copies and drops their pages, so streaming it to a file keeps
        one piece in RSS; other buffers yield views (copied to the host by whoever writes them).
        """
        n = self.tensor.shape[0]
        rows = max(1, max_bytes // self._row_bytes) if self._row_bytes else max(n, 1)
        for start in range(0, n, rows):
            c = slice(start, min(start + rows, n))
            if self.placement is Placement.DISK:
                piece = self.tensor[c].clone()
                self._drop(c)
                yield piece
            else:
                yield self.tensor[c]

    def get(self, rows: slice) -> torch.Tensor:
        """Samples `rows` on the compute device."""
        if self.placement is Placement.DEVICE:
            return self.tensor[rows]
        if self.placement is Placement.HOST:
            return self.tensor[rows].to(self.device, non_blocking=False)
        out = self.tensor[rows].to(self.device, copy=True)
        self._drop(rows)
        return out

    def put(self, rows: slice, value: torch.Tensor) -> None:
        """Store `value` as samples `rows` (converted to the buffer's dtype)."""
        if not self._writable:
            raise RuntimeError("a mapped state file is read-only")
        self.tensor[rows] = value
        if self.placement is Placement.DISK:
            self._drop(rows)

    def _drop(self, rows: slice) -> None:
        """Drop the mapped pages of `rows` from this process (the file keeps the data)."""
        start, stop, _ = rows.indices(self.tensor.shape[0])
        if self._mapping is not None:
            offset = self._map_offset
            drop_pages(self._mapping, start * self._row_bytes + offset, stop * self._row_bytes + offset)

    def close(self) -> None:
        """Remove a disk buffer's file (its mapping lives until the last tensor using it is gone)."""
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None
