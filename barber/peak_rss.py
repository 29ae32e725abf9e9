"""Run a barber command in a fresh interpreter and read its peak RSS.

The peak is VmHWM (the peak RSS of the child's own process image), not ru_maxrss: Linux carries
ru_maxrss over from the forking parent across execve, so it would report the parent's peak.
Used by the stream and eval-memory benchmarks in tools/ and by tests/test_eval.py; not imported by the
rest of the package.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass

_CHILD = textwrap.dedent(
    """
    import sys
    from barber import cli
    rc = getattr(cli, sys.argv[1])(sys.argv[2:])
    hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0].split()[1]
    print("PEAK_RSS_KB", hwm, file=sys.stderr)
    sys.exit(rc)
    """
)


@dataclass(frozen=True)
class Measured:
    returncode: int
    stdout: str
    stderr: str
    peak_rss: int | None  # bytes; None when the child died before reporting it
    wall: float  # seconds, interpreter start included


def run_measured(entry: str, argv: list[str], env: dict[str, str] | None = None) -> Measured:
    """Run `barber.cli.<entry>(argv)` ("stream_main" or "eval_main") in a new Python process."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, entry, *argv], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("PEAK_RSS_KB")]
    peak = int(lines[-1].split()[1]) * 1024 if lines else None
    return Measured(proc.returncode, proc.stdout, proc.stderr, peak, wall)
