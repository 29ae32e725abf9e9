"""Shared test configuration: markers, device list, the BARBER_REQUIRE_NATIVE switch."""

from __future__ import annotations

import os

import pytest
import torch


def require_native() -> bool:
    """CI sets BARBER_REQUIRE_NATIVE=1: a missing native build then fails instead of skipping."""
    return os.environ.get("BARBER_REQUIRE_NATIVE", "") not in ("", "0")


def skip_or_fail(reason: str) -> None:
    """Skip with `reason`, or fail when the environment requires the native build."""
    if require_native():
        pytest.fail(f"BARBER_REQUIRE_NATIVE is set: {reason}")
    pytest.skip(reason)


def devices() -> list[str]:
    """Devices to run op tests on: cpu, plus cuda wherever a GPU exists."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: the same arithmetic as its single-threaded subprocesses, and no
    spinning OpenMP threads on a busy machine (which makes tiny runs 50x slower).
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
