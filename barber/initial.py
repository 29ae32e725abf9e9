"""Initial masks: the block's calibration statistics, and a table from `InitMethod` to a selection.

`collect_stats` runs the dense block once over the calibration hidden states (the sparse
trajectory) and records every linear's input statistics as order-fixed sums over samples
(`barber.fold`): the squared norm of each input column (Wanda) and, where asked, X^T X (SparseGPT,
and the reconstruction's per-linear Hessian). `INITIAL[method](weights, stats, settings)` turns a block's
dense weights into (the weights the masks apply to, the kept masks); only SparseGPT changes the
weights. The math itself is in `barber.prune`.

A linear whose input statistics are all zero saw no calibration token: a routed expert that no
token chose (`barber.moe`). Its statistics say nothing, so it is pruned by magnitude (row-wise, in
the run's pattern) with its dense values, whatever the method; `unreached` lists such linears.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from barber import prune
from barber.fold import Chunk, Fold
from barber.model import Arch, Positions
from barber.prune import InitMethod
from barber.settings import PruneSettings

__all__ = ["INITIAL", "Stats", "collect_stats", "initial_masks", "unreached"]

Tensors = dict[str, torch.Tensor]


class Stats:
    """Per-linear input statistics as order-fixed sums over samples (`barber.fold`): x^2 per column, X^T X.

    Linears that read the same tensor (q/k/v, gate/up) share one sum, so X^T X exists once per
    input. After `finish`, `sq` (float64) and `xtx` (float32) map every linear to its sum on
    rank 0; they are empty on other ranks.
    """

    def __init__(self, hessian: bool, new_fold: Callable[[], Fold]):
        self.hessian = hessian
        self._new_fold = new_fold
        self._key: dict[str, str] = {}  # linear -> the first linear that reads its input
        self._sq: dict[str, Fold] = {}
        self._xtx: dict[str, Fold] = {}
        self.sq: Tensors = {}
        self.xtx: Tensors = {}
        self.samples = 0

    def linear(self, w: Tensors, chunk: Chunk) -> Callable[[str, torch.Tensor], torch.Tensor]:
        """A `linear(name, x)` for `Arch` that records x (micro-batch `chunk`) before applying the dense layer."""

        last: list = [None, None]  # (input, its key): q/k/v and gate/up share an input

        def record(name: str, x: torch.Tensor) -> torch.Tensor:
            if last[0] is not x:
                last[:] = [x, name]
                self._record(name, x.detach(), chunk)
            self._key[name] = last[1]
            return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))

        return record

    def _record(self, key: str, x: torch.Tensor, chunk: Chunk) -> None:
        """Fold each sample's sum of x^2 per column (float64) and X^T X (float32) into the sums of `key`."""
        if key not in self._sq:
            self._sq[key] = self._new_fold()
            if self.hessian:
                self._xtx[key] = self._new_fold()
        for j, s in enumerate(chunk.samples):
            xs = x[j].reshape(-1, x.shape[-1]).float()
            xd = xs.double()
            self._sq[key].add(s, (xd * xd).sum(0))
            if self.hessian:
                self._xtx[key].addmm(s, xs.T, xs)

    def finish(self, nsamples: int) -> None:
        """Close the sums (rank 0 receives the other ranks' last groups): `sq` and `xtx` per linear."""
        self.samples = nsamples
        sq = {k: f.result() for k, f in self._sq.items()}
        xtx = {k: f.result() for k, f in self._xtx.items()}
        self._sq, self._xtx = {}, {}
        if next(iter(sq.values()), None) is None:  # another rank's
            return
        self.sq = {n: sq[k] for n, k in self._key.items()}
        if self.hessian:
            self.xtx = {n: xtx[k] for n, k in self._key.items()}


def collect_stats(arch: Arch, dense: Tensors, states, pos: Positions, hessian: bool) -> Stats:
    """One dense forward of the block over the trajectory of `states` (a `HiddenStates`), recording stats."""
    stats = Stats(hessian, states.fold)
    hidden = states.trajectory
    with torch.no_grad():
        for c in states.chunks():
            arch.block_forward(hidden.get(c.rows), dense, pos, stats.linear(dense, c))
    stats.finish(states.nsamples)
    return stats


def unreached(stats: Stats | None) -> list[str]:
    """The linears no calibration token reached (all-zero input statistics), in `stats` order."""
    if stats is None:
        return []
    return [n for n, sq in stats.sq.items() if not bool(sq.any())]


def _by_magnitude(w: torch.Tensor, s: PruneSettings) -> torch.Tensor:
    """The row-wise magnitude mask of an unreached linear."""
    return prune.select(w.abs().float(), s.sparsity, s.pattern)


def _magnitude(weight: Tensors, stats: Stats | None, s: PruneSettings) -> tuple[Tensors, Tensors]:
    masks = {n: prune.magnitude_mask(w, s.sparsity, s.pattern, s.magnitude_per_matrix) for n, w in weight.items()}
    return weight, masks


def _wanda(weight: Tensors, stats: Stats, s: PruneSettings) -> tuple[Tensors, Tensors]:
    masks = {}
    for n, w in weight.items():
        if bool(stats.sq[n].any()):
            masks[n] = prune.select(prune.wanda_scores(w, stats.sq[n]), s.sparsity, s.pattern)
        else:
            masks[n] = _by_magnitude(w, s)
    return weight, masks


def _sparsegpt(weight: Tensors, stats: Stats, s: PruneSettings) -> tuple[Tensors, Tensors]:
    updated, masks = {}, {}
    for n, w in weight.items():
        if not bool(stats.sq[n].any()):
            updated[n], masks[n] = w, _by_magnitude(w, s)
            continue
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
