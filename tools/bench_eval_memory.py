#!/usr/bin/env python
"""Peak RSS of `barber-eval` on random LLaMA-13B-width checkpoints of 2, 4 and 8 blocks.

Writes random-weight blocks (hidden 5120, intermediate 13824, 40 heads; bfloat16 storage, ~0.63 GB per
block) one at a time into a scratch directory, builds one checkpoint directory per depth that links to
the shared shard files, runs `barber-eval` on each in a fresh interpreter and prints its peak RSS
(VmHWM of the child) and wall time. The scratch directory is deleted afterwards unless --keep.

Acceptance (issue #3): peak RSS for 8 blocks <= 1.1x that for 2 blocks, and under 4 GB.

Usage:
    .venv/bin/python tools/bench_eval_memory.py [--blocks 2 4 8] [--workdir /tmp] [--seqlen 128] [--windows 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HIDDEN, INTERMEDIATE, HEADS, VOCAB = 5120, 13824, 40, 32000

_CHILD = textwrap.dedent(
    """
    import sys
    from barber.cli import eval_main
    rc = eval_main(sys.argv[1:])
    hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0].split()[1]
    print("PEAK_RSS_KB", hwm, file=sys.stderr)
    sys.exit(rc)
    """
)


def config(layers: int) -> dict:
    return {
        "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
        "vocab_size": VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }


def write_pool(pool: Path, blocks: int, seed: int) -> None:
    """One shard with the model-level tensors, then one shard per block, generated block by block."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float32) * std).to(torch.bfloat16)

    save_file({
        "model.embed_tokens.weight": rand(VOCAB, HIDDEN, std=1.0),
        "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
        "lm_head.weight": rand(VOCAB, HIDDEN),
    }, str(pool / "globals.safetensors"))
    for i in range(blocks):
        t0 = time.perf_counter()
        p = f"model.layers.{i}."
        tensors = {p + f"self_attn.{n}_proj.weight": rand(HIDDEN, HIDDEN) for n in "qkvo"}
        tensors[p + "mlp.gate_proj.weight"] = rand(INTERMEDIATE, HIDDEN)
        tensors[p + "mlp.up_proj.weight"] = rand(INTERMEDIATE, HIDDEN)
        tensors[p + "mlp.down_proj.weight"] = rand(HIDDEN, INTERMEDIATE)
        tensors[p + "input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        save_file(tensors, str(pool / f"block-{i:03d}.safetensors"))
        del tensors
        print(f"  wrote block {i} ({time.perf_counter() - t0:.1f} s)", flush=True)


def make_checkpoint(pool: Path, root: Path, layers: int) -> Path:
    """A checkpoint directory of the first `layers` blocks, linking the pool's shard files."""
    from safetensors import safe_open

    root.mkdir()
    weight_map = {}
    for shard in ["globals.safetensors"] + [f"block-{i:03d}.safetensors" for i in range(layers)]:
        os.symlink(pool / shard, root / shard)
        with safe_open(str(pool / shard), "pt") as f:
            weight_map.update({name: shard for name in f.keys()})
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps(config(layers)))
    write_byte_tokenizer(root / "tokenizer.json")
    return root


def write_byte_tokenizer(path: Path) -> None:
    """A 256-token byte-level tokenizer.json (enough to feed the random model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.save(str(path))


def run_eval(ckpt: Path, text: Path, args: argparse.Namespace) -> tuple[float, float, str]:
    """(peak RSS in bytes, wall seconds, perplexity line) of one barber-eval run in a fresh interpreter."""
    argv = ["--ckpt", str(ckpt), "--text", str(text), "--seqlen", str(args.seqlen), "--max-windows",
            str(args.windows), "--dtype", args.dtype, "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"barber-eval failed on {ckpt}:\n{proc.stderr}")
    kb = [ln for ln in proc.stderr.splitlines() if ln.startswith("PEAK_RSS_KB")][-1].split()[1]
    return int(kb) * 1024, wall, proc.stdout.strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8])
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
        print(f"writing {max(args.blocks)} random blocks at LLaMA-13B width to {pool}", flush=True)
        write_pool(pool, max(args.blocks), args.seed)
        text = scratch / "text.txt"
        text.write_text("The quick brown fox jumps over the lazy dog. " * (args.seqlen * args.windows // 10 + 10))
        rows = []
        for layers in args.blocks:
            ckpt = make_checkpoint(pool, scratch / f"L{layers}", layers)
            rss, wall, line = run_eval(ckpt, text, args)
            rows.append((layers, rss, wall))
            print(f"  {layers} blocks: peak RSS {rss / 2**30:.3f} GiB, {wall:.1f} s  [{line}]", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    print(f"\nbarber-eval, hidden {HIDDEN}, intermediate {INTERMEDIATE}, {HEADS} heads, bf16 storage, "
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
