"""The functional transformer math for every family: embeddings, one block, final logits. No files.

`Arch(family, config)` holds no weights. Every function takes the weights it needs as a dict keyed by
block-local names (``"self_attn.q_proj.weight"``, as `Checkpoint.block_weights` returns them) or by
`barber.families.GLOBAL_KEYS` for the model-level tensors. Tensors are batch-first ``[B, T, d]``.

A block is split into the two sub-blocks that the Barber method rebuilds separately::

    X  = attn_input(h, w)              # input of q/k/v (pre-LN: the attention norm of h)
    Y  = attn_core(X, w, pos)          # o_proj / out_proj output (Gemma: post-attention norm of it)
    h2 = attn_residual(h, Y, w)        # h + Y                  (post-LN: norm(h + Y))
    X2 = mlp_input(h2, w)              # input of gate/up/fc1   (pre-LN: the MLP norm of h2)
    Y2 = mlp_core(X2, w, pos)          # down_proj / fc2 output (Gemma: post-feedforward norm of it)
    out = mlp_residual(h2, Y2, w)      # h2 + Y2                (post-LN: norm(h2 + Y2))

Post-LN (OPT with ``do_layer_norm_before=False``): the linears see the raw residual stream, so
``X = h`` and ``X2 = h2``, and the residual step applies the norm after the add.

Both cores share one signature, ``core(x, w, pos, linear=None)``, so a pruner treats the two
sub-blocks alike through `Arch.subblocks()` (a `SubBlock` each: its linears, input, core and residual).
`attn_core` and `mlp_core` take ``linear(name, x) -> y`` (name: block-local stored linear name such
as ``"self_attn.q_proj"`` or Phi-3's ``"self_attn.qkv_proj"``; x: ``[B, T, in]``, the sample first).
The cores also read the 1-D norm weights that sit inside them (q/k norms, sandwich norms) from ``w``.
The default linear is ``x @ w[name + ".weight"].T + w[name + ".bias"]`` (bias where present).
A pruner passes its own to record each linear's input or to use masked, fp32 or grad-requiring weights.
Nothing here works in place on its inputs, so autograd flows through.

Positions are computed per sequence length with `Arch.positions` (rotary cos/sin, including
linear and llama3 scaling and partial rotation, and the sliding-window mask) and passed in explicitly.
Where blocks attend differently (Gemma's alternating sliding-window and full layers, Gemma 3's
separate rotary base for the sliding ones) they are computed per block, ``positions(T, layer=i)``.
OPT's learned positions are added in `embed`.

What the families add to this skeleton, all switched by `FamilySpec` and `ModelConfig` data:

- fused projections (Phi-3): q/k/v or gate/up come from one stored linear, called once through
  ``linear`` and split by columns of its output, so the hooks see the matrix as stored;
- per-head q/k norms before the rotary embedding (Qwen3, Gemma 3);
- Gemma: embeddings times sqrt(hidden), (1 + w) RMSNorms, sandwich norms (the post-attention and
  post-feedforward norms are part of the cores: ``Y`` is the sub-block's contribution to the
  residual stream), query_pre_attn_scalar, and attention and final logit soft-capping;
- a mixture of experts instead of the MLP (Mixtral, Qwen2/3-MoE; `barber.moe`): the router is read
  from ``w``, and every expert linear goes through ``linear`` with its tokens as one sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from barber.config import SLIDING, ModelConfig
from barber.errors import CheckpointError
from barber.families import FamilySpec
from barber.moe import moe_mlp

Weights = Mapping[str, torch.Tensor]
Linear = Callable[[str, torch.Tensor], torch.Tensor]

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass(frozen=True)
class Positions:
    """Per-sequence-length position data for `attn_core`.

    Attributes:
        length: the sequence length T these were built for.
        cos, sin: rotary tables [T, head_dim] in float32, or None (learned positions).
        mask: boolean [T, T] attention mask (True = may attend), or None for plain causal attention.
    """

    length: int
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class SubBlock:
    """One of a block's two sub-blocks: ``out = residual(h, core(input(h, w), w, pos, linear), w)``.

    Attributes:
        kind: "attn" or "mlp".
        names: its linears (block-local names), in the order the core applies them.
        input, core, residual: the `Arch` methods of that sub-block (see the module docstring).
        stages: `names` in data order as stages of groups of linears that read one input
            (`FamilySpec.mlp_stages`): the re-fit solves a stage's groups before the next stage's.
        fixed: block-local 2-D tensors the core reads besides its linears (routers; kept dense).
    """

    kind: str
    names: tuple[str, ...]
    input: Callable[[torch.Tensor, Weights], torch.Tensor]
    core: Callable[..., torch.Tensor]
    residual: Callable[[torch.Tensor, torch.Tensor, Weights], torch.Tensor]
    stages: tuple[tuple[tuple[str, ...], ...], ...] = ()
    fixed: tuple[str, ...] = ()


def rotary_dim(config: ModelConfig) -> int:
    """How many leading dimensions of each head are rotated (head_dim unless partial rotary)."""
    return int(config.head_dim * config.partial_rotary_factor)


def rotary_scaling(config: ModelConfig, sliding: bool = False):
    """(rotary base, `RopeScaling` or None) of a full or a sliding-window layer (Gemma 3's local layers differ)."""
    if sliding and config.local_rope_theta is not None:
        return config.local_rope_theta, config.local_rope_scaling
    return config.rope_theta or 10000.0, config.rope_scaling


def rotary_inv_freq(config: ModelConfig, sliding: bool = False, seqlen: int | None = None) -> torch.Tensor:
    """Rotary inverse frequencies [rotary_dim / 2] in float32, with linear, llama3 or longrope scaling applied.

    `sliding`: for a sliding-window layer, whose base and scaling may differ (Gemma 3's local layers).
    `seqlen`: the sequence length, which picks longrope's short or long factors (None: short).
    """
    dim = rotary_dim(config)
    base, scaling = rotary_scaling(config, sliding)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    if scaling is not None and scaling.rope_type == "longrope":
        long = seqlen is not None and seqlen > scaling.original_max_position_embeddings
        ext = torch.tensor(scaling.long_factor if long else scaling.short_factor, dtype=torch.float32)
        return 1.0 / (ext * base**exponents)
    inv_freq = 1.0 / (base**exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths divided by `factor`, short ones kept, a smooth blend in between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of x [..., T, head_dim] on its first cos.shape[-1] dimensions (the rest pass)."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    head, rest = x[..., :rot], x[..., rot:]
    return torch.cat((head * cos + _rotate_half(head) * sin, rest), dim=-1)


def _softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap) (Gemma's soft-capping), or x unchanged when cap is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


def _capped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, cap: float
) -> torch.Tensor:
    """Attention with soft-capped scores, as transformers' eager path: softmax in (at least) float32. [B, H, T, hd]."""
    t = q.shape[-2]
    if mask is None:
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores = _softcap(torch.matmul(q, k.transpose(-1, -2)) * scale, cap)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    return torch.matmul(probs.to(q.dtype), v)


class Arch:
    """The math of one model family and config. Holds no weights; see the module docstring."""

    def __init__(self, family: FamilySpec, config: ModelConfig):
        self.family = family.for_config(config)
        self.config = config
        try:
            self._act = _ACTIVATIONS[config.hidden_act]
        except KeyError:
            raise CheckpointError(
                f"unsupported activation {config.hidden_act!r} (supported: {', '.join(sorted(_ACTIVATIONS))})"
            ) from None

    @classmethod
    def from_checkpoint(cls, ckpt) -> "Arch":
        """The Arch of an opened `barber.checkpoint.Checkpoint`."""
        return cls(ckpt.family, ckpt.config)

    # ---- positions and embeddings --------------------------------------------------------------

    def positions(self, seqlen: int, device: str | torch.device = "cpu", layer: int | None = None) -> Positions:
        """Position data of block `layer` for sequences of `seqlen` tokens starting at position 0.

        `layer` may be left out where every block attends alike (`ModelConfig.uniform_layers`); a model
        whose blocks differ (Gemma) raises ValueError without it rather than guess.
        """
        cfg, mask = self.config, None
        if layer is None and not cfg.uniform_layers:
            raise ValueError(f"{cfg.model_type}: blocks attend differently; pass layer= to Arch.positions")
        sliding = cfg.layer_type(0 if layer is None else layer) == SLIDING
        if sliding and cfg.sliding_window is not None and seqlen > cfg.sliding_window:
            i = torch.arange(seqlen, device=device)
            diff = i[:, None] - i[None, :]
            mask = (diff >= 0) & (diff < cfg.sliding_window)
        if self.family.positions != "rope":
            return Positions(seqlen, mask=mask)
        inv_freq = rotary_inv_freq(cfg, sliding, seqlen).to(device)
        freqs = torch.outer(torch.arange(seqlen, device=device, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        scaling = rotary_scaling(cfg, sliding)[1]
        if scaling is not None and scaling.attention_factor != 1.0:  # longrope
            cos, sin = cos * scaling.attention_factor, sin * scaling.attention_factor
        return Positions(seqlen, cos, sin, mask)

    def embed(self, ids: torch.Tensor, w: Weights) -> torch.Tensor:
        """Token ids [B, T] -> hidden states [B, T, d] (OPT: project_in and learned positions added;
        Gemma: times sqrt(hidden) rounded to the weights' dtype, as transformers does).

        Args:
            ids: token ids, every sequence starting at position 0.
            w: `Checkpoint.embedding_weights` (embed_tokens, and embed_positions / project_in where present).
        """
        h = F.embedding(ids, w["embed_tokens"])
        if self.family.scale_embeddings:
            h = h * torch.tensor(self.config.hidden_size**0.5).to(h.dtype)
        if "project_in" in w:
            h = F.linear(h, w["project_in"])
        if self.family.positions == "learned":
            pos = torch.arange(ids.shape[-1], device=ids.device) + self.family.position_offset
            h = h + F.embedding(pos, w["embed_positions"])
        return h

    # ---- building blocks ------------------------------------------------------------------------

    def _norm(self, x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
        """RMSNorm (computed in at least float32, like transformers) or LayerNorm; weights `name.weight/.bias`.

        "rms" scales after rounding back to x's dtype (``w * x``, LLaMA); "rms1p" scales by ``1 + w`` in
        float32 and rounds last (Gemma).
        """
        weight = w.get(name + ".weight")
        if self.family.norm in ("rms", "rms1p"):
            xf = x if x.dtype == torch.float64 else x.to(torch.float32)
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.config.norm_eps)
            if self.family.norm == "rms1p":
                return (xf * (1.0 + weight.to(xf.dtype))).to(x.dtype)
            return weight * xf.to(x.dtype)
        return F.layer_norm(x, x.shape[-1:], weight, w.get(name + ".bias"), self.config.norm_eps)

    def _out_norm(self, y: torch.Tensor, w: Weights, name: str | None) -> torch.Tensor:
        """The sandwich norm `name` of a sub-block output (Gemma), or y unchanged when the family has none."""
        return y if name is None else self._norm(y, w, name)

    @staticmethod
    def default_linear(w: Weights) -> Linear:
        """``linear(name, x) = x @ w[name.weight].T + w[name.bias]`` (bias where present)."""
        return lambda name, x: F.linear(x, w[name + ".weight"], w.get(name + ".bias"))

    def _project(self, lin: Linear, x: torch.Tensor, names: tuple[str, ...], widths: tuple[int, ...]):
        """The outputs of logical linears `names` on x: one call each, or one call of the fused matrix
        that stores them (Phi-3), split by output columns of `widths`."""
        fused = self.family.fused_group(names)
        if fused is None:
            return [lin(n, x) for n in names]
        return list(lin(fused, x).split(widths, dim=-1))

    # ---- attention sub-block --------------------------------------------------------------------

    def attn_input(self, h: torch.Tensor, w: Weights) -> torch.Tensor:
        """Input of q/k/v: the attention norm of `h` (pre-LN) or `h` itself (post-LN)."""
        return self._norm(h, w, self.family.attn_norm) if self.config.do_layer_norm_before else h

    def attn_core(self, x: torch.Tensor, w: Weights, pos: Positions, linear: Linear | None = None) -> torch.Tensor:
        """Causal self-attention of `x` [B, T, d] -> o_proj/out_proj output [B, T, d] (no residual;
        Gemma: after the post-attention norm)."""
        fam, cfg = self.family, self.config
        lin = linear or self.default_linear(w)
        b, t, _ = x.shape
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        q, k, v = self._project(lin, x, (fam.q, fam.k, fam.v), (nh * hd, nkv * hd, nkv * hd))
        q, k, v = q.view(b, t, nh, hd), k.view(b, t, nkv, hd), v.view(b, t, nkv, hd)
        if fam.q_norm:  # per head, over head_dim, before the rotary embedding
            q, k = self._norm(q, w, fam.q_norm), self._norm(k, w, fam.k_norm)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if pos.cos is not None:
            cos, sin = pos.cos[:t].to(q.dtype), pos.sin[:t].to(q.dtype)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if nkv != nh:  # GQA: repeat each kv head for its group of query heads
            rep = nh // nkv
            k = k[:, :, None].expand(b, nkv, rep, t, hd).reshape(b, nh, t, hd)
            v = v[:, :, None].expand(b, nkv, rep, t, hd).reshape(b, nh, t, hd)
        scale = (cfg.query_pre_attn_scalar or hd) ** -0.5
        if fam.scale_query_before:
            q, scale = q * scale, 1.0
        mask = None if pos.mask is None else pos.mask[:t, :t]
        if fam.attn_softcapping and cfg.attn_logit_softcapping is not None:
            o = _capped_attention(q, k, v, mask, scale, cfg.attn_logit_softcapping)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
        y = lin(fam.o, o.transpose(1, 2).reshape(b, t, nh * hd))
        return self._out_norm(y, w, fam.attn_out_norm)

    def attn_residual(self, h: torch.Tensor, y: torch.Tensor, w: Weights) -> torch.Tensor:
        """h + y (pre-LN), or the attention norm of h + y (post-LN)."""
        out = h + y
        return out if self.config.do_layer_norm_before else self._norm(out, w, self.family.attn_norm)

    # ---- MLP sub-block --------------------------------------------------------------------------

    def mlp_input(self, h2: torch.Tensor, w: Weights) -> torch.Tensor:
        """Input of gate/up/fc1: the MLP norm of `h2` (pre-LN) or `h2` itself (post-LN)."""
        return self._norm(h2, w, self.family.mlp_norm) if self.config.do_layer_norm_before else h2

    def mlp_core(
        self, x2: torch.Tensor, w: Weights, pos: Positions | None = None, linear: Linear | None = None
    ) -> torch.Tensor:
        """down(act(gate(x)) * up(x)) or fc2(act(fc1(x))): [B, T, d] -> [B, T, d] (no residual; `pos` unused;
        Gemma: after the post-feedforward norm)."""
        fam = self.family
        lin = linear or self.default_linear(w)
        if fam.moe is not None:
            return moe_mlp(x2, w, lin, fam.moe, self.config, self._act)
        if fam.gate:
            f = self.config.intermediate_size
            gate, up = self._project(lin, x2, (fam.gate, fam.up), (f, f))
            inner = self._act(gate) * up
        else:
            inner = self._act(lin(fam.up, x2))
        return self._out_norm(lin(fam.down, inner), w, fam.mlp_out_norm)

    def mlp_residual(self, h2: torch.Tensor, y2: torch.Tensor, w: Weights) -> torch.Tensor:
        """h2 + y2 (pre-LN), or the MLP norm of h2 + y2 (post-LN)."""
        out = h2 + y2
        return out if self.config.do_layer_norm_before else self._norm(out, w, self.family.mlp_norm)

    # ---- the two sub-blocks as one kind of object ------------------------------------------------

    def subblocks(self) -> tuple["SubBlock", "SubBlock"]:
        """The attention and MLP sub-blocks, in block order."""
        fam = self.family
        return (
            SubBlock("attn", fam.attn_linears, self.attn_input, self.attn_core, self.attn_residual, fam.attn_stages),
            SubBlock("mlp", fam.mlp_linears, self.mlp_input, self.mlp_core, self.mlp_residual, fam.mlp_stages,
                     fam.fixed),
        )

    # ---- whole block and head -------------------------------------------------------------------

    def block_forward(self, h: torch.Tensor, w: Weights, pos: Positions, linear: Linear | None = None) -> torch.Tensor:
        """One transformer block: the composition of the six sub-block steps."""
        h2 = self.attn_residual(h, self.attn_core(self.attn_input(h, w), w, pos, linear), w)
        return self.mlp_residual(h2, self.mlp_core(self.mlp_input(h2, w), w, pos, linear), w)

    def final_logits(self, h: torch.Tensor, w: Weights) -> torch.Tensor:
        """Final norm (where the model has one), project_out (OPT), the output head and (Gemma 2) the
        final soft-capping: [B, T, vocab].

        Args:
            w: `Checkpoint.final_weights` (norm.weight/.bias, project_out, lm_head; a tied head is the embedding).
        """
        has_norm = self.family.norm != "layer" or self.config.final_layer_norm
        if has_norm:
            h = self._norm(h, w, "norm")
        if "project_out" in w:
            h = F.linear(h, w["project_out"])
        return _softcap(F.linear(h, w["lm_head"]), self.config.final_logit_softcapping)
