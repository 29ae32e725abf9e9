#!/usr/bin/env python
"""Random-weight checkpoints with the shapes of real models, for memory and speed benchmarks.

    .venv/bin/python tools/bench/make_synthetic_checkpoint.py --model llama-13b --blocks 8 --out /tmp/l13b-8
        [--dtype bfloat16|float16|float32] [--max-shard-size 5GB] [--seed 0] [--vocab-size N] [--overwrite]

Writes a Hugging Face directory barber (and transformers) can read: config.json with the preset's
shapes and `num_hidden_layers = --blocks`, safetensors shards named and ordered like
`save_pretrained` writes them (embedding, block 0, block 1, ..., final norm, output head; a new
shard whenever the next tensor would pass --max-shard-size; `model.safetensors.index.json` when
there is more than one shard), and the tokenizer of the fetched SmolLM2-135M (a 256-id byte-level
tokenizer when that asset is missing, with a warning).

Vocabulary: the preset's size, raised to the tokenizer's when smaller (LLaMA-1/2 presets have
32000 ids, the SmolLM2 tokenizer 49152), so every id the tokenizer produces has an embedding row
and `barber-stream --calib text` works; --vocab-size overrides it.

Memory stays at about one tensor: each tensor is generated when the streaming writer asks for it
(`barber.writer.write_safetensors`), from its own seed, so the bytes do not depend on sharding.
Linear weights are N(0, 0.02^2), embeddings N(0, 1), norms 1, biases N(0, 0.02^2).

Library use: `write_synthetic_checkpoint(out, "llama-13b", blocks=2)`; `PRESETS` lists the shapes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch

log = logging.getLogger("make_synthetic_checkpoint")

#: Real models' shapes (config.json fields). num_hidden_layers is the real depth, for reference.
PRESETS: dict[str, dict] = {
    "llama-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048,
                     rms_norm_eps=1e-6, rope_theta=10000.0),
    "llama-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=40, vocab_size=32000, max_position_embeddings=2048,
                      rms_norm_eps=1e-6, rope_theta=10000.0),
    "llama-30b": dict(model_type="llama", hidden_size=6656, intermediate_size=17920, num_hidden_layers=60,
                      num_attention_heads=52, num_key_value_heads=52, vocab_size=32000, max_position_embeddings=2048,
                      rms_norm_eps=1e-6, rope_theta=10000.0),
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama-2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096,
                        rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama-2-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
                        rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope_theta=500000.0),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
                       rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096),
    "qwen2-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                     rms_norm_eps=1e-6, rope_theta=1000000.0),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=100000.0),
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                         max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0,
                         num_local_experts=8, num_experts_per_tok=2),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                          max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                          num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True),
}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
LINEAR_STD = 0.02
EMBED_STD = 1.0


def parse_size(text: str) -> int:
    """A shard size such as 5GB, 2GiB or 500MB (barber's memory-size syntax) -> bytes."""
    from barber.budget import parse_bytes

    return parse_bytes(text)


def synthetic_config(model: str, blocks: int, dtype: torch.dtype, vocab_size: int) -> dict:
    """config.json of preset `model` with `blocks` layers, the storage dtype and the vocabulary."""
    if model not in PRESETS:
        raise ValueError(f"unknown model {model!r} (known: {', '.join(PRESETS)})")
    cfg = dict(PRESETS[model])
    cfg.update(
        num_hidden_layers=blocks, vocab_size=vocab_size, hidden_act="silu", tie_word_embeddings=False,
        torch_dtype=str(dtype).removeprefix("torch."), architectures=[_ARCHITECTURES[cfg["model_type"]]],
        bos_token_id=1, eos_token_id=2, initializer_range=LINEAR_STD, attention_bias=False,
    )
    return cfg


def tensor_order(ckpt_config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor in save_pretrained's order: embedding, blocks, final norm, head."""
    from barber.config import ModelConfig
    from barber.families import EMBED_KEYS, FINAL_KEYS, family_for

    cfg = ModelConfig.from_dict(ckpt_config)
    fam = family_for(ckpt_config["model_type"]).for_config(cfg)
    glob = fam.global_tensors(cfg)
    first = [glob[k] for k in EMBED_KEYS if k in glob]
    blocks = [
        (fam.block_tensor_name(i, local), tuple(shape))
        for i in range(cfg.num_layers)
        for local, shape in fam.block_shapes(cfg).items()
    ]
    last = [glob[k] for k in FINAL_KEYS if k in glob]
    return [(n, tuple(s)) for n, s in first] + blocks + [(n, tuple(s)) for n, s in last]


def make_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The random tensor `name`: seeded by (seed, name), so it does not depend on the sharding."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if "norm" in name and name.endswith(".weight"):
        return torch.ones(shape, dtype=dtype)
    std = EMBED_STD if "embed" in name else LINEAR_STD
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * std).to(dtype)


def shard_plan(order: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, max_shard: int) -> list[list[int]]:
    """Indices into `order` per shard: a new shard whenever the next tensor would pass `max_shard` bytes."""
    shards: list[list[int]] = [[]]
    size = 0
    for k, (_, shape) in enumerate(order):
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    return shards


def copy_tokenizer(out: Path) -> int:
    """Copy SmolLM2's tokenizer files into `out`; a byte-level tokenizer when the asset is missing.

    Returns the tokenizer's vocabulary size.
    """
    from barber import assets
    from barber.errors import DataError

    try:
        src = assets.smollm2_dir()
    except DataError as exc:
        log.warning("%s; writing a 256-id byte-level tokenizer instead", exc)
        return _write_byte_tokenizer(out / "tokenizer.json")
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def _write_byte_tokenizer(path: Path) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.save(str(path))
    return len(alphabet)


def write_synthetic_checkpoint(
    out: Path,
    model: str,
    blocks: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int = 5 * 10**9,
    seed: int = 0,
    vocab_size: int | None = None,
    progress: bool = False,
) -> Path:
    """Write the synthetic checkpoint directory `out` (must not exist or be empty); returns it."""
    from barber.writer import TensorSpec, write_json_atomic, write_safetensors

    if blocks < 1:
        raise ValueError(f"blocks must be at least 1, got {blocks}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok_vocab = copy_tokenizer(out)
    vocab = vocab_size or max(PRESETS[model]["vocab_size"], tok_vocab)
    if vocab < tok_vocab:
        log.warning("vocab size %d is below the tokenizer's %d: calibration text may not tokenize", vocab, tok_vocab)
    cfg = synthetic_config(model, blocks, dtype, vocab)
    write_json_atomic(out / "config.json", cfg)
    order = tensor_order(cfg)
    shards = shard_plan(order, dtype, max_shard_size)
    names = (
        ["model.safetensors"] if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    weight_map, total = {}, 0
    for fname, members in zip(names, shards):
        t0 = time.perf_counter()
        specs = [
            TensorSpec(order[k][0], dtype, order[k][1], lambda k=k: make_tensor(order[k][0], order[k][1], dtype, seed))
            for k in members
        ]
        total += write_safetensors(out / fname, specs, {"format": "pt"})
        weight_map.update({order[k][0]: fname for k in members})
        if progress:
            print(f"  wrote {fname}: {len(members)} tensors in {time.perf_counter() - t0:.1f} s", flush=True)
    if len(shards) > 1:
        tensor_bytes = sum(math.prod(s) * dtype.itemsize for _, s in order)
        write_json_atomic(out / "model.safetensors.index.json",
                          {"metadata": {"total_size": tensor_bytes}, "weight_map": weight_map})
    return out


def subset_checkpoint(pool: Path, out: Path, blocks: int) -> Path:
    """A checkpoint directory of the first `blocks` blocks of `pool`, linking (not copying) its shards.

    config.json gets `num_hidden_layers = blocks`; the index lists only the tensors of those blocks
    and the model-level ones (barber ignores the other tensors of a linked shard).
    """
    pool, out = Path(pool), Path(out)
    cfg = json.loads((pool / "config.json").read_text())
    if not 1 <= blocks <= cfg["num_hidden_layers"]:
        raise ValueError(f"blocks must be in [1, {cfg['num_hidden_layers']}], got {blocks}")
    index_path = pool / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = json.loads(index_path.read_text())["weight_map"]
    else:
        from barber.safetensors_format import read_safetensors_header

        weight_map = {name: "model.safetensors" for name in read_safetensors_header(pool / "model.safetensors")}
    cfg["num_hidden_layers"] = blocks
    wanted = {name for name, _ in tensor_order(cfg)}
    out.mkdir(parents=True, exist_ok=True)
    kept = {name: shard for name, shard in weight_map.items() if name in wanted}
    for shard in sorted(set(kept.values())):
        (out / shard).symlink_to((pool / shard).resolve())
    for f in pool.iterdir():
        if f.name not in weight_map.values() and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copyfile(f, out / f.name)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": kept}, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(PRESETS), default="llama-13b", help="shape preset")
    p.add_argument("--blocks", type=int, default=2, help="transformer blocks (num_hidden_layers)")
    p.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16", help="storage dtype")
    p.add_argument(
        "--max-shard-size", type=parse_size, default=parse_size("5GB"), help="largest shard, e.g. 5GB or 2GiB"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=None, help="embedding rows (default: max(preset, tokenizer))")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            p.error(f"--out {out} is not empty (use --overwrite)")
        shutil.rmtree(out)
    t0 = time.perf_counter()
    write_synthetic_checkpoint(
        out, args.model, args.blocks, dtype=getattr(torch, args.dtype), max_shard_size=args.max_shard_size,
        seed=args.seed, vocab_size=args.vocab_size, progress=True,
    )
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{args.model} x {args.blocks} blocks ({args.dtype}) -> {out}: {size / 1e9:.2f} GB in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
