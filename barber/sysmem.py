"""What the operating system says about this process's memory, and how to give memory back.

A leaf module (it imports nothing from barber): resident-set probes (`current_rss`, `peak_rss`,
`available_memory`), `release_free_memory` (glibc `malloc_trim`) and `drop_pages`, the one
`madvise(DONTNEED)` helper that keeps mapped files (checkpoint shards, disk-backed hidden states)
from accumulating in RSS.
"""

from __future__ import annotations

import mmap
import os

_LIBC: list = []  # the loaded C library, once (or None where there is none to load)


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc `malloc_trim`); a no-op elsewhere.

    Tensors of a few MB (activations of short sequences) live on the heap, and the holes they leave
    stay resident; trimming at block boundaries keeps that from growing with depth.
    """
    if not _LIBC:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            _LIBC.append(libc if hasattr(libc, "malloc_trim") else None)
        except OSError:
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0].malloc_trim(0)


def drop_pages(mapping: mmap.mmap, start: int, end: int) -> None:
    """Tell the kernel the mapped pages of bytes [start, end) are not needed, so they leave our RSS.

    The file keeps the data (a copy-on-write mapping loses its private changes). A no-op where
    madvise is missing or refuses.
    """
    if end <= start or not hasattr(mapping, "madvise"):
        return
    lo = start - start % mmap.PAGESIZE
    try:
        mapping.madvise(mmap.MADV_DONTNEED, lo, end - lo)
    except (OSError, ValueError):  # pragma: no cover - platform without madvise
        pass


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int:
    """Resident set size of this process now (VmRSS), in bytes."""
    rss = _status_bytes("VmRSS")
    if rss is None:  # pragma: no cover - no /proc
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return rss


def peak_rss() -> int:
    """Peak resident set size of this process so far (VmHWM), in bytes."""
    rss = _status_bytes("VmHWM")
    if rss is None:  # pragma: no cover - no /proc
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return rss


def available_memory() -> int:
    """Memory the system could still give: MemAvailable of /proc/meminfo, else all physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    if available:
                        return available
                    break
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
