"""ruff (configured in pyproject.toml) finds nothing: the README's test command, hence CI, runs the linter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    try:
        import ruff  # noqa: F401
    except ImportError:
        skip_or_fail("ruff is not installed (tools/bootstrap.sh installs it)")
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
