"""The mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE): its layout (`MoESpec`, the data a
`barber.families.FamilySpec` carries), routing and the expert loop.

For each token the dense router picks `experts_per_token` of the block's experts by softmax
probability (top-k in float32, renormalised to sum to 1 where the family does); each chosen expert
runs on its tokens, and the outputs are added, scaled by the routing weights, in expert order, as
transformers does. Qwen2-MoE adds an always-on shared expert scaled by ``sigmoid(shared_gate(x))``.

Every expert linear goes through the caller's ``linear(name, x)`` with the expert's tokens as one
sample, ``[1, tokens, in]``, and every expert is called, with zero tokens where none chose it. A
pruner's statistics hooks index inputs by sample, so a pruner runs mixture-of-experts blocks one
calibration window per call (`barber.budget.ModelShapes.one_window`): then each expert's
per-window input is exactly that window's routed tokens, in every configuration.

The routing is a function of the sub-block input only, so within one sub-block the dense and the
sparse experts see the same tokens, and a gradient through the block treats the routing weights
as constants (the router and its input need no gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from barber.config import ModelConfig

Weights = Mapping[str, torch.Tensor]
Linear = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MoESpec:
    """Where a mixture-of-experts MLP keeps its tensors (block-local names, without ``.weight``).

    Attributes:
        router: the [experts, d] router linear (kept dense).
        expert: prefix of expert e, with an ``{e}`` field, e.g. ``"block_sparse_moe.experts.{e}."``.
        gate, up, down: an expert's linears below its prefix: down(act(gate(x)) * up(x)).
        shared: prefix of the always-on shared expert (Qwen2-MoE), or None.
        shared_gate: the [1, d] linear whose sigmoid scales the shared expert's output, or None.
        float32_scores: expert outputs are scaled by the float32 routing weights before the cast back
            (Mixtral); otherwise the weights are cast to the compute dtype first (Qwen).
    """

    router: str
    expert: str
    gate: str
    up: str
    down: str
    shared: str | None = None
    shared_gate: str | None = None
    float32_scores: bool = False

    def expert_linears(self, e: int) -> tuple[str, str, str]:
        """Expert e's (gate, up, down) block-local names."""
        prefix = self.expert.format(e=e)
        return (prefix + self.gate, prefix + self.up, prefix + self.down)

    def shared_linears(self) -> tuple[str, str, str] | None:
        """The shared expert's (gate, up, down), or None."""
        if self.shared is None:
            return None
        return (self.shared + self.gate, self.shared + self.up, self.shared + self.down)


def route(x: torch.Tensor, router: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen experts [tokens, k] int64, their routing weights [tokens, k] float32) of tokens x [tokens, d]."""
    probs = F.softmax(F.linear(x, router).float(), dim=-1)
    weights, chosen = torch.topk(probs, cfg.experts_per_token, dim=-1)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return chosen, weights


def expert_tokens(chosen: torch.Tensor, experts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per expert, (its tokens in ascending order, the top-k slot that chose it) from `chosen` [tokens, k]."""
    hits = F.one_hot(chosen, experts).permute(2, 0, 1)  # [experts, tokens, k]
    out = []
    for e in range(experts):
        token, slot = torch.where(hits[e])
        out.append((token, slot))
    return out


def _gated_mlp(lin: Linear, names: tuple[str, str, str], x: torch.Tensor, act) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) of one expert on x [1, tokens, d] through `lin`."""
    gate, up, down = names
    return lin(down, act(lin(gate, x)) * lin(up, x))


def moe_mlp(
    x: torch.Tensor, w: Weights, lin: Linear, spec: MoESpec, cfg: ModelConfig, act
) -> torch.Tensor:
    """The mixture-of-experts MLP of x [B, T, d] -> [B, T, d] (before any residual)."""
    b, t, d = x.shape
    flat = x.reshape(-1, d)
    chosen, scores = route(flat, w[spec.router + ".weight"], cfg)
    if not spec.float32_scores:
        scores = scores.to(x.dtype)
    out = torch.zeros_like(flat)
    for e, (token, slot) in enumerate(expert_tokens(chosen, cfg.num_experts)):
        y = _gated_mlp(lin, spec.expert_linears(e), flat[token][None], act)[0]
        y = y * scores[token, slot, None]
        out = out.index_add(0, token, y.to(out.dtype))
    if spec.shared is not None:
        shared = _gated_mlp(lin, spec.shared_linears(), x, act).reshape(-1, d)
        gate = torch.sigmoid(F.linear(flat, w[spec.shared_gate + ".weight"]))
        out = out + gate * shared
    return out.reshape(b, t, d)
