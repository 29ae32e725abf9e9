#!/usr/bin/env python3
"""Wall time and peak RSS of each recipe, one fresh `barber-stream` process per run, on SmolLM2-135M.

Each recipe prunes with the calibration of the quality table (32 x 256 Botchan tokens, seed 0) and
no evaluation; the peak is the child's VmHWM. Run it on an otherwise idle machine: the numbers are
wall-clock. `--repeat N` runs every recipe N times, alternating, and reports each run.

    .venv/bin/python tools/experiments/recipe_cost.py --pattern 50% --pattern 2:4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from barber import assets  # noqa: E402
from barber.peak_rss import run_measured  # noqa: E402
from barber.settings import RECIPES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", action="append", choices=sorted(RECIPES), help="recipes to measure (default: all)")
    p.add_argument("--pattern", action="append", help="50%%, 2:4 or 4:8 (repeatable; default 50%%)")
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args(argv)
    ckpt, calib = str(assets.smollm2_dir()), str(assets.botchan_path())
    print("| recipe | pattern | run | wall (s) | peak RSS (GiB) |\n|---|---|---|---|---|")
    for pattern in args.pattern or ["50%"]:
        flags = [] if pattern == "50%" else ["--pattern", pattern]
        for run in range(args.repeat):
            for recipe in args.recipe or list(RECIPES):
                with tempfile.TemporaryDirectory(prefix="barber-cost-") as tmp:
                    m = run_measured("stream_main", [
                        "--ckpt", ckpt, "--out", str(Path(tmp) / "out"), "--calib", calib, "--nsamples", "32",
                        "--seqlen", "256", "--no-progress", "--recipe", recipe, *flags,
                    ])
                if m.returncode:
                    print(f"{recipe}: barber-stream failed: {m.stderr.strip()[-400:]}")
                    return 1
                print(f"| {recipe} | {pattern} | {run + 1} | {m.wall:.1f} | {m.peak_rss / 2**30:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
