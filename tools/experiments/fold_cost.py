#!/usr/bin/env python3
"""What the order-fixed sums cost: this checkout against a baseline checkout, alternating fresh processes.

Prunes SmolLM2-135M with each recipe (32 x 256 Botchan tokens, seed 0, no evaluation) with the code of
`--baseline DIR` (a checkout of an older commit with its native extension built, e.g. made with
`git worktree add /tmp/base 7b1f360 && cp barber/_C*.so /tmp/base/barber/`) and with this checkout,
alternately, `--repeat` times; reports each run's prune seconds (the report's total) and peak RSS
(VmHWM), and the ratio of medians. Run it on an otherwise idle machine: the times are wall-clock.

    .venv/bin/python tools/experiments/fold_cost.py --baseline /tmp/base --repeat 3 --recipe refit --recipe paper
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from barber import assets  # noqa: E402
from barber.peak_rss import _CHILD  # noqa: E402


def prune(tree: Path, recipe: str, pattern: str) -> tuple[float, int]:
    """(prune seconds, peak RSS bytes) of one run with the code in `tree`."""
    flags = [] if pattern == "50%" else ["--pattern", pattern]
    with tempfile.TemporaryDirectory(prefix="barber-foldcost-") as tmp:
        out = Path(tmp) / "out"
        argv = ["--ckpt", str(assets.smollm2_dir()), "--out", str(out), "--calib", str(assets.botchan_path()),
                "--nsamples", "32", "--seqlen", "256", "--no-progress", "--recipe", recipe, *flags]
        proc = subprocess.run([sys.executable, "-c", _CHILD, "stream_main", *argv], capture_output=True, text=True,
                              cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)})
        if proc.returncode:
            sys.exit(f"{tree}: barber-stream failed: {proc.stderr.strip()[-600:]}")
        peak = [ln for ln in proc.stderr.splitlines() if ln.startswith("PEAK_RSS_KB")][-1].split()[1]
        return json.loads((out / "barber_report.json").read_text())["seconds"]["total"], int(peak) * 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, required=True, help="checkout of the commit to compare with")
    p.add_argument("--recipe", action="append", help="recipes (default: refit)")
    p.add_argument("--pattern", default="50%", help="50%%, 2:4 or 4:8")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    print("| recipe | code | run | prune s | peak RSS GiB |\n|---|---|---|---|---|", flush=True)
    for recipe in args.recipe or ["refit"]:
        got: dict[str, list[tuple[float, int]]] = {"baseline": [], "this": []}
        for run in range(args.repeat):
            for name, tree in (("baseline", args.baseline), ("this", ROOT)):
                secs, peak = prune(tree.resolve(), recipe, args.pattern)
                got[name].append((secs, peak))
                print(f"| {recipe} | {name} | {run + 1} | {secs:.1f} | {peak / 2**30:.3f} |", flush=True)
        t = statistics.median(s for s, _ in got["this"]) / statistics.median(s for s, _ in got["baseline"])
        m = statistics.median(r for _, r in got["this"]) / statistics.median(r for _, r in got["baseline"])
        print(f"{recipe} {args.pattern}: time x{t:.3f}, peak RSS x{m:.3f} (this / baseline, medians)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
