"""The Barber rebuild of one sub-block: the gradient pass, then the mask rebuild (docs/algorithm.md §4).

`gradient_pass` computes, at the dense weights and in float32, A = the order-fixed sum over
samples (`barber.fold`) of the squared per-sample gradient of the sub-block reconstruction loss,
whose target is the current sparse sub-block output on the sparse-trajectory input; it also
stores the dense sub-block outputs (the reference for the reported losses) in the scratch buffer.
`rebuild_subblock` scores every weight (|W|*sqrt(A), |W| or sqrt(A)), swaps pruned and kept
weights within the chosen groups and re-applies the masks. Memory is bounded by dropping, by name,
what is no longer needed: the float32 copies after the pass, the masked weights before the scores
exist, each A as soon as it is scored.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from barber import prune
from barber.fold import Fold
from barber.model import Positions, SubBlock
from barber.settings import PruneSettings

__all__ = ["gradient_pass", "per_sample_grad_sq", "rebuild_subblock"]

Tensors = dict[str, torch.Tensor]


def per_sample_grad_sq(
    core: Callable,
    x: torch.Tensor,
    target: torch.Tensor,
    weights: Tensors,
    pos: Positions,
    names: tuple[str, ...],
    folds: dict[str, Fold],
    samples: range,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold (dL_n/dW)^2 of every linear in `names` into `folds`, for a micro-batch of samples `samples`.

    L_n is the mean squared error of sample n's sub-block output at `weights` against its
    target. One batched forward and backward give each linear's per-sample output gradient
    delta_n; the per-sample weight gradient is delta_n^T x_n (x_n the linear's input), one sample
    at a time, so no weight gradient summed over samples is ever formed and inputs need no
    gradient. Each sample's square goes into its linear's order-fixed sum (`barber.fold`).

    Returns:
        (the sub-block output at `weights` [B, T, d], detached; the per-sample losses [B], float64,
        each a reduction over that sample alone).
    """
    leaves = {n: weights[n + ".weight"].detach().requires_grad_(True) for n in names}
    inputs: Tensors = {}
    outputs: Tensors = {}

    def linear(name: str, xin: torch.Tensor) -> torch.Tensor:
        w = leaves.get(name, weights.get(name + ".weight"))
        y = F.linear(xin, w, weights.get(name + ".bias"))
        if name in leaves:
            inputs[name], outputs[name] = xin.detach(), y
        return y

    y = core(x, weights, pos, linear)
    deltas = torch.autograd.grad(((y - target) ** 2).mean(dim=(1, 2)).sum(), [outputs[n] for n in names])
    for n, delta in zip(names, deltas):
        xin = inputs[n]
        delta_t = delta.reshape(delta.shape[0], -1, delta.shape[-1]).transpose(1, 2)  # [B, out, T]
        xin = xin.reshape(xin.shape[0], -1, xin.shape[-1])  # [B, T, in]
        for j, s in enumerate(samples):
            folds[n].add(s, torch.mm(delta_t[j], xin[j]).square_())  # sample s's squared gradient
    y = y.detach()
    losses = torch.stack([((y[j] - target[j]) ** 2).mean() for j in range(y.shape[0])]).double()
    return y, losses


def gradient_pass(
    sub: SubBlock, dense: Tensors, weights: Tensors, states, pos: Positions, progress: bool
) -> tuple[Tensors | None, float | None]:
    """A = sum_n (dL_n/dW)^2 at the dense weights for every linear of `sub`, and the mean loss before.

    `weights` holds the current (masked) weights; the dense sub-block outputs go to
    `states.scratch()`. Afterwards the masked weights of `sub` are dropped from `weights`: the
    rebuild replaces them, and dropping them now bounds its peak. Both results are order-fixed
    sums (`barber.fold`), on rank 0; other ranks get (None, None).
    """
    names, dtype = sub.names, states.settings.dtype
    # the sub-block's weights and biases, every 1-D tensor (the norms inside a core: q/k, sandwich) and
    # the routers of a mixture of experts
    own = [k for k in dense if k.rsplit(".", 1)[0] in names or dense[k].dim() == 1 or k in sub.fixed]
    dense32 = {k: dense[k].detach().float() for k in own}  # detached: no grad flag leaks into `dense`
    # The sparse sub-block in float32, for the targets: its small tensors copied, each linear's weight
    # converted when used (the same values, without a float32 copy of the whole sub-block).
    sparse_small = {k: weights[k].float() for k in own if k.rsplit(".", 1)[0] not in names or k.endswith(".bias")}

    def sparse_linear(name: str, xin: torch.Tensor) -> torch.Tensor:
        return F.linear(xin, weights[name + ".weight"].float(), sparse_small.get(name + ".bias"))
    folds = {n: states.fold() for n in names}
    loss_fold = states.fold()
    hidden, dense_out = states.trajectory, states.scratch()
    bar = tqdm(total=hidden.shape[0], desc=f"  {sub.kind} gradients", leave=False, unit="sample", disable=not progress)
    for c in states.chunks():
        with torch.no_grad():
            x = sub.input(hidden.get(c.rows), weights).float()
            target = sub.core(x, sparse_small, pos, sparse_linear)
        y, losses = per_sample_grad_sq(sub.core, x, target, dense32, pos, names, folds, c.samples)
        dense_out.put(c.rows, y.to(dtype))
        for j, s in enumerate(c.samples):
            loss_fold.add(s, losses[j].clone())
        bar.update(c.rows.stop - c.rows.start)
    bar.close()
    del dense32
    sparse_small.clear()
    for n in names:
        del weights[n + ".weight"]
    grad_sq = {n: folds[n].result() for n in names}
    loss = loss_fold.result()
    if loss is None:  # another rank's
        return None, None
    return grad_sq, float(loss) / states.nsamples


def rebuild_subblock(
    sub: SubBlock,
    dense: Tensors,
    init_weights: Tensors,
    weights: Tensors,
    masks: Tensors,
    grad_sq: Tensors,
    n_samples: int,
    settings: PruneSettings,
) -> dict[str, int]:
    """Rebuild the masks of `sub` in place (`masks`, and `weights` re-masked); returns the swaps per linear.

    The rebuilt masks apply to the dense values, or, with `retain_reconstruction`, to the initial
    method's values where they were kept (SparseGPT's updates). `grad_sq` is consumed. Linears whose
    A is all zero (no calibration token reached them: an expert no token chose) keep their masks.
    """
    s = settings
    # A linear no calibration token reached (an unchosen expert) has A = 0: nothing to rebuild it by.
    names = tuple(n for n in sub.names if bool(grad_sq[n].any()))
    base = {}
    for n in sub.names:
        w_dense = dense[n + ".weight"]
        base[n] = torch.where(masks[n], init_weights[n], w_dense) if s.retain_reconstruction else w_dense
    scores = {}
    for n in sub.names:  # each A is dropped once scored: A and the scores of a sub-block never coexist whole
        a = grad_sq.pop(n)
        if n in names:
            scores[n] = prune.rebuild_scores(base[n], a.div_(n_samples), s.metric)
        del a
    new_masks = prune.rebuild(scores, {n: masks[n] for n in names}, s.ratio, s.granularity, s.pattern) if names else {}
    swaps = {n: int((new_masks[n] & ~masks[n]).sum()) for n in names}
    masks.update(new_masks)
    for n in sub.names:
        weights[n + ".weight"] = prune.apply_mask(base[n], masks[n])
    return swaps
