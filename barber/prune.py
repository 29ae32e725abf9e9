"""The pruning math: initial masks (magnitude, Wanda, SparseGPT) and the LLM-Barber rebuild.

Pure functions on tensors: no files, no model structure, no command-line objects. The block
schedule that feeds them is `barber.pipeline` (statistics and the method table in `barber.initial`).
Selection always goes through `barber.ops` (native kernels when built), so every mask follows the
total order of docs/algorithm.md §1.1: higher score first, ties -> lower column index first.

Calibration statistics are kept as sums over samples (`barber.initial.Stats`), so that a
data-parallel run can all-reduce them with SUM before they are used.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from barber import ops


class InitMethod(enum.Enum):
    """How the initial mask is chosen."""

    MAGNITUDE = "magnitude"
    WANDA = "wanda"
    SPARSEGPT = "sparsegpt"


class Granularity(enum.Enum):
    """The group within which the Barber rebuild swaps pruned and kept weights."""

    ROW = "row"  # one output row of W [out, in]
    LAYER = "layer"  # the whole matrix
    BLOCK = "block"  # every matrix of the sub-block pooled
    COLUMN = "column"  # one input column


class Metric(enum.Enum):
    """The rebuild score: |W|*sqrt(A) (wg), |W| (w) or sqrt(A) (g)."""

    WG = "wg"
    W = "w"
    G = "g"


@dataclass(frozen=True)
class Pattern:
    """Unstructured sparsity (n == m == 0) or N:M, N kept in every M consecutive columns."""

    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        """"unstructured" or "N:M" (e.g. "2:4": 2 of every 4 consecutive weights kept)."""
        if text == "unstructured":
            return cls()
        parts = text.split(":")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"pattern must be 'unstructured' or N:M like 2:4, got {text!r}")
        n, m = int(parts[0]), int(parts[1])
        if not 0 < n < m:
            raise ValueError(f"pattern N:M needs 0 < N < M, got {text!r}")
        return cls(n, m)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"


def pruned_count(cols: int, sparsity: float) -> int:
    """floor(sparsity * cols), computed exactly from the decimal value of `sparsity`.

    `Fraction(repr(s))` avoids binary rounding: floor(0.29 * 100) is 29, not 28.
    """
    return math.floor(Fraction(repr(float(sparsity))) * cols)


def select(scores: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    """Keep the best entries of every row: C - floor(s*C) of them, or N of every M (bool mask)."""
    if pattern.structured:
        return ops.nm_mask(scores, pattern.n, pattern.m)
    cols = scores.shape[-1]
    return ops.topk_mask(scores, cols - pruned_count(cols, sparsity))


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: Pattern, per_matrix: bool) -> torch.Tensor:
    """Magnitude pruning: |W| ranked per row, or per matrix (one threshold, like the reference code).

    The per-matrix variant keeps exactly numel - floor(s*numel) entries ranked over the
    flattened matrix in the total order (the reference's "<= threshold" prunes every tie).
    """
    scores = weight.abs().float()
    if per_matrix and not pattern.structured:
        flat = scores.reshape(1, -1)
        return ops.topk_mask(flat, flat.shape[1] - pruned_count(flat.shape[1], sparsity)).reshape(weight.shape)
    return select(scores, sparsity, pattern)


def wanda_scores(weight: torch.Tensor, sq_sum: torch.Tensor) -> torch.Tensor:
    """|W_ij| * sqrt(sum_x x_j^2): the Wanda score (a constant factor does not change a row's ranking)."""
    return weight.abs().float() * sq_sum.float().sqrt().unsqueeze(0)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian_sum: torch.Tensor,
    nsamples: int,
    sparsity: float,
    pattern: Pattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT: prune with OBS weight updates (Frantar & Alistarh 2023); one piece, as the paper's algorithm.

    H = 2/N * sum_n X_n X_n^T (fp32), dead inputs get weight 0 and diagonal 1, damping
    `percdamp * mean(diag H)`; columns are processed in blocks of `blocksize` with lazy
    updates. Mask choice differs from the reference in one respect, so that every row has
    exactly floor(s*C) pruned entries: within each column block, each row prunes its
    lowest w^2/[H^-1]_jj^2 scores, floor(s*end) - floor(s*start) of them (the reference
    pools all rows of the block). N:M selects groups with the already-updated weights.

    Args:
        weight: [out, in].
        hessian_sum: [in, in], sum over samples of X^T X.
        nsamples: number of calibration samples in `hessian_sum`.

    Returns:
        (updated weight [out, in] fp32 with exact +0.0 at pruned entries, kept mask).
    """
    W = weight.detach().float().clone()
    rows, cols = W.shape
    H = hessian_sum.detach().float() * (2.0 / nsamples)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    keep = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        keep1 = torch.ones_like(W1, dtype=torch.bool)
        if not pattern.structured:
            prune = pruned_count(i2, sparsity) - pruned_count(i1, sparsity)
            keep1 = ops.topk_mask(W1**2 / d.unsqueeze(0) ** 2, (i2 - i1) - prune)
        for i in range(i2 - i1):
            if pattern.structured and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                keep1[:, group] = ops.nm_mask(W1[:, group] ** 2 / d[group].unsqueeze(0) ** 2, pattern.n, pattern.m)
            w = W1[:, i]
            q = torch.where(keep1[:, i], w, torch.zeros_like(w))
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = keep1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return torch.where(keep, W, torch.zeros_like(W)), keep


def rebuild_scores(weight: torch.Tensor, grad_sq_mean: torch.Tensor, metric: Metric) -> torch.Tensor:
    """The Barber score of every weight: |W| * sqrt(A), |W| or sqrt(A), in float32."""
    if metric is Metric.W:
        return weight.abs().float()
    root = grad_sq_mean.float().sqrt()
    return root if metric is Metric.G else weight.abs().float() * root


def rebuild(
    scores: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    ratio: float,
    granularity: Granularity,
    pattern: Pattern,
) -> dict[str, torch.Tensor]:
    """The LLM-Barber mask rebuild of one sub-block (docs/algorithm.md §4.4-§4.7).

    Args:
        scores: name -> score [out, in] for every linear of the sub-block.
        masks: name -> current kept mask [out, in].
        ratio: alpha, the fraction of beneficial swaps to perform (0 = unchanged).
        granularity: the swap group; N:M patterns need ROW.
        pattern: the sparsity pattern; N:M keeps every group's count.

    Returns:
        name -> rebuilt mask; the number kept per group never changes.
    """
    if pattern.structured and granularity is not Granularity.ROW:
        raise ValueError(f"an N:M pattern needs row granularity, got {granularity.value}")
    m = pattern.m if pattern.structured else 0
    if granularity is Granularity.ROW:
        return {name: ops.rebuild_mask(scores[name], masks[name], ratio, m) for name in scores}
    if granularity is Granularity.COLUMN:
        return {
            name: ops.rebuild_mask(scores[name].t().contiguous(), masks[name].t().contiguous(), ratio).t().contiguous()
            for name in scores
        }
    if granularity is Granularity.LAYER:
        return {
            name: ops.rebuild_mask(scores[name].reshape(1, -1), masks[name].reshape(1, -1), ratio).reshape(
                masks[name].shape
            )
            for name in scores
        }
    names = list(scores)
    pooled = ops.rebuild_mask(
        torch.cat([scores[n].reshape(-1) for n in names]).unsqueeze(0),
        torch.cat([masks[n].reshape(-1) for n in names]).unsqueeze(0),
        ratio,
    ).reshape(-1)
    out, offset = {}, 0
    for name in names:
        size = masks[name].numel()
        out[name] = pooled[offset : offset + size].reshape(masks[name].shape)
        offset += size
    return out


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pruned entries become exactly +0.0 (selection, never multiplication: no -0.0)."""
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
