"""Wall time by phase: `phase(times, name)` adds a `with` body's seconds to `times[name]` (block reports)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

__all__ = ["phase"]


@contextlib.contextmanager
def phase(times: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the `with` body to `times[name]`."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0
