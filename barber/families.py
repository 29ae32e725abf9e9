"""Model families as data: tensor names and block structure of llama, mistral, qwen2 and opt.

A `FamilySpec` says where each tensor lives in a Hugging Face checkpoint and how a block is wired
(norm kind, gated or fc MLP (a gate linear or none), rotary or learned positions, which linears form the
attention and the MLP sub-blocks). `barber.model` turns it into math; `barber.checkpoint` uses it to find and check
tensors. Adding a family is adding a table entry, not a module.

Block-local names are the names inside one block, e.g. ``self_attn.q_proj.weight``; the full name
is ``block_prefix.format(i=i) + local``. Model-level tensors use fixed keys (see `GLOBAL_KEYS`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from barber.config import ModelConfig
from barber.errors import CheckpointError

#: Keys of the model-level (non-block) weights before the first block (`Checkpoint.embedding_weights`,
#: what `barber.model.Arch.embed` needs) and after the last (`Checkpoint.final_weights`).
EMBED_KEYS = ("embed_tokens", "embed_positions", "project_in")
FINAL_KEYS = ("norm.weight", "norm.bias", "project_out", "lm_head")
GLOBAL_KEYS = EMBED_KEYS + FINAL_KEYS


@dataclass(frozen=True)
class FamilySpec:
    """How one model family lays out its tensors and wires a block.

    Attributes:
        name: the `model_type` this spec serves.
        block_prefix: full-name prefix of block i, with an ``{i}`` field.
        norm: "rms" (RMSNorm, weight only) or "layer" (LayerNorm, weight and bias).
        positions: "rope" (rotary, cos/sin passed in) or "learned" (table added to the embeddings).
        position_offset: row offset into the learned position table (OPT: 2).
        attn_norm / mlp_norm: block-local names of the two norms (without ``.weight``).
        q, k, v, o: block-local names of the attention linears (without ``.weight``).
        gate, up, down: block-local names of the MLP linears: down(act(gate(x)) * up(x)), or for an fc MLP
            (gate None) fc2(act(fc1(x))) with up = fc1, down = fc2.
        qkv_bias: q/k/v always carry biases (Qwen2), whatever `attention_bias` says.
        scale_query_before: OPT multiplies q by head_dim**-0.5 before the dot product (same math, other rounding).
        embed_tokens, embed_positions, project_in, project_out, final_norm, lm_head: full names of the
            model-level tensors (``final_norm`` without ``.weight``); None where the family has none.
    """

    name: str
    block_prefix: str
    norm: str
    positions: str
    position_offset: int
    attn_norm: str
    mlp_norm: str
    q: str
    k: str
    v: str
    o: str
    gate: str | None
    up: str
    down: str
    qkv_bias: bool
    scale_query_before: bool
    embed_tokens: str
    embed_positions: str | None
    project_in: str | None
    project_out: str | None
    final_norm: str
    lm_head: str

    @property
    def attn_linears(self) -> tuple[str, ...]:
        """Linears of the attention sub-block, in forward order: q, k, v, o."""
        return (self.q, self.k, self.v, self.o)

    @property
    def mlp_linears(self) -> tuple[str, ...]:
        """Linears of the MLP sub-block, in forward order: (gate,) up, down."""
        return ((self.gate,) if self.gate else ()) + (self.up, self.down)

    @property
    def linears(self) -> tuple[str, ...]:
        """Every prunable linear of a block (attention then MLP)."""
        return self.attn_linears + self.mlp_linears

    def block_tensor_name(self, i: int, local: str) -> str:
        """Full checkpoint name of block-local tensor `local` in block `i`."""
        return self.block_prefix.format(i=i) + local

    def block_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Every tensor a block must have, block-local name -> shape, as config.json implies."""
        d, f = cfg.hidden_size, cfg.intermediate_size
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        shapes: dict[str, tuple[int, ...]] = {}
        attn_bias = cfg.attention_bias
        for name, shape, bias in (
            (self.q, (q_out, d), attn_bias or self.qkv_bias),
            (self.k, (kv_out, d), attn_bias or self.qkv_bias),
            (self.v, (kv_out, d), attn_bias or self.qkv_bias),
            (self.o, (d, q_out), attn_bias),
        ):
            shapes[name + ".weight"] = shape
            if bias:
                shapes[name + ".bias"] = shape[:1]
        mlp = [(self.up, (f, d)), (self.down, (d, f))]
        if self.gate:
            mlp.insert(0, (self.gate, (f, d)))
        for name, shape in mlp:
            shapes[name + ".weight"] = shape
            if cfg.mlp_bias:
                shapes[name + ".bias"] = shape[:1]
        for norm in (self.attn_norm, self.mlp_norm):
            if self.norm == "rms" or cfg.norm_affine:
                shapes[norm + ".weight"] = (d,)
            if self.norm == "layer" and cfg.norm_affine:
                shapes[norm + ".bias"] = (d,)
        return shapes

    def global_tensors(self, cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Model-level tensors: key (see GLOBAL_KEYS) -> (full name, shape). lm_head is absent when tied."""
        d, e = cfg.hidden_size, cfg.word_embed_proj_dim or cfg.hidden_size
        out: dict[str, tuple[str, tuple[int, ...]]] = {"embed_tokens": (self.embed_tokens, (cfg.vocab_size, e))}
        if self.positions == "learned" and self.embed_positions:
            rows = cfg.max_position_embeddings + self.position_offset
            out["embed_positions"] = (self.embed_positions, (rows, d))
        if e != d:
            if not (self.project_in and self.project_out):
                raise CheckpointError(f"{self.name}: embedding width {e} != hidden size {d} is not supported")
            out["project_in"] = (self.project_in, (d, e))
            out["project_out"] = (self.project_out, (e, d))
        has_final_norm = self.norm == "rms" or cfg.final_layer_norm
        if has_final_norm and (self.norm == "rms" or cfg.norm_affine):
            out["norm.weight"] = (self.final_norm + ".weight", (d,))
            if self.norm == "layer":
                out["norm.bias"] = (self.final_norm + ".bias", (d,))
        if not cfg.tie_word_embeddings:
            out["lm_head"] = (self.lm_head, (cfg.vocab_size, e))
        return out


_LLAMA = FamilySpec(
    name="llama",
    block_prefix="model.layers.{i}.",
    norm="rms",
    positions="rope",
    position_offset=0,
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    gate="mlp.gate_proj",
    up="mlp.up_proj",
    down="mlp.down_proj",
    qkv_bias=False,
    scale_query_before=False,
    embed_tokens="model.embed_tokens.weight",
    embed_positions=None,
    project_in=None,
    project_out=None,
    final_norm="model.norm",
    lm_head="lm_head.weight",
)

_OPT = FamilySpec(
    name="opt",
    block_prefix="model.decoder.layers.{i}.",
    norm="layer",
    positions="learned",
    position_offset=2,
    attn_norm="self_attn_layer_norm",
    mlp_norm="final_layer_norm",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.out_proj",
    gate=None,
    up="fc1",
    down="fc2",
    qkv_bias=False,
    scale_query_before=True,
    embed_tokens="model.decoder.embed_tokens.weight",
    embed_positions="model.decoder.embed_positions.weight",
    project_in="model.decoder.project_in.weight",
    project_out="model.decoder.project_out.weight",
    final_norm="model.decoder.final_layer_norm",
    lm_head="lm_head.weight",
)

FAMILIES: dict[str, FamilySpec] = {
    "llama": _LLAMA,
    "mistral": dataclasses.replace(_LLAMA, name="mistral"),
    "qwen2": dataclasses.replace(_LLAMA, name="qwen2", qkv_bias=True),
    "opt": _OPT,
}


def family_for(model_type: str) -> FamilySpec:
    """The spec for `model_type`; an unsupported type is a CheckpointError listing the supported ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise CheckpointError(
            f"unsupported model_type {model_type!r} (supported: {', '.join(sorted(FAMILIES))})"
        ) from None
