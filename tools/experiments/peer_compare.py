#!/usr/bin/env python3
"""barber-stream on the configurations of ../shared/docs/peer-results.md, with wall time and peak RSS.

The original LLM-Barber code was measured there on SmolLM2-135M (float32, 32 calibration windows of 256
Botchan tokens, seed 0, 2 cores), evaluated on 4 windows of 512 tokens of a held-out news text that is
not available here; this script evaluates on the first 4 windows of 512 tokens of the Wikipedia excerpt
instead, so compare orderings, ratios, swap counts, time and memory, not absolute perplexities.

Each row runs `barber-stream ... --eval` as its own process under /usr/bin/time, which gives the wall
time and peak RSS of the whole command (load, calibration, pruning, writing, evaluation), like the
original's figures.

    .venv/bin/python tools/experiments/peer_compare.py [--only wanda] [--json runs/peer_compare.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from barber import assets  # noqa: E402
from barber.layout import REPORT_FILE  # noqa: E402

#: name -> (barber-stream options, the original's row in peer-results.md: ppl, changed, wall s, peak GB)
ROWS = {
    "magnitude (per matrix)": (
        ["--init", "magnitude", "--magnitude-scope", "layer", "--no-rebuild"], ("474.5", "-", 23, 1.76)),
    "magnitude (per matrix) + rebuild (block, a=0.1)": (
        ["--init", "magnitude", "--magnitude-scope", "layer", "--granularity", "block", "--rebuild-ratio", "0.1"],
        ("114.3", "4.3% of pruned", 166, 1.98)),
    "wanda": (["--init", "wanda", "--no-rebuild"], ("75.39", "-", 58, 1.81)),
    "wanda + rebuild (row, a=0.01)": (
        ["--init", "wanda", "--granularity", "row", "--rebuild-ratio", "0.01"], ("75.48", "737 swaps", 212, 2.28)),
    "wanda + rebuild (row, a=0.1)": (
        ["--init", "wanda", "--granularity", "row", "--rebuild-ratio", "0.1"], ("77.21", "1.7%", 206, 2.29)),
    "wanda + rebuild (row, a=0.5)": (
        ["--init", "wanda", "--granularity", "row", "--rebuild-ratio", "0.5"], ("100.72", "10.3%", 203, 2.26)),
    "wanda + rebuild (block, a=0.1)": (
        ["--init", "wanda", "--granularity", "block", "--rebuild-ratio", "0.1"], ("81.00", "3.6%", 174, 2.11)),
    "wanda 2:4": (["--init", "wanda", "--pattern", "2:4", "--no-rebuild"], ("315.1", "-", 49, 1.86)),
    "wanda 2:4 + rebuild (row, a=0.01)": (
        ["--init", "wanda", "--pattern", "2:4", "--rebuild-ratio", "0.01"], ("318.1", "0.07%", 191, 2.06)),
}


def run_row(options: list[str], ckpt: Path, calib: Path, text: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="barber-peer-") as tmp:
        out = Path(tmp) / "out"
        timing = Path(tmp) / "time.txt"
        cmd = [
            "/usr/bin/time", "-f", "%e %M", "-o", str(timing),
            str(ROOT / ".venv/bin/barber-stream"), "--ckpt", str(ckpt), "--out", str(out),
            "--calib", str(calib), "--nsamples", "32", "--seqlen", "256", "--seed", "0",
            "--eval", str(text), "--eval-seqlen", "512", "--eval-windows", "4", "--no-progress",
            "--recipe", "paper", *options,  # the original's settings, not today's default recipe
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"barber-stream failed:\n{proc.stderr[-3000:]}")
        wall, rss_kb = timing.read_text().split()[-2:]
        report = json.loads((out / REPORT_FILE).read_text())
    pruned = sum(
        layer["shape"][0] * layer["shape"][1] - layer["kept"]
        for b in report["blocks"]
        for layer in b["layers"].values()
    )
    by_layer: dict[str, int] = {}
    for b in report["blocks"]:
        for sb in b["subblocks"]:
            for name, n in sb.get("swaps", {}).items():
                by_layer[name] = by_layer.get(name, 0) + n
    return {
        "ppl": report["eval"]["pruned"]["ppl"],
        "swaps": report.get("swaps", 0),
        "changed_of_pruned": report.get("swaps", 0) / pruned if pruned else 0.0,
        "swaps_by_layer": {k: v for k, v in by_layer.items() if v},
        "wall_s": float(wall),
        "peak_rss_gb": int(rss_kb) * 1024 / 1e9,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, help="rows whose name contains this")
    p.add_argument("--json", default="runs/peer_compare.json")
    args = p.parse_args(argv)
    ckpt, calib, text = assets.smollm2_dir(), assets.botchan_path(), assets.wiki_text_path()
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.exists() else {}
    for name, (options, _) in ROWS.items():
        if (args.only and args.only not in name) or name in results:
            continue
        results[name] = run_row(options, ckpt, calib, text)
        print(f"{name}: {results[name]}", flush=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
    print("| configuration | barber ppl (wiki) | barber changed | barber wall s | barber peak GB "
          "| original ppl (news) | original changed | original wall s | original peak GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (_, (ppl, changed, wall, rss)) in ROWS.items():
        if name not in results:
            continue
        r = results[name]
        # Each swap changes two mask positions; the original's column counts changed positions.
        mine = (
            "-" if "rebuild" not in name
            else f"{r['swaps']} swaps ({200 * r['changed_of_pruned']:.2f}% of pruned changed)"
        )
        print(f"| {name} | {r['ppl']:.2f} | {mine} | {r['wall_s']:.0f} | {r['peak_rss_gb']:.2f} "
              f"| {ppl} | {changed} | {wall} | {rss} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
