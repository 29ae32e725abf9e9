#!/usr/bin/env python3
"""Prune SmolLM2-135M with fixed flags and print the sha256 of every output shard.

A change that must not change the output (a refactor, a new option left at its default) is shown
to keep the bytes by running this before and after it and comparing the lines:

    .venv/bin/python tools/experiments/same_bytes.py > before.txt   # on the old commit
    .venv/bin/python tools/experiments/same_bytes.py > after.txt    # on the new one
    diff before.txt after.txt

Since the default recipe became `refit`, the configurations of earlier commits are `--recipe paper`:
compare a commit from before the recipes with `--extra "--recipe paper"` on the later one.

Each configuration runs `barber-stream` in a child process (8 x 128 Botchan tokens, seed 0,
micro-batch 4, float32 on the CPU). `--config NAME` runs only the named ones.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: name -> barber-stream flags beyond the common ones.
CONFIGS = {
    "wanda-rebuild": [],
    "wanda-no-rebuild": ["--no-rebuild"],
    "sparsegpt-rebuild": ["--init", "sparsegpt"],
    "magnitude-24-rebuild": ["--init", "magnitude", "--pattern", "2:4"],
    "wanda-48-column-w": ["--pattern", "4:8", "--metric", "w", "--rebuild-ratio", "0.05"],
}
COMMON = ["--nsamples", "8", "--seqlen", "128", "--seed", "0", "--batch-size", "4", "--no-progress"]


def shard_hashes(out: Path) -> list[str]:
    """`sha256  name` of every safetensors file in `out`, sorted by name."""
    return [
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}" for p in sorted(out.glob("*.safetensors"))
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", choices=sorted(CONFIGS), help="run only these (repeatable)")
    p.add_argument("--ckpt", default=None, help="model (default: the fetched SmolLM2-135M)")
    p.add_argument("--calib", default=None, help="calibration text (default: Botchan)")
    p.add_argument("--extra", default="", help="more barber-stream flags for every configuration, space-separated")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from barber import assets

    ckpt = args.ckpt or str(assets.smollm2_dir())
    calib = args.calib or str(assets.botchan_path())
    stream = [sys.executable, "-c", "import sys; from barber.cli import stream_main; sys.exit(stream_main())"]
    for name in args.config or CONFIGS:
        with tempfile.TemporaryDirectory(prefix="barber-bytes-") as tmp:
            out = Path(tmp) / "out"
            cmd = [*stream, "--ckpt", ckpt, "--out", str(out), "--calib", calib, *COMMON, *CONFIGS[name]]
            cmd += args.extra.split()
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(f"{name}: barber-stream failed ({done.returncode}): {done.stderr.strip()[-500:]}")
                return 1
            for line in shard_hashes(out):
                print(f"{name}: {line}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
