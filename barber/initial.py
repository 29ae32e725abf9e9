"""Initial masks: the block's calibration statistics, and a table from `InitMethod` to a selection.

`collect_stats` runs the dense block once over the calibration hidden states (the sparse
trajectory) and records every linear's input statistics as sums over samples (all-reducible):
the squared norm of each input column (Wanda) and, where asked, X^T X (SparseGPT, and the
reconstruction's per-linear Hessian). `INITIAL[method](weights, stats, settings)` turns a block's
dense weights into (the weights the masks apply to, the kept masks); only SparseGPT changes the
weights. The math itself is in `barber.prune`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from barber import prune
from barber.model import Arch, Positions
from barber.prune import InitMethod
from barber.settings import PruneSettings

__all__ = ["INITIAL", "Stats", "collect_stats", "initial_masks"]

Tensors = dict[str, torch.Tensor]


class Stats:
    """Per-linear input statistics as sums over samples (all-reducible): x^2 per column, X^T X."""

    def __init__(self, hessian: bool):
        self.hessian = hessian
        self.sq: Tensors = {}
        self.xtx: Tensors = {}
        self.samples = 0

    def linear(self, w: Tensors) -> Callable[[str, torch.Tensor], torch.Tensor]:
        """A `linear(name, x)` for `Arch` that records x before applying the dense layer."""

        last: list = [None, None, None]  # (input, its x^2 sum, its X^T X): q/k/v and gate/up share an input

        def record(name: str, x: torch.Tensor) -> torch.Tensor:
            if last[0] is not x:
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                last[:] = [x, (flat * flat).sum(0), flat.T @ flat if self.hessian else None]
            _, sq, xtx = last
            self.sq[name] = self.sq[name] + sq if name in self.sq else sq
            if self.hessian:
                self.xtx[name] = self.xtx[name] + xtx if name in self.xtx else xtx
            return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))

        return record


def collect_stats(arch: Arch, dense: Tensors, states, pos: Positions, hessian: bool) -> Stats:
    """One dense forward of the block over the trajectory of `states` (a `HiddenStates`), recording stats."""
    stats = Stats(hessian=hessian)
    linear = stats.linear(dense)
    hidden = states.trajectory
    with torch.no_grad():
        for c in states.chunks():
            arch.block_forward(hidden.get(c), dense, pos, linear)
    stats.samples = hidden.shape[0]
    return stats


def _magnitude(weight: Tensors, stats: Stats | None, s: PruneSettings) -> tuple[Tensors, Tensors]:
    masks = {n: prune.magnitude_mask(w, s.sparsity, s.pattern, s.magnitude_per_matrix) for n, w in weight.items()}
    return weight, masks


def _wanda(weight: Tensors, stats: Stats, s: PruneSettings) -> tuple[Tensors, Tensors]:
    masks = {n: prune.select(prune.wanda_scores(w, stats.sq[n]), s.sparsity, s.pattern) for n, w in weight.items()}
    return weight, masks


def _sparsegpt(weight: Tensors, stats: Stats, s: PruneSettings) -> tuple[Tensors, Tensors]:
    updated, masks = {}, {}
    for n, w in weight.items():
        new, keep = prune.sparsegpt_prune(
            w, stats.xtx[n], stats.samples, s.sparsity, s.pattern, s.sparsegpt_blocksize, s.sparsegpt_percdamp
        )
        updated[n], masks[n] = new.to(w.dtype), keep
    return updated, masks


#: method -> (needs calibration statistics, needs X^T X, selection).
INITIAL: dict[
    InitMethod, tuple[bool, bool, Callable[[Tensors, Stats | None, PruneSettings], tuple[Tensors, Tensors]]]
] = {
    InitMethod.MAGNITUDE: (False, False, _magnitude),
    InitMethod.WANDA: (True, False, _wanda),
    InitMethod.SPARSEGPT: (True, True, _sparsegpt),
}


def initial_masks(weight: Tensors, stats: Stats | None, settings: PruneSettings) -> tuple[Tensors, Tensors]:
    """(weights the masks apply to, kept masks) of every linear in `weight` (name -> dense weight)."""
    return INITIAL[settings.init][2](weight, stats, settings)
