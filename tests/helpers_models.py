"""Test helpers: tiny random transformers models per family, saved as barber-readable checkpoints.

The pruner's tests reuse these, so they form a small function API:

- `tiny_config(family, layers=2, **overrides)` -> a transformers config;
- `make_tiny_model(family, *, layers=2, seed=0, **overrides)` -> a float32 transformers model in eval mode,
  every parameter randomised (norm weights around 1, non-zero biases) so that parity tests can fail;
- `save_checkpoint(model, path, *, shards=1, dtype=None)` -> path: config.json, safetensors (single file
  or `shards` files with an index) and a byte-level tokenizer.json;
- `make_tiny_checkpoint(tmp_path, family, *, layers=2, shards=1, dtype=torch.float32, seed=0, **overrides)`
  -> the checkpoint directory (the model is built, saved and dropped);
- `write_byte_tokenizer(path)`: a 256-token byte-level tokenizer.json (ids 0..255 are the bytes).

transformers is a test-only dependency; it is imported lazily.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

#: Mixture-of-experts families (their transformers models hold experts as 3-D tensors; saved per expert).
MOE_NAMES = ("mixtral", "qwen2_moe", "qwen3_moe")
FAMILY_NAMES = ("llama", "mistral", "qwen2", "opt", "qwen3", "phi3", "gemma2", "gemma3_text") + MOE_NAMES
#: Families whose transformers model refuses SDPA (soft-capped attention): built with eager attention.
_EAGER = ("gemma2",)
#: Families whose norms scale by (1 + w): their random norm weights sit around 0, not 1.
_ONE_PLUS_NORM = ("gemma2", "gemma3_text")

#: Small shapes per family; vocab >= 256 so the byte tokenizer fits every model.
_BASE = {
    "llama": dict(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=300, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "mistral": dict(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1,
        vocab_size=300, max_position_embeddings=256, sliding_window=16, tie_word_embeddings=False,
    ),
    "qwen2": dict(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=300, max_position_embeddings=256, tie_word_embeddings=False,
    ),
    "opt": dict(
        hidden_size=64, ffn_dim=96, num_attention_heads=4, vocab_size=300, max_position_embeddings=256,
        word_embed_proj_dim=64, do_layer_norm_before=True, pad_token_id=1,
    ),
    "qwen3": dict(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        vocab_size=300, max_position_embeddings=256, tie_word_embeddings=False,
    ),
    "phi3": dict(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=300, max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    ),
    "gemma2": dict(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        vocab_size=300, max_position_embeddings=256, sliding_window=16, query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
    ),
    "gemma3_text": dict(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        vocab_size=300, max_position_embeddings=256, sliding_window=16, query_pre_attn_scalar=24,
        sliding_window_pattern=2, rope_local_base_freq=100.0,
    ),
    "mixtral": dict(
        hidden_size=64, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=300, max_position_embeddings=256, tie_word_embeddings=False,
        num_local_experts=4, num_experts_per_tok=2,
    ),
    "qwen2_moe": dict(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=300, max_position_embeddings=256, tie_word_embeddings=False,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
    ),
    "qwen3_moe": dict(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        vocab_size=300, max_position_embeddings=256, tie_word_embeddings=False,
        num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
    ),
}


def tiny_config(family: str, layers: int = 2, **overrides):
    """A transformers config for a tiny `family` model with `layers` blocks."""
    from transformers import AutoConfig

    kwargs = {**_BASE[family], "num_hidden_layers": layers, **overrides}
    return AutoConfig.for_model(family, **kwargs)


def make_tiny_model(family: str, *, layers: int = 2, seed: int = 0, **overrides):
    """A random float32 transformers causal LM in eval mode (SDPA attention)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, layers, **overrides)
    torch.manual_seed(seed)
    attn = "eager" if family in _EAGER else "sdpa"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    norm_centre = 0.0 if family in _ONE_PLUS_NORM else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm.weight" in name or "layer_norm.weight" in name:
                p.copy_(norm_centre + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
    return model.eval()


def save_checkpoint(model, path: Path, *, shards: int = 1, dtype: torch.dtype | None = None) -> Path:
    """Save `model` as a Hugging Face directory barber can read; returns `path`.

    Tied output heads are not stored (as transformers does). With shards > 1 the tensors are spread
    round-robin over `shards` files plus a `model.safetensors.index.json`.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    state = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in _stored_state(model).items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    names = sorted(state)
    if shards <= 1:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: state[n] for n in names[s::shards]}
            save_file(part, str(path / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    write_byte_tokenizer(path / "tokenizer.json")
    return path


def _stored_state(model) -> dict[str, torch.Tensor]:
    """The tensors as a Hugging Face checkpoint stores them: transformers' own saving, which writes a
    mixture of experts per expert (``experts.{e}.w1`` ...), not as the 3-D tensors the model holds."""
    if model.config.model_type not in MOE_NAMES:
        return model.state_dict()
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        state = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            state.update(load_file(str(f)))
    return state


def make_tiny_checkpoint(
    tmp_path: Path,
    family: str,
    *,
    layers: int = 2,
    shards: int = 1,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    name: str | None = None,
    **config_overrides,
) -> Path:
    """Build a tiny random `family` model and save it under `tmp_path`; returns the checkpoint directory."""
    model = make_tiny_model(family, layers=layers, seed=seed, **config_overrides)
    out = Path(tmp_path) / (name or f"{family}-{layers}L-{shards}s")
    return save_checkpoint(model, out, shards=shards, dtype=dtype)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by ByteLevel pre-tokenizers."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_byte_tokenizer(path: Path) -> Path:
    """A byte-level tokenizer.json whose id for each token is its UTF-8 byte value (no merges, no specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path))
    return Path(path)


def read_shards(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in `path`, as stored (name -> tensor)."""
    from safetensors import safe_open

    out = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out
