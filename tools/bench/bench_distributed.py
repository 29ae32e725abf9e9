#!/usr/bin/env python
"""Data-parallel pruning on the CPU: wall time and bytes exchanged per block for 1, 2 and 3 ranks, and a
projection to 13B and 70B on 8 GPUs.

    .venv/bin/python tools/bench/bench_distributed.py [--ranks 1 2 3] [--model smollm2-135m] [--blocks 6]
        [--nsamples 24] [--seqlen 256] [--sample-groups 6] [--threads 2] [--json PATH] [--keep]
        [--project-nsamples 128 --project-seqlen 2048 --gpus 8 --bf16-tflops 400 --fp32-tflops 40
         --link-gbps 150] [-- EXTRA barber-stream ARGS]

Writes a random checkpoint of the preset's widths (tools/bench/make_synthetic_checkpoint.py) and prunes
it with `torchrun --standalone --nproc-per-node W -m barber.stream` (the default recipe unless EXTRA
says otherwise) for each W, each rank with max(1, --threads / W) torch threads. From each run's
barber_report.json: wall time, the per-block phases, and the bytes rank 0 sent and received per
block; the outputs must be byte-identical across W (checked).

Projection. The bytes per block follow from the shapes (`exchanged_bytes` below), checked against
the measured bytes. The work per block is split into what every rank does on its own windows
(forwards, statistics: divided by the ranks) and what rank 0 does alone (selection, re-fit solves),
counted in FLOPs from the shapes (`work_flops`) and checked against the CPU phase times: the
measured serial share of a block is printed next to the FLOP model's. For the projection the FLOPs
are turned into seconds with assumed GPU throughputs (--bf16-tflops for forwards in the compute dtype,
--fp32-tflops for float32 statistics and solves) and the bytes with an assumed link (--link-gbps,
per-rank bandwidth of point-to-point sends and broadcasts). These are assumptions, not measurements:
no GPU ran this.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools" / "bench"))

from make_synthetic_checkpoint import PRESETS, write_synthetic_checkpoint  # noqa: E402

#: The 8-GPU projections.
PROJECT = ("llama-2-13b", "llama-2-70b")


def shapes(model: str) -> dict:
    """The preset's widths: d, f (MLP), kv (key/value width), head count."""
    cfg = PRESETS[model]
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    kv = d // heads * cfg.get("num_key_value_heads", heads)
    return {"d": d, "f": f, "kv": kv, "heads": heads, "layers": cfg["num_hidden_layers"]}


def linears(sh: dict) -> dict[str, tuple[int, int]]:
    d, f, kv = sh["d"], sh["f"], sh["kv"]
    return {"q": (d, d), "k": (kv, d), "v": (kv, d), "o": (d, d), "gate": (f, d), "up": (f, d), "down": (d, f)}


def exchanged_bytes(sh: dict, groups: int, world: int, *, compute_bytes: int, refit: bool = True) -> dict:
    """Bytes rank 0 receives and sends per block in a run of the default recipe (Wanda + sub-block re-fit).

    Received: every statistic's partial of each group rank 0 does not own (barber.fold): Wanda's
    float64 sum of x^2 per input (4 inputs), the re-fit's float32 H per group of linears (4 groups),
    per second-stage linear (o, down) its B, diag(X_d^T X_s) (float64) and its target norm, and the
    float64 losses of the 2 sub-blocks. Sent (broadcast to the W-1 others): the initial masks bit-packed
    and the re-fitted weights in the compute dtype.
    """
    if world == 1:
        return {"received": 0, "sent": 0}
    d, f = sh["d"], sh["f"]
    lin = linears(sh)
    foreign = groups - len(range(0, groups, world))  # groups rank 0 receives
    per_group = 8 * (d + d + d + f)  # sum x^2 of the 4 distinct inputs, float64
    if refit:
        per_group += 4 * (d * d + d * d + d * d + f * f)  # H of q/k/v, o, gate/up, down inputs
        per_group += 4 * (lin["o"][0] * lin["o"][1] + lin["down"][0] * lin["down"][1])  # B of o and down
        per_group += 8 * (d + f) + 8 * 2  # diag(X_d^T X_s) and target norms of o and down
    per_group += 8 * 2  # the two sub-blocks' losses
    masks = sum(o * math.ceil(i / 8) for o, i in lin.values())
    weights = sum(o * i for o, i in lin.values()) * compute_bytes if refit else 0
    return {"received": foreign * per_group, "sent": (world - 1) * (masks + weights)}


def work_flops(sh: dict, nsamples: int, seqlen: int) -> dict:
    """FLOPs per block of the default recipe: per-rank work (divided by the ranks) and rank 0's alone.

    Parallel (all on the calibration tokens NT): the statistics pass (a dense block forward, and sum x^2),
    the re-fit's statistics (H of 4 inputs; for o and down a sparse and a dense forward of the sub-block
    up to that linear, B and the dense targets), the advance (sparse and dense sub-block forwards).
    Serial: the re-fit's conjugate gradients (8 iterations of an [out, in] x [in, in] matmul per linear,
    plus forming B = W_d H for the first stage), Wanda's selection (about 30 compares per weight).
    """
    d, f, nt = sh["d"], sh["f"], nsamples * seqlen
    lin = linears(sh)
    p_attn = sum(o * i for n, (o, i) in lin.items() if n in "qkvo")
    p_mlp = sum(o * i for n, (o, i) in lin.items() if n in ("gate", "up", "down"))
    attn_mix = 4 * seqlen * d * nt  # scores and values
    forward = 2 * (p_attn + p_mlp) * nt + attn_mix  # one dense block forward, in the compute dtype
    qkv, gate_up = p_attn - d * d, 2 * f * d
    forwards = forward + 2 * (2 * qkv * nt + attn_mix) + 2 * 2 * gate_up * nt + 2 * forward  # stats, refit, advance
    stats32 = 2 * nt * (d * d + d * d + d * d + f * f) + 2 * nt * (2 * d * d + 2 * d * f)  # H, B and targets
    solve = sum(8 * 2 * o * i * i for o, i in lin.values()) + 2 * 2 * (d * d * d + f * d * d)
    select = 30 * (p_attn + p_mlp)
    return {"parallel_bf16": forwards, "parallel_fp32": stats32, "serial_fp32": solve + select}


def digest(out: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(out.glob("*.safetensors")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def run(ckpt: Path, out: Path, ranks: int, args, extra: list[str]) -> dict:
    threads = max(1, args.threads // ranks)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           "-m", "barber.stream", "--ckpt", str(ckpt), "--out", str(out), "--calib", str(args.calib),
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--sample-groups",
           str(args.sample_groups), "--no-progress", "--overwrite", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{ranks} ranks failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / "barber_report.json").read_text())
    blocks = report["blocks"]
    phases: dict[str, float] = {}
    for b in blocks:
        for k, v in b["seconds"].items():
            phases[k] = phases.get(k, 0.0) + v / len(blocks)
    return {
        "ranks": ranks, "threads_per_rank": threads, "wall_s": wall, "prune_s": report["seconds"]["total"],
        "block_s": sum(sum(b["seconds"].values()) for b in blocks) / len(blocks), "phases": phases,
        "exchanged_per_block": [b.get("exchanged_bytes", 0) for b in blocks],
        "bytes_sent": report["parallel"]["bytes_sent"], "bytes_received": report["parallel"]["bytes_received"],
        "peak_rss": report["peak_rss"] if "peak_rss" in report else None, "digest": digest(out),
    }


def project(model: str, args, compute_bytes: int) -> dict:
    sh = shapes(model)
    flops = work_flops(sh, args.project_nsamples, args.project_seqlen)
    out = {"model": model, "layers": sh["layers"]}
    for world in (1, args.gpus):
        ex = exchanged_bytes(sh, args.sample_groups_projected, world, compute_bytes=compute_bytes)
        par = flops["parallel_bf16"] / (args.bf16_tflops * 1e12) + flops["parallel_fp32"] / (args.fp32_tflops * 1e12)
        ser = flops["serial_fp32"] / (args.fp32_tflops * 1e12)
        comm = (ex["received"] + ex["sent"] / max(world - 1, 1)) / (args.link_gbps * 1e9)
        block = par / world + ser + comm
        out[f"w{world}"] = {"block_s": block, "total_h": block * sh["layers"] / 3600, "parallel_s": par / world,
                            "serial_s": ser, "comm_s": comm, "bytes_per_block": ex["received"] + ex["sent"]}
    out["speedup"] = out["w1"]["block_s"] / out[f"w{args.gpus}"]["block_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--model", choices=list(PRESETS), default="smollm2-135m")
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--nsamples", type=int, default=24)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--sample-groups", type=int, default=6)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads shared by the ranks")
    p.add_argument("--project-nsamples", type=int, default=128)
    p.add_argument("--project-seqlen", type=int, default=2048)
    p.add_argument("--sample-groups-projected", type=int, default=8)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--bf16-tflops", type=float, default=400.0, help="assumed achieved bf16 matmul TFLOP/s per GPU")
    p.add_argument("--fp32-tflops", type=float, default=40.0, help="assumed achieved fp32 matmul TFLOP/s per GPU")
    p.add_argument("--link-gbps", type=float, default=150.0, help="assumed GB/s per rank for sends and broadcasts")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    if "--recipe" in extra and extra[extra.index("--recipe") + 1] != "refit":
        print("note: the byte and FLOP models describe the default recipe; EXTRA changes what runs", flush=True)

    work = Path(tempfile.mkdtemp(prefix="barber-dist-"))
    try:
        import torch

        ckpt = work / "ckpt"
        write_synthetic_checkpoint(ckpt, args.model, blocks=args.blocks, dtype=torch.float32)

        args.calib = work / "ids.pt"
        vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
        torch.save(torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0)),
                   args.calib)
        runs = [run(ckpt, work / f"out-{w}", w, args, extra) for w in args.ranks]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    sh = shapes(args.model)
    same = len({r["digest"] for r in runs}) == 1
    print(f"{args.model} widths, {args.blocks} blocks, {args.nsamples} x {args.seqlen} calibration tokens, "
          f"{args.sample_groups} sample groups, {args.threads} threads in all, float32")
    print("| ranks | threads/rank | wall s | prune s | s/block | rank-0 bytes/block measured | model |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        ex = exchanged_bytes(sh, args.sample_groups, r["ranks"], compute_bytes=4)
        measured = max(r["exchanged_per_block"]) if r["exchanged_per_block"] else 0
        print(f"| {r['ranks']} | {r['threads_per_rank']} | {r['wall_s']:.1f} | {r['prune_s']:.1f} | "
              f"{r['block_s']:.2f} | {measured / 2**20:.2f} MiB | {(ex['received'] + ex['sent']) / 2**20:.2f} MiB |")
    print("outputs byte-identical across ranks:", "yes" if same else "NO")
    base = runs[0]["phases"]
    serial = base.get("select", 0.0) + base.get("solve", 0.0)
    flops = work_flops(sh, args.nsamples, args.seqlen)
    model_share = flops["serial_fp32"] / sum(flops.values())
    print(f"serial share of a block (1 rank): measured {serial / max(runs[0]['block_s'], 1e-9):.2f} "
          f"(select + solve), FLOP model {model_share:.2f}")
    projections = [project(m, args, compute_bytes=2) for m in PROJECT]
    print(f"\nprojection (assumed {args.bf16_tflops:g} bf16 / {args.fp32_tflops:g} fp32 TFLOP/s per GPU, "
          f"{args.link_gbps:g} GB/s per rank; {args.project_nsamples} x {args.project_seqlen} tokens, "
          f"{args.sample_groups_projected} sample groups, bfloat16)")
    print(f"| model | 1 GPU s/block | {args.gpus} GPUs s/block (parallel + rank-0 + exchange) | GB/block | "
          f"1 GPU h | {args.gpus} GPUs h | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for pr in projections:
        one, many = pr["w1"], pr[f"w{args.gpus}"]
        print(f"| {pr['model']} | {one['block_s']:.1f} | {many['block_s']:.1f} ({many['parallel_s']:.1f} + "
              f"{many['serial_s']:.1f} + {many['comm_s']:.1f}) | {many['bytes_per_block'] / 1e9:.2f} | "
              f"{one['total_h']:.2f} | {many['total_h']:.2f} | {pr['speedup']:.1f}x |")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "projections": projections, "args": {
            k: str(v) for k, v in vars(args).items()}}, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
