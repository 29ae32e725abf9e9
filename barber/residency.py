"""Where the calibration hidden states live while a checkpoint is pruned: `HiddenStates`.

One object owns the memory plan (`barber.budget.plan_memory`), made once when the calibration size
is known, and everything the plan places: the trajectory buffer `h` [n, T, d] (the sparse
trajectory entering the next block, for this rank's n of the N samples), one scratch buffer of the
same shape (the gradient pass's dense sub-block outputs), the micro-batches they are read and
written in, and the background reader of the next block. It also knows which samples are this
rank's (`barber.fold.SampleGroups`) and makes the order-fixed sums over them (`fold`). Placement,
prefetch and the micro-batch never change a value.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from barber.budget import MemoryBudget, MemoryPlan, model_shapes, plan_memory
from barber.buffers import HiddenBuffer, Placement
from barber.checkpoint import BlockPrefetcher
from barber.distributed import World
from barber.errors import UsageError
from barber.fold import Chunk, Fold, SampleGroups
from barber.prune import InitMethod
from barber.settings import PruneSettings
from barber.sysmem import current_rss, peak_rss

__all__ = ["GatheredHidden", "HiddenStates"]

#: Bytes of hidden states per message when they travel between ranks (resume states).
PIECE_BYTES = 64 * 2**20


def _on(tensor: torch.Tensor, device: str) -> bool:
    """Whether `tensor` lives on `device` ("cuda" matches the current GPU)."""
    want = torch.device(device)
    if tensor.device.type != want.type:
        return False
    if want.type == "cuda" and want.index is None:
        return tensor.device.index == torch.cuda.current_device()
    return want.index is None or tensor.device.index == want.index


class HiddenStates:
    """The memory plan for `nsamples` windows of `seqlen` tokens and the buffers it places.

    Args:
        ckpt: the opened input checkpoint (shapes for the plan; blocks for the prefetcher).
        settings: device, dtype, micro-batch wish, sample groups and initial method.
        nsamples, seqlen: the calibration set (all ranks' samples).
        budget: memory budgets and forced choices.
        work_dir: where disk-backed buffers go (default: the system's temporary directory).
        world: this process's rank (default: a single process).

    Raises:
        BudgetError: the budgets cannot be met (raised at construction).
        UsageError: more ranks than sample groups.
    """

    def __init__(
        self,
        ckpt,
        settings: PruneSettings,
        nsamples: int,
        seqlen: int,
        budget: MemoryBudget,
        work_dir: Path | None = None,
        extra_block_bytes: int = 0,
        world: World | None = None,
    ):
        self.settings = settings
        self.work_dir = work_dir
        self.world = world or World.solo()
        self.nsamples, self.seqlen = nsamples, seqlen
        try:
            self.groups = SampleGroups(nsamples, settings.groups(nsamples), self.world.size, self.world.rank)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        self.local = len(self.groups.samples())  # this rank's samples
        self.plan: MemoryPlan = plan_memory(
            model_shapes(ckpt), nsamples=self.local, seqlen=seqlen, compute_dtype=settings.dtype,
            device=settings.device, budget=budget, batch_size=settings.batch_size,
            sparsegpt=settings.init is InitMethod.SPARSEGPT, rebuild=settings.rebuild, base_rss=current_rss(),
            extra_block_bytes=extra_block_bytes,
        )
        self.prefetch = BlockPrefetcher(ckpt, enabled=self.plan.prefetch)
        self.trajectory: HiddenBuffer | None = None
        self._scratch: HiddenBuffer | None = None

    def chunks(self) -> list[Chunk]:
        """This rank's micro-batches, in sample order (`chunk.rows` of the buffers; never across two groups)."""
        return self.groups.chunks(self.plan.micro_batch)

    def fold(self) -> Fold:
        """A new order-fixed sum over the calibration samples (`barber.fold`)."""
        return Fold(self.groups, self.world)

    def shape(self, hidden: int) -> tuple[int, int, int]:
        return (self.local, self.seqlen, hidden)

    def buffer(self, name: str, shape: tuple[int, ...]) -> HiddenBuffer:
        """A planned buffer of hidden-state shape in the compute dtype (disk: `work_dir/<name>-<id>.bin`)."""
        s, path = self.settings, None
        if self.plan.hidden_placement is Placement.DISK:
            root = self.work_dir if self.work_dir is not None else Path(tempfile.gettempdir())
            path = root / f"{name}-{id(self):x}.bin"
        return HiddenBuffer.allocate(shape, s.dtype, self.plan.hidden_placement, s.device, path)

    def new_trajectory(self, hidden: int) -> HiddenBuffer:
        """An empty trajectory buffer [N, T, hidden] (filled by the caller, micro-batch by micro-batch)."""
        self.trajectory = self.buffer("hidden", self.shape(hidden))
        return self.trajectory

    def adopt(self, hidden: HiddenBuffer) -> HiddenBuffer:
        """The planned trajectory buffer holding `hidden` (from `start`, a previous block or a resume)."""
        if hidden is self.trajectory:
            return hidden
        s, t = self.settings, hidden.tensor
        if (
            self.plan.hidden_placement is Placement.DEVICE
            and hidden.placement is Placement.DEVICE
            and _on(t, s.device)
            and t.dtype == s.dtype
        ):
            self.trajectory = HiddenBuffer(t, Placement.DEVICE, torch.device(s.device))
        else:
            self.trajectory = self.buffer("hidden", tuple(hidden.shape))
            for c in self.chunks():
                self.trajectory.put(c.rows, hidden.get(c.rows))
        return self.trajectory

    def _pieces(self, row_bytes: int) -> Iterator[tuple[int, slice, slice]]:
        """(owner rank, rows in the owner's buffer, samples) of every piece of the calibration set, in
        sample order: each group cut into pieces of at most PIECE_BYTES (at least one sample)."""
        lay = self.groups
        rows = max(1, PIECE_BYTES // max(row_bytes, 1))
        for g in range(lay.groups):
            local, first = lay.rows(g), lay.start(g)
            for r in range(local.start, local.stop, rows):
                n = min(rows, local.stop - r)
                yield lay.owner(g), slice(r, r + n), slice(first + r - local.start, first + r - local.start + n)

    def gathered(self, hidden: HiddenBuffer) -> "GatheredHidden | None":
        """All ranks' hidden states in sample order, streamed to rank 0 (for its resume state).

        Every rank must call this at the same point. On rank 0 it returns an object that, like a
        `HiddenBuffer`, has the whole shape, dtype and `host_pieces()`: iterating them receives the
        other ranks' pieces as they come. Other ranks send theirs here and get None.
        """
        world = self.world
        shape = (self.nsamples, *hidden.shape[1:])
        row_bytes = hidden.tensor[0].numel() * hidden.dtype.itemsize if hidden.shape[0] else 0
        pieces = self._pieces(row_bytes)
        if world.decides:
            return GatheredHidden(shape, hidden.dtype, pieces, hidden, world)
        for owner, rows, _ in pieces:
            if owner == world.rank:
                world.send(hidden.get(rows), 0)
        return None

    def spread(self, saved: HiddenBuffer | None, hidden: int) -> HiddenBuffer:
        """This rank's rows of rank 0's `saved` [N, T, d] hidden states (a resume), in a new trajectory.

        Every rank must call this at the same point; `saved` is only read on rank 0.
        """
        world = self.world
        out = self.new_trajectory(hidden)
        row_bytes = self.seqlen * hidden * self.settings.dtype.itemsize
        for owner, rows, samples in self._pieces(row_bytes):
            if world.decides:
                piece = saved.get(samples)
                if owner == 0:
                    out.put(rows, piece)
                else:
                    world.send(piece, owner)
            elif owner == world.rank:
                buf = torch.empty((rows.stop - rows.start, self.seqlen, hidden), dtype=self.settings.dtype,
                                  device=world.device)
                world.recv(buf, 0)
                out.put(rows, buf)
        return out

    def scratch(self) -> HiddenBuffer:
        """The scratch buffer, shaped like the trajectory (allocated on first use, then reused)."""
        shape = self.trajectory.shape
        if self._scratch is None or self._scratch.shape != shape:
            self._scratch = self.buffer("dense-out", tuple(shape))
        return self._scratch

    def close(self) -> None:
        """Stop the prefetch thread and drop both buffers (a disk buffer's file goes; a mapping in use stays)."""
        self.prefetch.close()
        for buf in (self._scratch, self.trajectory):
            if buf is not None:
                buf.close()
        self._scratch = self.trajectory = None

    def memory_report(self) -> dict:
        """The plan chosen and the peaks reached so far (RSS; GPU max allocated on a GPU run)."""
        out = {"plan": self.plan.describe(), "peak_rss": peak_rss()}
        if torch.device(self.settings.device).type == "cuda":
            out["peak_gpu_allocated"] = torch.cuda.max_memory_allocated()
            out["peak_gpu_reserved"] = torch.cuda.max_memory_reserved()
        return out


class GatheredHidden:
    """Rank 0's view of every rank's hidden states, in sample order, for `barber.state.save_state`.

    `host_pieces()` yields rank 0's own pieces from its buffer and receives the others' pieces from
    their owners, one at a time; iterate it once, while every other rank runs `HiddenStates.gathered`.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, pieces, local: HiddenBuffer, world: World):
        self.shape, self.dtype = torch.Size(shape), dtype
        self._pieces, self._local, self._world = pieces, local, world

    def host_pieces(self) -> Iterator[torch.Tensor]:
        for owner, rows, _ in self._pieces:
            if owner == 0:
                yield self._local.get(rows)
            else:
                buf = torch.empty((rows.stop - rows.start, *self.shape[1:]), dtype=self.dtype,
                                  device=self._world.device)
                self._world.recv(buf, owner)
                yield buf
