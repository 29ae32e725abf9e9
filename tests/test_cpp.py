"""Runs the C++ unit tests of csrc/core (built by CMakeLists.txt) as pytest items.

One item per C++ test binary, plus one that checks the CUDA kernels compiled with nvcc
wherever nvcc exists. Missing cmake or GoogleTest skips, or fails under BARBER_REQUIRE_NATIVE=1.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]


def _cmake_tests() -> list[str]:
    text = (ROOT / "CMakeLists.txt").read_text()
    block = re.search(r"set\(BARBER_CPP_TESTS(.*?)\)", text, re.S)
    return block.group(1).split() if block else []


@pytest.fixture(scope="session")
def cpp_build(tmp_path_factory) -> Path:
    if shutil.which("cmake") is None:
        skip_or_fail("cmake is not installed")
    build = Path(os.environ.get("BARBER_CPP_BUILD_DIR", "") or tmp_path_factory.mktemp("cpp-build"))
    configure = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build)], capture_output=True, text=True)
    if configure.returncode != 0:
        if "GTest" in configure.stderr + configure.stdout:
            skip_or_fail("GoogleTest not found (Debian: apt-get install libgtest-dev)")
        pytest.fail(f"cmake configure failed:\n{configure.stdout}\n{configure.stderr}")
    jobs = str(max(1, min(2, os.cpu_count() or 1)))
    compiled = subprocess.run(["cmake", "--build", str(build), "-j", jobs], capture_output=True, text=True)
    if compiled.returncode != 0:
        pytest.fail(f"C++ build failed:\n{compiled.stdout[-20000:]}\n{compiled.stderr[-20000:]}")
    (build / "configure.log").write_text(configure.stdout)
    return build


@pytest.mark.parametrize("binary", _cmake_tests())
def test_cpp_binary(cpp_build: Path, binary: str) -> None:
    run = subprocess.run([str(cpp_build / binary), "--gtest_brief=1"], capture_output=True, text=True)
    assert run.returncode == 0, f"{binary} failed:\n{run.stdout}\n{run.stderr}"


def test_cuda_kernels_compile(cpp_build: Path) -> None:
    log = (cpp_build / "configure.log").read_text()
    if "CUDA compile check with" not in log:
        pytest.skip("no nvcc on this machine: CUDA compile check not configured")
    objects = list(cpp_build.rglob("*.cu.o"))
    assert len(objects) >= 2, f"expected compiled CUDA objects, found {objects}"
