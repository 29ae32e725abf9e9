"""Shared test configuration: the native and backend fixtures, devices, the BARBER_REQUIRE_NATIVE switch."""

from __future__ import annotations

import pytest
import torch

from barber import _native


def skip_or_fail(reason: str) -> None:
    """Skip with `reason`, or fail when the environment requires the native build (BARBER_REQUIRE_NATIVE=1)."""
    if _native.required():
        pytest.fail(f"BARBER_REQUIRE_NATIVE is set: {reason}")
    pytest.skip(reason)


def devices() -> list[str]:
    """Devices to run op tests on: cpu, plus cuda wherever a GPU exists."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def native() -> None:
    """Skips when barber._C is not built (under BARBER_REQUIRE_NATIVE=1, _native raises instead)."""
    if not _native.available():
        skip_or_fail("barber._C is not built: the native ops are unavailable")


@pytest.fixture(params=["torch", "native"])
def backend(request) -> str:
    """The implementation under test: the pure-torch reference ("torch") or the kernels ("native")."""
    if request.param == "native":
        request.getfixturevalue("native")
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: the same arithmetic as its single-threaded subprocesses, and no
    spinning OpenMP threads on a busy machine (which makes tiny runs 50x slower).
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
