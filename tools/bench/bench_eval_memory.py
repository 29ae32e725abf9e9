#!/usr/bin/env python
"""Peak RSS of `barber-eval` on random LLaMA-13B-width checkpoints of 2, 4 and 8 blocks.

Writes a random-weight checkpoint (tools/bench/make_synthetic_checkpoint.py: hidden 5120, intermediate 13824,
40 heads; bfloat16 storage, ~0.63 GB per block, SmolLM2's tokenizer) into a scratch directory, builds one
checkpoint directory per depth that links to its shard files, runs `barber-eval` on each in a fresh interpreter and
prints its peak RSS (VmHWM of the child) and wall time. The scratch directory is deleted afterwards unless --keep.

Acceptance (issue #3): peak RSS for 8 blocks <= 1.1x that for 2 blocks, and under 4 GB.

Usage:
    .venv/bin/python tools/bench/bench_eval_memory.py [--blocks 2 4 8] [--workdir /tmp] [--seqlen 128] [--windows 2]
        [--model llama-13b]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from barber.peak_rss import run_measured

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_synthetic_checkpoint import PRESETS, subset_checkpoint, write_synthetic_checkpoint  # noqa: E402

MODEL = "llama-13b"

def run_eval(ckpt: Path, text: Path, args: argparse.Namespace) -> tuple[float, float, str]:
    """(peak RSS in bytes, wall seconds, perplexity line) of one barber-eval run in a fresh interpreter."""
    argv = ["--ckpt", str(ckpt), "--text", str(text), "--seqlen", str(args.seqlen), "--max-windows",
            str(args.windows), "--dtype", args.dtype, "--no-progress"]
    run = run_measured("eval_main", argv)
    if run.returncode != 0:
        raise SystemExit(f"barber-eval failed on {ckpt}:\n{run.stderr}")
    return run.peak_rss, run.wall, run.stdout.strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--model", choices=list(PRESETS), default=MODEL, help="shape preset")
    p.add_argument("--workdir", default=tempfile.gettempdir(), help="where the scratch directory goes")
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = p.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="barber-bench-", dir=args.workdir))
    try:
        pool = scratch / "pool"
        pool.mkdir()
        print(f"writing {max(args.blocks)} random {args.model} blocks to {pool}", flush=True)
        write_synthetic_checkpoint(pool, args.model, max(args.blocks), seed=args.seed, progress=True)
        text = scratch / "text.txt"
        text.write_text("The quick brown fox jumps over the lazy dog. " * (args.seqlen * args.windows // 10 + 10))
        rows = []
        for layers in args.blocks:
            ckpt = subset_checkpoint(pool, scratch / f"L{layers}", layers)
            rss, wall, line = run_eval(ckpt, text, args)
            rows.append((layers, rss, wall))
            print(f"  {layers} blocks: peak RSS {rss / 2**30:.3f} GiB, {wall:.1f} s  [{line}]", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    shape = PRESETS[args.model]
    print(f"\nbarber-eval, {args.model}: hidden {shape['hidden_size']}, intermediate {shape['intermediate_size']}, "
          f"{shape['num_attention_heads']} heads, bf16 storage, "
          f"{args.windows} windows x {args.seqlen} tokens, compute {args.dtype}")
    print(f"{'blocks':>6} {'peak RSS (GiB)':>15} {'ratio to first':>15} {'time (s)':>9}")
    base = rows[0][1]
    for layers, rss, wall in rows:
        print(f"{layers:>6} {rss / 2**30:>15.3f} {rss / base:>15.3f} {wall:>9.1f}")
    ratio, worst = rows[-1][1] / base, max(r[1] for r in rows)
    ok = ratio <= 1.1 and worst < 4e9
    print(f"acceptance (deepest <= 1.1x shallowest, all < 4 GB): {'PASS' if ok else 'FAIL'} (ratio {ratio:.3f})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
