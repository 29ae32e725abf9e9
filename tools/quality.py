#!/usr/bin/env python3
"""Quality table: perplexity of SmolLM2-135M pruned by every method, with and without the rebuild.

Calibrates on one text (default: Botchan) and evaluates on held-out windows of another (default:
the Wikipedia excerpt), both fetched by tools/fetch_assets.py. Each configuration is pruned with the
streaming pruner into a temporary directory and evaluated with the streaming evaluator. Results are
cached per configuration in the JSON file, so an interrupted run continues where it stopped.

    .venv/bin/python tools/quality.py                       # the main table (dense + 18 runs)
    .venv/bin/python tools/quality.py --set sweep           # rebuild settings on Wanda 50%
    .venv/bin/python tools/quality.py --only wanda          # configurations whose name contains "wanda"

Writes `--json` (default runs/quality.json) and `--markdown` (default runs/quality.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from barber import assets  # noqa: E402
from barber.calib import load_calibration  # noqa: E402
from barber.checkpoint import Checkpoint  # noqa: E402
from barber.evaluate import perplexity  # noqa: E402
from barber.pipeline import PruneSettings, default_rebuild  # noqa: E402
from barber.prune import Granularity, InitMethod, Metric, Pattern  # noqa: E402
from barber.run import prune_checkpoint  # noqa: E402
from barber.tokenizer import load_tokenizer  # noqa: E402

PATTERNS = {"50%": Pattern(), "2:4": Pattern(2, 4), "4:8": Pattern(4, 8)}


def main_table() -> dict[str, PruneSettings | None]:
    """dense, then every initial method x pattern, without and with the rebuild (reference defaults)."""
    runs: dict[str, PruneSettings | None] = {"dense": None}
    for label, pattern in PATTERNS.items():
        for init in InitMethod:
            ratio, granularity = default_rebuild(init, pattern)
            base = PruneSettings(sparsity=0.5, pattern=pattern, init=init, ratio=ratio, granularity=granularity)
            runs[f"{init.value} {label}"] = replace(base, rebuild=False)
            runs[f"{init.value} {label} + rebuild ({granularity.value}, a={ratio:g})"] = base
    return runs


def sweep() -> dict[str, PruneSettings | None]:
    """Rebuild settings on Wanda 50%: ratio, granularity and metric."""
    base = PruneSettings(sparsity=0.5, init=InitMethod.WANDA)
    runs: dict[str, PruneSettings | None] = {"wanda 50%": replace(base, rebuild=False)}
    for ratio in (0.01, 0.05, 0.1, 0.3):
        for granularity in Granularity:
            runs[f"wanda 50% + rebuild ({granularity.value}, a={ratio:g})"] = replace(
                base, ratio=ratio, granularity=granularity
            )
    for metric in Metric:
        runs[f"wanda 50% + rebuild (row, a=0.1, metric {metric.value})"] = replace(
            base, ratio=0.1, granularity=Granularity.ROW, metric=metric
        )
    return runs


def markdown(results: dict, meta: dict) -> str:
    lines = [
        f"SmolLM2-135M, calibration: {meta['nsamples']} x {meta['seqlen']} tokens of {meta['calib_name']} "
        f"(seed {meta['seed']}); perplexity on {meta['eval_windows']} held-out windows of {meta['eval_seqlen']} "
        f"tokens of {meta['eval_name']}, no BOS, {meta['dtype']} on {meta['device']}.",
        "",
        "| configuration | perplexity | swaps | prune time (s) |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        swaps = "" if r.get("swaps") is None else str(r["swaps"])
        secs = "" if r.get("seconds") is None else f"{r['seconds']:.0f}"
        lines.append(f"| {name} | {r['ppl']:.2f} | {swaps} | {secs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", choices=["main", "sweep"], default="main")
    p.add_argument("--only", default=None, help="run only configurations whose name contains this")
    p.add_argument("--ckpt", default=None, help="model (default: the fetched SmolLM2-135M)")
    p.add_argument("--calib", default=None, help="calibration text (default: Botchan)")
    p.add_argument("--eval", default=None, help="evaluation text (default: the Wikipedia excerpt)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", default="runs/quality.json")
    p.add_argument("--markdown", default="runs/quality.md")
    args = p.parse_args(argv)

    ckpt_dir = Path(args.ckpt) if args.ckpt else assets.smollm2_dir()
    calib = Path(args.calib) if args.calib else assets.botchan_path()
    eval_text = Path(args.eval) if args.eval else assets.wiki_text_path()
    dtype = getattr(torch, args.dtype)
    ckpt = Checkpoint.open(ckpt_dir)
    tok = load_tokenizer(ckpt_dir)
    ids = load_calibration(
        calib, tok.encode, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, vocab_size=ckpt.config.vocab_size
    )
    eval_ids = tok.encode(eval_text.read_text(encoding="utf-8"))
    meta = {
        "model": str(ckpt_dir), "calib": str(calib), "calib_name": calib.name, "eval": str(eval_text),
        "eval_name": eval_text.name, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
        "eval_seqlen": args.eval_seqlen, "eval_windows": args.eval_windows, "device": args.device, "dtype": args.dtype,
    }

    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    stored = json.loads(json_path.read_text()) if json_path.exists() else {}
    results = stored.get("results", {}) if stored.get("meta") == meta else {}

    def evaluate(path: Path) -> float:
        return perplexity(
            Checkpoint.open(path), eval_ids, seqlen=args.eval_seqlen, max_windows=args.eval_windows,
            device=args.device, dtype=dtype, progress=False,
        ).ppl

    runs = main_table() if args.set == "main" else sweep()
    for name, settings in runs.items():
        if args.only and args.only not in name:
            continue
        if name in results:
            print(f"{name}: {results[name]['ppl']:.2f} (cached)", flush=True)
            continue
        started = time.perf_counter()
        if settings is None:
            results[name] = {"ppl": evaluate(ckpt_dir)}
        else:
            settings = replace(settings, device=args.device, dtype=dtype)
            with tempfile.TemporaryDirectory(prefix="barber-quality-") as tmp:
                out = Path(tmp) / "out"
                report = prune_checkpoint(Checkpoint.open(ckpt_dir), out, settings, ids, progress=False)
                results[name] = {
                    "ppl": evaluate(out),
                    "swaps": report["swaps"] if settings.rebuild else None,
                    "seconds": report["seconds"]["total"],
                    "settings": settings.describe(),
                }
                shutil.rmtree(out, ignore_errors=True)
        print(f"{name}: {results[name]['ppl']:.2f} ({time.perf_counter() - started:.0f} s)", flush=True)
        json_path.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    ordered = {k: results[k] for k in runs if k in results}
    Path(args.markdown).write_text(markdown(ordered, meta))
    print(markdown(ordered, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
