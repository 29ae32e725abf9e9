"""Model families as data: tensor names and block structure of every supported `model_type`.

A `FamilySpec` says where each tensor lives in a Hugging Face checkpoint and how a block is wired:
the norm kind (RMSNorm, Gemma's (1 + w) RMSNorm, LayerNorm), a gated or fc MLP, rotary or learned
positions, per-head q/k norms (Qwen3, Gemma 3), sandwich norms after the attention and the MLP (Gemma 2
and 3), embeddings scaled by sqrt(hidden) (Gemma), and fused projections stored as one matrix (Phi-3's
``qkv_proj`` and ``gate_up_proj``). `barber.model` turns it into math; `barber.checkpoint` uses it to find
and check tensors. Adding a family is adding a table entry, not a module.

Block-local names are the names inside one block, e.g. ``self_attn.q_proj.weight``; the full name
is ``block_prefix.format(i=i) + local``. Model-level tensors use fixed keys (see `GLOBAL_KEYS`).

Linear names come in two kinds. *Logical* linears are the model's projections (q, k, v, o, gate, up,
down); *stored* linears are the matrices of the checkpoint, which the pruner prunes and writes. They
are the same except where a family fuses several logical linears into one stored matrix
(`FamilySpec.fused`): its rows are the parts' rows one after another, so per-row statistics, masks
and rebuild rows of the fused matrix are exactly those of its parts. `FamilySpec.linears` and the
sub-block name lists are stored names; `FamilySpec.fused_parts` says which rows hold which part.

Mixture-of-experts families (`FamilySpec.moe`, a `barber.moe.MoESpec`) replace the MLP by a router and routed
experts (and Qwen2-MoE's gated shared expert). Their linear names depend on the number of experts, so
such a spec is resolved for one config with `FamilySpec.for_config` (`barber.model.Arch` and
`barber.checkpoint.Checkpoint` do it); the routers stay dense and are not in `linears`.

Model types that are not in `FAMILIES` are refused with one line naming the `model_type`
(`family_for`); `REFUSED` gives the reason for the ones people ask for.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from barber.config import ModelConfig
from barber.errors import CheckpointError
from barber.moe import MoESpec

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
        norm: "rms" (RMSNorm, ``w * x``), "rms1p" (Gemma's RMSNorm, ``(1 + w) * x`` in float32) or
            "layer" (LayerNorm, weight and bias). Every norm of the model (block, q/k, final) is of this kind.
        positions: "rope" (rotary, cos/sin passed in) or "learned" (table added to the embeddings).
        position_offset: row offset into the learned position table (OPT: 2).
        attn_norm / mlp_norm: block-local names of the two input norms (without ``.weight``).
        attn_out_norm / mlp_out_norm: the sandwich norms applied to the attention and MLP outputs before
            the residual add (Gemma 2 and 3), or None.
        q_norm / k_norm: per-head norms over head_dim applied to q and k before the rotary embedding
            (Qwen3, Gemma 3), or None.
        q, k, v, o: block-local names of the logical attention linears (without ``.weight``).
        gate, up, down: block-local names of the logical MLP linears: down(act(gate(x)) * up(x)), or for an
            fc MLP (gate None) fc2(act(fc1(x))) with up = fc1, down = fc2.
        fused: stored matrices that hold several logical linears, as (stored name, logical parts in row
            order); e.g. Phi-3's ``self_attn.qkv_proj`` holds q, k, v.
        qkv_bias: q/k/v always carry biases (Qwen2), whatever `attention_bias` says.
        scale_query_before: OPT multiplies q by head_dim**-0.5 before the dot product (same math, other rounding).
        scale_embeddings: the token embeddings are multiplied by sqrt(hidden_size) (Gemma).
        attn_softcapping: the family applies config.json's `attn_logit_softcapping` (Gemma 2). Gemma 3's
            transformers code ignores that field, so barber does too: the same outputs as transformers.
        embed_tokens, embed_positions, project_in, project_out, final_norm, lm_head: full names of the
            model-level tensors (``final_norm`` without ``.weight``); None where the family has none.
        moe: the mixture-of-experts layout of the MLP (then gate/up/down are unused), or None.
        experts: the number of routed experts the spec is resolved for (`for_config`); 0 before.
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
    attn_out_norm: str | None = None
    mlp_out_norm: str | None = None
    q_norm: str | None = None
    k_norm: str | None = None
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    scale_embeddings: bool = False
    attn_softcapping: bool = False
    moe: MoESpec | None = None
    experts: int = 0

    def for_config(self, cfg: ModelConfig) -> "FamilySpec":
        """This spec resolved for `cfg`: a mixture-of-experts spec learns its number of experts."""
        if self.moe is None or self.experts == cfg.num_experts:
            return self
        return dataclasses.replace(self, experts=cfg.num_experts)

    def _check_resolved(self) -> None:
        if self.moe is not None and self.experts == 0:
            raise ValueError(f"{self.name}: resolve the spec with for_config(config) first")

    # ---- linears -------------------------------------------------------------------------------

    def stored_name(self, logical: str) -> str:
        """The stored matrix that holds logical linear `logical` (itself unless fused)."""
        for stored, parts in self.fused:
            if logical in parts:
                return stored
        return logical

    def fused_group(self, logicals: tuple[str, ...]) -> str | None:
        """The stored name when `logicals` are exactly the parts of one fused matrix, in order; else None."""
        for stored, parts in self.fused:
            if parts == logicals:
                return stored
        if any(self.stored_name(n) != n for n in logicals):
            raise ValueError(f"{self.name}: {logicals} are only part of a fused matrix")
        return None

    def _stored(self, logicals: tuple[str, ...]) -> tuple[str, ...]:
        """Stored names of `logicals`, in order, each once."""
        return tuple(dict.fromkeys(self.stored_name(n) for n in logicals))

    @property
    def attn_logical(self) -> tuple[str, ...]:
        """Logical linears of the attention sub-block, in forward order: q, k, v, o."""
        return (self.q, self.k, self.v, self.o)

    @property
    def mlp_logical(self) -> tuple[str, ...]:
        """Logical linears of the MLP sub-block, in forward order: (gate,) up, down; a mixture of experts:
        the shared expert's gate, up, down, then each routed expert's."""
        if self.moe is None:
            return ((self.gate,) if self.gate else ()) + (self.up, self.down)
        self._check_resolved()
        out = self.moe.shared_linears() or ()
        for e in range(self.experts):
            out += self.moe.expert_linears(e)
        return out

    @property
    def mlp_stages(self) -> tuple[tuple[tuple[str, ...], ...], ...]:
        """The MLP's linears in data order as stages of input groups: the linears that read the same
        input, first those that read the sub-block input (or its routed tokens), then the output linears.

        Dense: ``(((gate, up),), ((down,),))``; a mixture of experts: one group per expert in each stage.
        """
        names = self.mlp_linears
        if self.moe is None:
            return ((names[:-1],), (names[-1:],))
        triples = [names[i : i + 3] for i in range(0, len(names), 3)]
        return (tuple(t[:2] for t in triples), tuple(t[2:] for t in triples))

    @property
    def attn_stages(self) -> tuple[tuple[tuple[str, ...], ...], ...]:
        """The attention's linears as stages of input groups: ``(((q, k, v),), ((o,),))`` (Phi-3: qkv, o)."""
        names = self.attn_linears
        return ((names[:-1],), (names[-1:],))

    @property
    def fixed(self) -> tuple[str, ...]:
        """Block-local 2-D tensors the MLP core reads that are not pruned: the routers (with ``.weight``)."""
        if self.moe is None:
            return ()
        return tuple(n + ".weight" for n in (self.moe.router, self.moe.shared_gate) if n)

    @property
    def attn_linears(self) -> tuple[str, ...]:
        """Stored linears of the attention sub-block, in forward order (q, k, v, o; Phi-3: qkv, o)."""
        return self._stored(self.attn_logical)

    @property
    def mlp_linears(self) -> tuple[str, ...]:
        """Stored linears of the MLP sub-block, in forward order ((gate,) up, down; Phi-3: gate_up, down)."""
        return self._stored(self.mlp_logical)

    @property
    def linears(self) -> tuple[str, ...]:
        """Every prunable (stored) linear of a block (attention then MLP)."""
        return self.attn_linears + self.mlp_linears

    def block_tensor_name(self, i: int, local: str) -> str:
        """Full checkpoint name of block-local tensor `local` in block `i`."""
        return self.block_prefix.format(i=i) + local

    # ---- shapes --------------------------------------------------------------------------------

    def logical_shapes(self, cfg: ModelConfig) -> dict[str, tuple[tuple[int, int], bool]]:
        """Logical linear -> ([out, in], has a bias), as config.json implies."""
        d, f = cfg.hidden_size, cfg.intermediate_size
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        qkv_bias = cfg.attention_bias or cfg.qkv_bias or self.qkv_bias
        out = {
            self.q: ((q_out, d), qkv_bias),
            self.k: ((kv_out, d), qkv_bias),
            self.v: ((kv_out, d), qkv_bias),
            self.o: ((d, q_out), cfg.attention_bias),
        }
        if self.moe is not None:
            out.update(self._expert_shapes(cfg))
            return out
        for name in self.mlp_logical:
            out[name] = ((d, f) if name == self.down else (f, d), cfg.mlp_bias)
        return out

    def _expert_shapes(self, cfg: ModelConfig) -> dict[str, tuple[tuple[int, int], bool]]:
        """Every expert linear's ([out, in], has a bias): routed experts, then the shared one."""
        d, moe, out = cfg.hidden_size, self.moe, {}
        groups = [(moe.expert_linears(e), cfg.moe_intermediate_size) for e in range(self.experts)]
        if moe.shared_linears():
            groups.append((moe.shared_linears(), cfg.shared_expert_intermediate_size))
        for (gate, up, down), f in groups:
            out.update({gate: ((f, d), False), up: ((f, d), False), down: ((d, f), False)})
        return out

    def fused_parts(self, cfg: ModelConfig) -> dict[str, dict[str, tuple[int, int]]]:
        """Fused stored linear -> {logical part: (first row, end row)}; empty for families without fusion.

        E.g. Phi-3: ``{"self_attn.qkv_proj": {"self_attn.q_proj": (0, 3072), ...}, "mlp.gate_up_proj": ...}``.
        """
        shapes = self.logical_shapes(cfg)
        out: dict[str, dict[str, tuple[int, int]]] = {}
        for stored, parts in self.fused:
            start, rows = 0, {}
            for part in parts:
                rows[part] = (start, start + shapes[part][0][0])
                start = rows[part][1]
            out[stored] = rows
        return out

    def block_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Every tensor a block must have, block-local name -> shape, as config.json implies."""
        d = cfg.hidden_size
        logical = self.logical_shapes(cfg)
        shapes: dict[str, tuple[int, ...]] = {}
        for name in self.linears:
            parts = [n for n in logical if self.stored_name(n) == name]
            rows = sum(logical[n][0][0] for n in parts)
            shapes[name + ".weight"] = (rows, logical[parts[0]][0][1])
            if any(logical[n][1] for n in parts):
                shapes[name + ".bias"] = (rows,)
        if self.moe is not None:
            shapes[self.moe.router + ".weight"] = (cfg.num_experts, d)
            if self.moe.shared_gate:
                shapes[self.moe.shared_gate + ".weight"] = (1, d)
        norms = [(n, d) for n in (self.attn_norm, self.mlp_norm, self.attn_out_norm, self.mlp_out_norm) if n]
        norms += [(n, cfg.head_dim) for n in (self.q_norm, self.k_norm) if n]
        for norm, width in norms:
            if self.norm != "layer" or cfg.norm_affine:
                shapes[norm + ".weight"] = (width,)
            if self.norm == "layer" and cfg.norm_affine:
                shapes[norm + ".bias"] = (width,)
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
        layer_norm = self.norm == "layer"
        if not layer_norm or (cfg.final_layer_norm and cfg.norm_affine):
            out["norm.weight"] = (self.final_norm + ".weight", (d,))
            if layer_norm:
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

#: The pieces the newer families add to the LLaMA layout, each named once.
_QK_NORM = dict(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
_SANDWICH = dict(mlp_norm="pre_feedforward_layernorm", attn_out_norm="post_attention_layernorm",
                 mlp_out_norm="post_feedforward_layernorm")
_GEMMA = dict(norm="rms1p", scale_embeddings=True, **_SANDWICH)
_PHI3_FUSED = (
    ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
)

_MIXTRAL_MOE = MoESpec(router="block_sparse_moe.gate", expert="block_sparse_moe.experts.{e}.",
                       gate="w1", up="w3", down="w2", float32_scores=True)
_QWEN_MOE = MoESpec(router="mlp.gate", expert="mlp.experts.{e}.", gate="gate_proj", up="up_proj", down="down_proj")

FAMILIES: dict[str, FamilySpec] = {
    "llama": _LLAMA,
    "mistral": dataclasses.replace(_LLAMA, name="mistral"),
    "qwen2": dataclasses.replace(_LLAMA, name="qwen2", qkv_bias=True),
    "qwen3": dataclasses.replace(_LLAMA, name="qwen3", **_QK_NORM),
    "phi3": dataclasses.replace(_LLAMA, name="phi3", fused=_PHI3_FUSED),
    "gemma2": dataclasses.replace(_LLAMA, name="gemma2", attn_softcapping=True, **_GEMMA),
    "gemma3_text": dataclasses.replace(_LLAMA, name="gemma3_text", **_GEMMA, **_QK_NORM),
    "mixtral": dataclasses.replace(_LLAMA, name="mixtral", moe=_MIXTRAL_MOE),
    "qwen2_moe": dataclasses.replace(
        _LLAMA, name="qwen2_moe",
        moe=dataclasses.replace(_QWEN_MOE, shared="mlp.shared_expert.", shared_gate="mlp.shared_expert_gate"),
    ),
    "qwen3_moe": dataclasses.replace(_LLAMA, name="qwen3_moe", moe=_QWEN_MOE, **_QK_NORM),
    "opt": _OPT,
}

#: Model types people ask for that barber refuses, with the reason (the message names the model_type).
REFUSED: dict[str, str] = {
    "deepseek_v2": "multi-head latent attention and mixture-of-experts blocks are not supported",
    "deepseek_v3": "multi-head latent attention and mixture-of-experts blocks are not supported",
    "gemma3": "a vision tower is not supported (a text-only Gemma 3 checkpoint has model_type gemma3_text)",
}


def family_for(model_type: str) -> FamilySpec:
    """The spec for `model_type`; an unsupported type is a one-line CheckpointError naming it."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        reason = REFUSED.get(model_type, "")
        raise CheckpointError(
            f"unsupported model_type {model_type!r}{': ' + reason if reason else ''} "
            f"(supported: {', '.join(sorted(FAMILIES))})"
        ) from None
