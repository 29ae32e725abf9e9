"""Loads the compiled extension `barber._C` once, on first use.

`available()` says whether the native ops are registered; `build_info()` says what was
compiled ("cpu", "cpu,cuda13.0"). Nothing is loaded at import time of this module.
Set BARBER_REQUIRE_NATIVE=1 (as CI does) to turn a missing extension into an error
instead of a fallback to the pure-torch reference.
"""

from __future__ import annotations

import functools
import logging
import os

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _load() -> tuple[bool, str]:
    import torch  # noqa: F401  (loads libtorch, which barber._C links against)

    try:
        from barber import _C  # noqa: F401  (importing registers torch.ops.barber.*)
    except ImportError as exc:
        return False, f"barber._C could not be imported: {exc}"
    return True, ""


def required() -> bool:
    """True when the environment demands the native build (BARBER_REQUIRE_NATIVE=1)."""
    return os.environ.get("BARBER_REQUIRE_NATIVE", "") not in ("", "0")


def available() -> bool:
    """Whether the native ops can be used. Raises if required but missing."""
    ok, why = _load()
    if not ok:
        if required():
            raise RuntimeError(f"BARBER_REQUIRE_NATIVE is set but {why}")
        log.info("native ops unavailable, using the pure-torch reference (%s)", why)
    return ok


def build_info() -> str:
    """What the extension was built with, e.g. "cpu" or "cpu,cuda13.0"; "none" if missing."""
    if not available():
        return "none"
    import torch

    return torch.ops.barber._build_info()
