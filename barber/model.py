"""The functional transformer math for every family: embeddings, one block, final logits. No files.

`Arch(family, config)` holds no weights. Every function takes the weights it needs as a dict keyed by
block-local names (``"self_attn.q_proj.weight"``, as `Checkpoint.block_weights` returns them) or by
`barber.families.GLOBAL_KEYS` for the model-level tensors. Tensors are batch-first ``[B, T, d]``.

A block is split into the two sub-blocks that the Barber method rebuilds separately::

    X  = attn_input(h, w)              # input of q/k/v (pre-LN: the attention norm of h)
    Y  = attn_core(X, w, pos)          # o_proj / out_proj output, before the residual add
    h2 = attn_residual(h, Y, w)        # h + Y                  (post-LN: norm(h + Y))
    X2 = mlp_input(h2, w)              # input of gate/up/fc1   (pre-LN: the MLP norm of h2)
    Y2 = mlp_core(X2, w, pos)          # down_proj / fc2 output, before the residual add (pos unused)
    out = mlp_residual(h2, Y2, w)      # h2 + Y2                (post-LN: norm(h2 + Y2))

Post-LN (OPT with ``do_layer_norm_before=False``): the linears see the raw residual stream, so
``X = h`` and ``X2 = h2``, and the residual step applies the norm after the add.

Both cores share one signature, ``core(x, w, pos, linear=None)``, so a pruner treats the two
sub-blocks alike through `Arch.subblocks()` (a `SubBlock` each: its linears, input, core and residual).
`attn_core` and `mlp_core` take ``linear(name, x) -> y`` (name: block-local linear name such as
``"self_attn.q_proj"``). The default is ``x @ w[name + ".weight"].T + w[name + ".bias"]`` (bias where
present). A pruner passes its own to record each linear's input or to use masked, fp32 or
grad-requiring weights. Nothing here works in place on its inputs, so autograd flows through.

Positions are computed once per sequence length with `Arch.positions` (rotary cos/sin, including
linear and llama3 scaling, and Mistral's sliding-window mask) and passed in explicitly. OPT's learned
positions are added in `embed`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from barber.config import ModelConfig
from barber.errors import CheckpointError
from barber.families import FamilySpec

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
    """

    kind: str
    names: tuple[str, ...]
    input: Callable[[torch.Tensor, Weights], torch.Tensor]
    core: Callable[..., torch.Tensor]
    residual: Callable[[torch.Tensor, torch.Tensor, Weights], torch.Tensor]


def rotary_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim / 2] in float32, with linear or llama3 scaling applied."""
    dim, base = config.head_dim, config.rope_theta or 10000.0
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
    scaling = config.rope_scaling
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


class Arch:
    """The math of one model family and config. Holds no weights; see the module docstring."""

    def __init__(self, family: FamilySpec, config: ModelConfig):
        self.family = family
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

    def positions(self, seqlen: int, device: str | torch.device = "cpu") -> Positions:
        """Position data for sequences of `seqlen` tokens starting at position 0."""
        cfg, mask = self.config, None
        if cfg.sliding_window is not None and seqlen > cfg.sliding_window:
            i = torch.arange(seqlen, device=device)
            diff = i[:, None] - i[None, :]
            mask = (diff >= 0) & (diff < cfg.sliding_window)
        if self.family.positions != "rope":
            return Positions(seqlen, mask=mask)
        inv_freq = rotary_inv_freq(cfg).to(device)
        freqs = torch.outer(torch.arange(seqlen, device=device, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return Positions(seqlen, emb.cos(), emb.sin(), mask)

    def embed(self, ids: torch.Tensor, w: Weights) -> torch.Tensor:
        """Token ids [B, T] -> hidden states [B, T, d] (OPT: project_in and learned positions added).

        Args:
            ids: token ids, every sequence starting at position 0.
            w: `Checkpoint.embedding_weights` (embed_tokens, and embed_positions / project_in where present).
        """
        h = F.embedding(ids, w["embed_tokens"])
        if "project_in" in w:
            h = F.linear(h, w["project_in"])
        if self.family.positions == "learned":
            pos = torch.arange(ids.shape[-1], device=ids.device) + self.family.position_offset
            h = h + F.embedding(pos, w["embed_positions"])
        return h

    # ---- building blocks ------------------------------------------------------------------------

    def _norm(self, x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
        """RMSNorm (computed in at least float32, like transformers) or LayerNorm; weights `name.weight/.bias`."""
        weight = w.get(name + ".weight")
        if self.family.norm == "rms":
            xf = x if x.dtype == torch.float64 else x.to(torch.float32)
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.config.norm_eps)
            return weight * xf.to(x.dtype)
        return F.layer_norm(x, x.shape[-1:], weight, w.get(name + ".bias"), self.config.norm_eps)

    @staticmethod
    def default_linear(w: Weights) -> Linear:
        """``linear(name, x) = x @ w[name.weight].T + w[name.bias]`` (bias where present)."""
        return lambda name, x: F.linear(x, w[name + ".weight"], w.get(name + ".bias"))

    # ---- attention sub-block --------------------------------------------------------------------

    def attn_input(self, h: torch.Tensor, w: Weights) -> torch.Tensor:
        """Input of q/k/v: the attention norm of `h` (pre-LN) or `h` itself (post-LN)."""
        return self._norm(h, w, self.family.attn_norm) if self.config.do_layer_norm_before else h

    def attn_core(self, x: torch.Tensor, w: Weights, pos: Positions, linear: Linear | None = None) -> torch.Tensor:
        """Causal self-attention of `x` [B, T, d] -> o_proj/out_proj output [B, T, d] (no residual)."""
        fam, cfg = self.family, self.config
        lin = linear or self.default_linear(w)
        b, t, _ = x.shape
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        q = lin(fam.q, x).view(b, t, nh, hd).transpose(1, 2)
        k = lin(fam.k, x).view(b, t, nkv, hd).transpose(1, 2)
        v = lin(fam.v, x).view(b, t, nkv, hd).transpose(1, 2)
        if pos.cos is not None:
            cos, sin = pos.cos[:t].to(q.dtype), pos.sin[:t].to(q.dtype)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        if nkv != nh:  # GQA: repeat each kv head for its group of query heads
            rep = nh // nkv
            k = k[:, :, None].expand(b, nkv, rep, t, hd).reshape(b, nh, t, hd)
            v = v[:, :, None].expand(b, nkv, rep, t, hd).reshape(b, nh, t, hd)
        scale = hd**-0.5
        if fam.scale_query_before:
            q, scale = q * scale, 1.0
        mask = None if pos.mask is None else pos.mask[:t, :t]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
        return lin(fam.o, o.transpose(1, 2).reshape(b, t, nh * hd))

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
        """down(act(gate(x)) * up(x)) or fc2(act(fc1(x))): [B, T, d] -> [B, T, d] (no residual; `pos` unused)."""
        fam = self.family
        lin = linear or self.default_linear(w)
        if fam.gate:
            inner = self._act(lin(fam.gate, x2)) * lin(fam.up, x2)
        else:
            inner = self._act(lin(fam.up, x2))
        return lin(fam.down, inner)

    def mlp_residual(self, h2: torch.Tensor, y2: torch.Tensor, w: Weights) -> torch.Tensor:
        """h2 + y2 (pre-LN), or the MLP norm of h2 + y2 (post-LN)."""
        out = h2 + y2
        return out if self.config.do_layer_norm_before else self._norm(out, w, self.family.mlp_norm)

    # ---- the two sub-blocks as one kind of object ------------------------------------------------

    def subblocks(self) -> tuple["SubBlock", "SubBlock"]:
        """The attention and MLP sub-blocks, in block order."""
        fam = self.family
        return (
            SubBlock("attn", fam.attn_linears, self.attn_input, self.attn_core, self.attn_residual),
            SubBlock("mlp", fam.mlp_linears, self.mlp_input, self.mlp_core, self.mlp_residual),
        )

    # ---- whole block and head -------------------------------------------------------------------

    def block_forward(self, h: torch.Tensor, w: Weights, pos: Positions, linear: Linear | None = None) -> torch.Tensor:
        """One transformer block: the composition of the six sub-block steps."""
        h2 = self.attn_residual(h, self.attn_core(self.attn_input(h, w), w, pos, linear), w)
        return self.mlp_residual(h2, self.mlp_core(self.mlp_input(h2, w), w, pos, linear), w)

    def final_logits(self, h: torch.Tensor, w: Weights) -> torch.Tensor:
        """Final norm (where the model has one), project_out (OPT) and the output head: [B, T, vocab].

        Args:
            w: `Checkpoint.final_weights` (norm.weight/.bias, project_out, lm_head; a tied head is the embedding).
        """
        has_norm = self.family.norm == "rms" or self.config.final_layer_norm
        if has_norm:
            h = self._norm(h, w, "norm")
        if "project_out" in w:
            h = F.linear(h, w["project_out"])
        return F.linear(h, w["lm_head"])
