"""Calibration statistics as sums in a fixed order (docs/algorithm.md §10, "Order-fixed statistics").

Float addition is not associative, so a sum over samples has one value only once its order is fixed.
The N calibration samples are cut into G contiguous groups (`SampleGroups`; G = `sample_groups`,
at most N), and every statistic is defined as

    total = (((P_0 + P_1) + P_2) + ...) + P_{G-1},    P_g = (((p_a + p_{a+1}) + ...) + p_{b-1})

over the samples a..b-1 of group g, where p_s is computed from sample s alone, with the same shapes
whatever the configuration. A matrix statistic X^T X may fold p_s in as `P.addmm_(x_s^T, x_s)`:
the same call in every configuration, so the same bits. Nothing here depends on the micro-batch
(a micro-batch never straddles two groups, see `SampleGroups.chunks`), on where the hidden states
live, or on how many ranks share the work.

Ranks: group g belongs to rank g mod W (round robin). Rank 0 owns group 0 and folds: after each of
its own groups it receives the next W - 1 groups' partials from their owners, in group order, and
adds them. So rank 0 holds the running total and one partial, every other rank one partial at a
time, whatever W; per block, rank 0 receives (G - its groups) partials of every statistic. Other
ranks' `result` is None: the statistics exist on rank 0, which decides (`barber.distributed`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

__all__ = ["Chunk", "Fold", "Link", "SampleGroups"]


class Link(Protocol):
    """Point-to-point transport between ranks (`barber.distributed.World`)."""

    rank: int
    size: int

    def send(self, tensor: torch.Tensor, dst: int) -> None: ...

    def recv(self, tensor: torch.Tensor, src: int) -> None: ...


class Chunk(NamedTuple):
    """A micro-batch: `rows` of this rank's hidden states, which are samples `first`.. of the calibration set."""

    rows: slice
    first: int

    @property
    def samples(self) -> range:
        return range(self.first, self.first + self.rows.stop - self.rows.start)


@dataclass(frozen=True)
class SampleGroups:
    """N samples in G contiguous groups of sizes as equal as possible; group g on rank g mod W.

    Raises:
        ValueError: G outside [1, N], or more ranks than groups.
    """

    nsamples: int
    groups: int
    world: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.groups <= self.nsamples:
            raise ValueError(f"{self.groups} sample groups for {self.nsamples} samples: need 1 to {self.nsamples}")
        if self.world > self.groups:
            raise ValueError(
                f"{self.world} ranks but only {self.groups} sample groups: every rank needs one "
                f"(use at most {self.groups} ranks, or more --sample-groups)"
            )
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside a world of {self.world}")

    def start(self, g: int) -> int:
        """The first sample of group g (g = G gives N)."""
        return g * self.nsamples // self.groups

    def group_of(self, sample: int) -> int:
        return bisect.bisect_right([self.start(g) for g in range(1, self.groups)], sample)

    def owner(self, g: int) -> int:
        return g % self.world

    def owned(self, rank: int | None = None) -> list[int]:
        """The groups of `rank` (default: this rank), in order."""
        return list(range(self.rank if rank is None else rank, self.groups, self.world))

    def rows(self, g: int) -> slice:
        """Where group g's samples are in its owner's hidden states (the owner's earlier groups come first)."""
        offset = sum(self.start(h + 1) - self.start(h) for h in range(self.owner(g), g, self.world))
        return slice(offset, offset + self.start(g + 1) - self.start(g))

    def samples(self, rank: int | None = None) -> list[int]:
        """The samples of `rank` (default: this rank) in order: its hidden-state rows are these samples."""
        return [s for g in self.owned(rank) for s in range(self.start(g), self.start(g + 1))]

    def chunks(self, micro_batch: int) -> list[Chunk]:
        """This rank's micro-batches of at most `micro_batch` samples, in order, none across two groups."""
        out, row = [], 0
        for g in self.owned():
            first, stop = self.start(g), self.start(g + 1)
            for s in range(first, stop, micro_batch):
                n = min(micro_batch, stop - s)
                out.append(Chunk(slice(row, row + n), s))
                row += n
        return out


class Fold:
    """One statistic's sum over the samples, in the fixed order of the module docstring.

    Feed every sample of this rank once, in increasing order (`add` or `addmm`); then `result()`
    is the total on rank 0 and None elsewhere. A value given to `add` belongs to the fold (it may be
    added to in place): pass a fresh tensor, not a view of something still in use.
    """

    def __init__(self, layout: SampleGroups, link: Link | None = None):
        if layout.world > 1 and link is None:
            raise ValueError("a fold over several ranks needs a link")
        self.layout, self.link = layout, link
        self.total: torch.Tensor | None = None
        self._partial: torch.Tensor | None = None
        self._spare: torch.Tensor | None = None  # rank 0: a received partial's buffer, reused for the next
        self._folded = 0  # groups folded into `total` (rank 0)
        self._next = 0  # index into this rank's groups of the group being filled

    def add(self, sample: int, value: torch.Tensor) -> None:
        """p_sample = `value`."""
        if self._partial is None:
            self._start(sample)
            self._partial = value
        else:
            self._partial.add_(value)
        self._after(sample)

    def addmm(self, sample: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """p_sample = a @ b, folded in as P.addmm_(a, b) (no [a @ b] temporary)."""
        if self._partial is None:
            self._start(sample)
            self._partial = torch.mm(a, b)
        else:
            self._partial.addmm_(a, b)
        self._after(sample)

    def _start(self, sample: int) -> None:
        lay = self.layout
        owned = lay.owned()
        if self._next >= len(owned) or sample != lay.start(owned[self._next]):
            raise RuntimeError(f"fold: sample {sample} does not start this rank's next group")
        self._spare = None  # the new partial takes its place

    def _after(self, sample: int) -> None:
        lay = self.layout
        g = lay.owned()[self._next]
        if sample != lay.start(g + 1) - 1:
            return
        partial, self._partial = self._partial, None
        self._next += 1
        if lay.rank != 0:
            self.link.send(partial, 0)
            return
        self._fold(partial)
        for other in range(g + 1, min(g + lay.world, lay.groups)):
            buf = self._spare if self._spare is not None else torch.empty_like(self.total)
            self.link.recv(buf, lay.owner(other))
            self._fold(buf)
        if lay.world == 1:
            self._spare = None

    def _fold(self, partial: torch.Tensor) -> None:
        if self.total is None:
            self.total = partial
        else:
            self.total.add_(partial)
            self._spare = partial
        self._folded += 1

    def result(self) -> torch.Tensor | None:
        """The total (rank 0) or None (other ranks), once every sample was fed."""
        lay = self.layout
        if self._next != len(lay.owned()):
            raise RuntimeError(f"fold: {len(lay.owned()) - self._next} of this rank's groups were not fed")
        if lay.rank != 0:
            return None
        if self._folded != lay.groups:
            raise RuntimeError(f"fold: {lay.groups - self._folded} groups missing")
        self._spare = None
        return self.total
