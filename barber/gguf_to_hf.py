"""A llama GGUF file as a Hugging Face directory: the conversion behind the SmolLM2-135M asset.

`convert_gguf` dequantizes every tensor to float32, undoes llama.cpp's rotary row permutation of
Q and K, renames the tensors, and writes config.json, model.safetensors, tokenizer.json,
tokenizer_config.json and generation_config.json. Used by `barber.fetch`; needs the optional
`gguf` package (extra "assets"), imported only when a conversion runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

from barber.errors import FetchError

#: The LLaMA facts the GGUF must state (shared/data/README.md); a mismatch aborts the conversion.
SMOLLM2_FACTS = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
}


def unpermute_qk(w, n_heads: int):
    """Undo llama.cpp's rotary row permutation of a Q or K weight `[n_heads*head_dim, in]`.

    llama.cpp stores rows as `w.reshape(heads, 2, head_dim/2, in).swapaxes(1, 2)`; this view
    `[heads, head_dim/2, 2, in]` swapped back restores the Hugging Face row order. Works on numpy
    arrays and torch tensors; 1-D tensors (biases) are handled as `[rows, 1]`.
    """
    shape = tuple(w.shape)
    rows = shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot un-permute {rows} rows over {n_heads} heads")
    inner = shape[1:] if len(shape) > 1 else (1,)
    v = w.reshape(n_heads, rows // n_heads // 2, 2, *inner).swapaxes(1, 2)
    return v.reshape(shape)


def gguf_to_hf_name(name: str) -> str:
    """Map a llama GGUF tensor name to its Hugging Face name."""
    top = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if name in top:
        return top[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    parts = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    if not m or m.group(2) not in parts:
        raise FetchError(f"unexpected GGUF tensor {name}")
    return f"model.layers.{m.group(1)}.{parts[m.group(2)]}.{m.group(3)}"


def gguf_field(reader, key: str, default=None):
    """A GGUF metadata value (scalar, string or list), or `default` if absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def float32_repr(x: float) -> float:
    """The shortest decimal that rounds to the same float32 (1e-05, not 9.99999974e-06)."""
    import numpy as np

    return float(str(np.float32(x)))


def gguf_llama_config(reader) -> dict:
    """A transformers `LlamaConfig` dict from the GGUF metadata, checked against SMOLLM2_FACTS."""
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise FetchError(f"GGUF architecture is {arch!r}, expected 'llama'")
    g = lambda k: gguf_field(reader, f"llama.{k}")  # noqa: E731
    hidden, heads = int(g("embedding_length")), int(g("attention.head_count"))
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g("attention.head_count_kv")),
        "head_dim": int(g("rope.dimension_count") or hidden // heads),
        "vocab_size": int(g("vocab_size") or len(tokens)),
        "max_position_embeddings": int(g("context_length")),
        "rope_theta": float32_repr(g("rope.freq_base")),
        "rope_scaling": None,
        "rms_norm_eps": float32_repr(g("attention.layer_norm_rms_epsilon")),
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "tie_word_embeddings": True,
        "bos_token_id": int(gguf_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(gguf_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(gguf_field(reader, "tokenizer.ggml.padding_token_id", 2)),
        "torch_dtype": "float32",
    }
    bad = {k: (cfg[k], v) for k, v in SMOLLM2_FACTS.items() if cfg[k] != v}
    if bad:
        raise FetchError(f"GGUF metadata disagrees with the expected SmolLM2-135M shape: {bad}")
    return cfg


def gguf_tensors(reader, cfg: dict) -> Iterator[tuple[str, "object"]]:
    """Yield `(hf_name, float32 numpy array [out, in])` for every tensor of a llama GGUF."""
    import numpy as np
    from gguf.quants import dequantize

    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF stores innermost first
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if kind in heads:
            w = unpermute_qk(w, heads[kind])
        yield gguf_to_hf_name(t.name), np.ascontiguousarray(w)


def gguf_tokenizer(reader):
    """A `tokenizers.Tokenizer` (byte-level BPE) from the GGUF metadata.

    Built like transformers' GGUF export of a `gpt2`-type vocabulary (GPT2Tokenizer: BPE with the
    file's vocabulary and merges, ByteLevel pre-tokenizer without prefix space and with the GPT-2
    split regex, ByteLevel decoder), plus the tokens the file marks CONTROL (type 3) as special
    added tokens and USER_DEFINED (type 4) as plain added tokens. No BOS/EOS is added.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    model = gguf_field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise FetchError(f"GGUF tokenizer model is {model!r}, expected 'gpt2' (byte-level BPE)")
    tokens = list(gguf_field(reader, "tokenizer.ggml.tokens"))
    types = list(gguf_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ")) for m in gguf_field(reader, "tokenizer.ggml.merges")]
    alphabet = set(byte_to_unicode().values())
    spelling = byte_to_unicode()
    vocab = {}
    for i, tok in enumerate(tokens):
        spelled = tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab[spelled] = i
    tk = Tokenizer(
        BPE(
            vocab=vocab, merges=merges, dropout=None,
            continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
        )
    )
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    control = [t for t, ty in zip(tokens, types) if ty == 3 and set(t) <= alphabet]
    user = [t for t, ty in zip(tokens, types) if ty == 4 and t in vocab]
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    if user:
        tk.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return tk


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_config(reader) -> dict:
    """tokenizer_config.json for the GGUF tokenizer (fast tokenizer, no BOS/EOS added)."""
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    name = lambda key: tokens[int(gguf_field(reader, key))] if key in reader.fields else None  # noqa: E731
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(gguf_field(reader, "llama.context_length")),
    }
    template = gguf_field(reader, "tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    return cfg


def convert_gguf(gguf_path: Path, out_dir: Path) -> dict:
    """Write a Hugging Face directory for a llama GGUF into `out_dir`; returns the config dict."""
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    reader = GGUFReader(str(gguf_path))
    cfg = gguf_llama_config(reader)
    tensors = dict(gguf_tensors(reader, cfg))
    if "lm_head.weight" in tensors:
        cfg["tie_word_embeddings"] = False
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    n_params = sum(int(t.size) for t in tensors.values())
    del tensors
    write_json(out_dir / "config.json", cfg)
    write_json(
        out_dir / "generation_config.json",
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "pad_token_id": cfg["pad_token_id"]},
    )
    gguf_tokenizer(reader).save(str(out_dir / "tokenizer.json"))
    write_json(out_dir / "tokenizer_config.json", tokenizer_config(reader))
    cfg["_n_params"] = n_params
    return cfg


def write_json(path: Path, obj: dict) -> None:
    """Write `obj` as indented JSON."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
