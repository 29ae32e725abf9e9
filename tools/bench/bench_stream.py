#!/usr/bin/env python
"""Time and memory of `barber-stream` on synthetic checkpoints of real widths, at several depths.

    .venv/bin/python tools/bench/bench_stream.py [--model llama-13b] [--blocks 2 4 8] [--nsamples 4] [--seqlen 128]
        [--device cpu|cuda] [--dtype float32] [--max-cpu-memory SIZE] [--max-gpu-memory SIZE]
        [--budget-check SIZE] [--workdir /tmp] [--keep] [--json PATH] [-- EXTRA barber-stream ARGS]

Writes one random checkpoint of max(--blocks) blocks (tools/bench/make_synthetic_checkpoint.py, bfloat16,
real sharding), links a checkpoint of each depth to it, and prunes each with barber-stream (Wanda +
rebuild by default) in a fresh interpreter, so the peak RSS (VmHWM of the child) is that run's alone.
From each run's barber_report.json it takes the per-block time split (read; forward = statistics
forward + advancing the hidden states; gradient pass; selection = initial selection + rebuild;
write), the memory plan, and the peak GPU memory (max allocated). --budget-check SIZE prunes the
shallowest checkpoint once more under --max-cpu-memory SIZE and reports peak / budget.

The gradient pass's achieved FLOP/s (its matmul and attention FLOPs, counted from the shapes, over
its measured time) is set against a plain float32 matmul of the same shapes (micro-batch x seqlen
tokens times each linear's weight) timed in this process in the same run.

Prints a markdown table; --json writes every number. The scratch directory is deleted unless --keep.
Acceptance (issue #5, CPU): deepest peak RSS <= 1.1 x shallowest and <= 6 GB; budget peak <= 1.1 x budget.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from barber.peak_rss import run_measured

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_synthetic_checkpoint import PRESETS, subset_checkpoint, write_synthetic_checkpoint  # noqa: E402

PHASES = {  # table column -> report phases summed into it
    "read": ("read",),
    "forward": ("stats", "forward"),
    "gradient": ("gradient",),
    "select": ("select", "rebuild"),
    "write": ("write",),
}


def calibration_text(path: Path, tokens: int) -> Path:
    """The fetched Botchan text when present, else a generated English-like text of enough tokens."""
    from barber import assets
    from barber.errors import DataError

    try:
        return assets.botchan_path()
    except DataError:
        words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
        text = " ".join(words[(i * 7 + i // 13) % len(words)] for i in range(4 * tokens + 1000))
        path.write_text(text + "\n")
        return path


def gradient_flops(cfg: dict, nsamples: int, seqlen: int) -> float:
    """FLOPs of the gradient pass over all calibration tokens, for one block.

    Per sub-block: the sparse target forward, the dense forward, the per-sample gradients delta^T x
    (each 2 x tokens x params of its linears), the input gradient of its last linear (o_proj,
    down_proj) that reaches the others, and for attention 4 causal attention forwards' worth
    (two forwards, a backward of about twice a forward), 2 x T^2 x head_dim per head each.
    """
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = d // nh
    tokens = nsamples * seqlen
    attn = d * nh * hd + 2 * d * nkv * hd + nh * hd * d
    mlp = 3 * d * f
    linear = 2 * tokens * (3 * attn + nh * hd * d + 3 * mlp + f * d)
    attention = 4 * 2 * nsamples * nh * seqlen * seqlen * hd
    return float(linear + attention)


def matmul_rate(cfg: dict, tokens: int, device: str, seconds: float = 3.0, tf32: bool = False) -> dict:
    """FLOP/s of plain float32 matmuls x[tokens, in] @ W[out, in]^T over the block's linear shapes.

    On a GPU, TF32 is allowed exactly when the pruner's runs allow it (--allow-tf32).
    """
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = tf32
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = d // nh
    shapes = [(nh * hd, d), (nkv * hd, d), (d, nh * hd), (f, d), (d, f)]
    gen = torch.Generator(device=device).manual_seed(0)
    flops = elapsed = 0.0
    per_shape = {}
    for out, inp in shapes:
        x = torch.randn(tokens, inp, device=device, generator=gen)
        w = torch.randn(out, inp, device=device, generator=gen)
        torch.nn.functional.linear(x, w)  # warm up
        _sync(device)
        reps, t0 = 0, time.perf_counter()
        while True:
            torch.nn.functional.linear(x, w)
            reps += 1
            _sync(device)
            if time.perf_counter() - t0 > seconds / len(shapes) and reps >= 2:
                break
        dt = time.perf_counter() - t0
        per_shape[f"{tokens}x{inp}x{out}"] = 2.0 * tokens * inp * out * reps / dt
        flops += 2.0 * tokens * inp * out * reps
        elapsed += dt
        del x, w
    return {"flops_per_s": flops / elapsed, "per_shape": per_shape, "tokens": tokens, "tf32": tf32}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_stream(ckpt: Path, out: Path, calib: Path, args: argparse.Namespace, budget: str | None = None,
               gpu_budget: str | None = None) -> dict:
    """One barber-stream run in a fresh interpreter: its report plus peak RSS and wall time."""
    argv = ["--ckpt", str(ckpt), "--out", str(out), "--overwrite", "--calib", str(calib),
            "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", args.device,
            "--dtype", args.dtype, "--no-progress", "-v"]
    if budget or args.max_cpu_memory:
        argv += ["--max-cpu-memory", budget or args.max_cpu_memory]
    if gpu_budget or args.max_gpu_memory:
        argv += ["--max-gpu-memory", gpu_budget or args.max_gpu_memory]
    argv += args.extra
    run = run_measured("stream_main", argv)
    if run.returncode != 0:
        raise SystemExit(f"barber-stream failed on {ckpt} (exit {run.returncode}):\n{run.stderr[-4000:]}")
    from barber.layout import REPORT_FILE

    report = json.loads((out / REPORT_FILE).read_text())
    shutil.rmtree(out, ignore_errors=True)  # the pruned copy is not needed; keep the disk free
    return {"report": report, "peak_rss": run.peak_rss, "wall": run.wall, "stdout": run.stdout.strip()}


def summarise(run: dict, cfg: dict, args: argparse.Namespace, mm: dict) -> dict:
    """Per-block mean phase times, peaks and gradient-pass FLOP/s of one run."""
    report = run["report"]
    blocks = report["blocks"]
    per_block = {
        col: statistics.mean(sum(b["seconds"].get(p, 0.0) for p in phases) for b in blocks)
        for col, phases in PHASES.items()
    }
    per_block["total"] = statistics.mean(sum(b["seconds"].values()) for b in blocks)
    flops = gradient_flops(cfg, args.nsamples, args.seqlen)
    grad_rate = flops / per_block["gradient"] if per_block["gradient"] else 0.0
    memory = report.get("memory") or {}
    return {
        "blocks": len(blocks),
        "per_block_seconds": per_block,
        "peak_rss": run["peak_rss"],
        "peak_gpu": report.get("peak_gpu_memory"),
        "wall": run["wall"],
        "plan": memory.get("plan"),
        "gradient_flops_per_block": flops,
        "gradient_flops_per_s": grad_rate,
        "gradient_vs_matmul": grad_rate / mm["flops_per_s"] if mm["flops_per_s"] else None,
        "summary": run["stdout"].splitlines()[-1] if run["stdout"] else "",
    }


def markdown(rows: list[dict], mm: dict) -> str:
    gib = 2**30
    head = ("| blocks | read s | forward s | gradient s | select s | write s | s/block | peak RSS GiB | "
            "RSS ratio | peak GPU GiB | placement, micro-batch | grad GFLOP/s | vs matmul |")
    lines = [head, "|" + "|".join(["---"] * 13) + "|"]
    base = rows[0]["peak_rss"]
    for r in rows:
        t = r["per_block_seconds"]
        plan = r["plan"] or {}
        gpu = f"{r['peak_gpu'] / gib:.2f}" if r.get("peak_gpu") else "-"
        label = f"{r['blocks']}" + (f" (RSS budget {r['budget']})" if r.get("budget") else "") + (
            f" (GPU budget {r['gpu_budget']})" if r.get("gpu_budget") else "")
        lines.append(
            f"| {label} | {t['read']:.2f} | {t['forward']:.2f} | {t['gradient']:.2f} | {t['select']:.2f} | "
            f"{t['write']:.2f} | {t['total']:.2f} | {r['peak_rss'] / gib:.3f} | {r['peak_rss'] / base:.3f} | {gpu} | "
            f"{plan.get('hidden_placement', '?')}, {plan.get('micro_batch', '?')} | "
            f"{r['gradient_flops_per_s'] / 1e9:.1f} | {r['gradient_vs_matmul']:.2f} |"
        )
    lines.append(f"\nplain float32 matmul, {mm['tokens']} tokens x the block's linear shapes: "
                 f"{mm['flops_per_s'] / 1e9:.1f} GFLOP/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        k = argv.index("--")
        argv, extra = argv[:k], argv[k + 1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(PRESETS), default="llama-13b")
    p.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-cpu-memory", default=None, help="passed to every run")
    p.add_argument("--max-gpu-memory", default=None, help="passed to every run")
    p.add_argument("--budget-check", default=None, metavar="SIZE",
                   help="prune the shallowest checkpoint again under --max-cpu-memory SIZE")
    p.add_argument("--gpu-budget-check", default=None, metavar="SIZE",
                   help="prune the shallowest checkpoint again under --max-gpu-memory SIZE")
    p.add_argument("--workdir", default=tempfile.gettempdir(), help="where the scratch directory goes")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--json", default=None, help="write every number to this file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.extra = extra
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    blocks = sorted(set(args.blocks))

    scratch = Path(tempfile.mkdtemp(prefix="barber-bench-stream-", dir=args.workdir))
    rows: list[dict] = []
    try:
        pool = scratch / "pool"
        t0 = time.perf_counter()
        print(f"writing a random {args.model} checkpoint of {blocks[-1]} blocks to {pool}", flush=True)
        write_synthetic_checkpoint(pool, args.model, blocks[-1], seed=args.seed)
        print(f"  done in {time.perf_counter() - t0:.1f} s", flush=True)
        cfg = json.loads((pool / "config.json").read_text())
        calib = calibration_text(scratch / "calib.txt", args.nsamples * args.seqlen)
        runs: list[tuple[int, str | None, str | None]] = [(b, None, None) for b in blocks]
        if args.budget_check:  # peak memory does not depend on depth: the shallowest run is enough
            runs.append((blocks[0], args.budget_check, None))
        if args.gpu_budget_check:
            runs.append((blocks[0], None, args.gpu_budget_check))
        mm = None
        for depth, budget, gpu_budget in runs:
            ckpt = scratch / f"L{depth}"
            if not ckpt.exists():
                subset_checkpoint(pool, ckpt, depth)
            run = run_stream(ckpt, scratch / "out", calib, args, budget, gpu_budget)
            if mm is None:  # after the first run: the child's plan gives the micro-batch
                plan = (run["report"].get("memory") or {}).get("plan") or {}
                mm = matmul_rate(cfg, plan.get("micro_batch", 1) * args.seqlen, args.device,
                                 tf32="--allow-tf32" in args.extra)
            row = summarise(run, cfg, args, mm)
            row["budget"], row["gpu_budget"] = budget, gpu_budget
            rows.append(row)
            under = (
                f" under --max-cpu-memory {budget}" if budget
                else f" under --max-gpu-memory {gpu_budget}" if gpu_budget else ""
            )
            print(f"  {depth} blocks{under}: peak RSS {row['peak_rss'] / 2**30:.3f} GiB, "
                  f"{row['per_block_seconds']['total']:.1f} s/block, {row['wall']:.0f} s  [{row['summary']}]",
                  flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    print(f"\nbarber-stream on random {args.model} ({cfg['hidden_size']} x {cfg['intermediate_size']}), "
          f"{args.nsamples} x {args.seqlen} calibration tokens, {args.dtype} on {args.device}, "
          f"{torch.get_num_threads()} threads; per-block means\n")
    print(markdown(rows, mm))
    depth_rows = [r for r in rows if not r.get("budget") and not r.get("gpu_budget")]
    ratio = depth_rows[-1]["peak_rss"] / depth_rows[0]["peak_rss"]
    worst = max(r["peak_rss"] for r in depth_rows)
    verdicts = {"depth_ratio": ratio, "depth_ratio_ok": ratio <= 1.1}
    if args.device == "cpu":
        verdicts["peak_under_6GB"] = worst <= 6e9
    else:  # issue #5 on a GPU: 40 blocks in 10 minutes, <= 10 GB by default, gradient pass >= 40% of matmul
        per_block = max(r["per_block_seconds"]["total"] for r in depth_rows)
        gpu_peak = max(r["peak_gpu"] or 0 for r in depth_rows)
        verdicts.update(
            seconds_for_40_blocks=40 * per_block, forty_blocks_in_10_min_ok=40 * per_block <= 600,
            peak_gpu=gpu_peak, peak_gpu_under_10GB_ok=gpu_peak <= 10e9,
            gradient_vs_matmul_ok=min(r["gradient_vs_matmul"] or 0 for r in depth_rows) >= 0.4,
        )
        print(f"40 blocks would take {40 * per_block / 60:.1f} min; peak GPU {gpu_peak / 1e9:.2f} GB; gradient pass at "
              f"{min(r['gradient_vs_matmul'] or 0 for r in depth_rows):.2f} x the matmul rate")
    print(f"\npeak RSS {depth_rows[-1]['blocks']} blocks / {depth_rows[0]['blocks']} blocks: {ratio:.3f} "
          f"({'<=' if ratio <= 1.1 else '>'} 1.1); largest {worst / 1e9:.2f} GB")
    for r in rows:
        if r.get("gpu_budget"):
            from barber.budget import parse_bytes

            limit = parse_bytes(r["gpu_budget"])
            verdicts["gpu_budget_ratio"] = (r["peak_gpu"] or 0) / limit
            verdicts["gpu_budget_ok"] = (r["peak_gpu"] or 0) <= limit
            print(f"under --max-gpu-memory {r['gpu_budget']}: peak GPU {(r['peak_gpu'] or 0) / 2**30:.3f} GiB = "
                  f"{verdicts['gpu_budget_ratio']:.3f} x the budget")
        if r.get("budget"):
            from barber.budget import parse_bytes

            limit = parse_bytes(r["budget"])
            verdicts["budget_ratio"] = r["peak_rss"] / limit
            verdicts["budget_ok"] = r["peak_rss"] <= 1.1 * limit
            print(f"under --max-cpu-memory {r['budget']}: peak RSS {r['peak_rss'] / 2**30:.3f} GiB = "
                  f"{r['peak_rss'] / limit:.3f} x the budget ({'within' if verdicts['budget_ok'] else 'over'} 10%)")
    if args.json:
        payload = {
            "model": args.model, "config": cfg, "nsamples": args.nsamples, "seqlen": args.seqlen,
            "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "machine": platform.machine(), "extra_args": extra,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "matmul": mm, "runs": rows, "verdicts": verdicts,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if all(v for k, v in verdicts.items() if k.endswith("_ok") or k == "peak_under_6GB") else 1


if __name__ == "__main__":
    sys.exit(main())
