"""The block schedule: one transformer block at a time, initial mask, rebuild, re-fit, advance.

Data flow (docs/algorithm.md §2): calibration hidden states `h` [N, T, d] follow the sparse
trajectory. For each block, in order (`Pruner.run_block`):

1. read the block's dense weights from the checkpoint (read ahead in the background);
2. statistics and initial masks (`barber.initial`): magnitude needs no data; Wanda and SparseGPT
   take one forward pass of the dense block over `h` that records each linear's inputs;
3. per sub-block (attention, then MLP; `Arch.subblocks`):
   a. the Barber rebuild (`barber.rebuild`): the gradient pass at the dense weights, then the
      mask rebuild;
   b. the re-fit of the kept weights on the final mask (`barber.reconstruct`), when asked;
   c. the sparse sub-block advances `h`, and its output error against the dense sub-block is
      recorded;
4. the pruned linears of the block are handed to the writer.

Memory (`barber.residency.HiddenStates`): where `h` and the scratch buffer live, the micro-batch,
and the read-ahead, planned once from the shapes and the budgets. Placement and prefetch never
change a value.

Precision: forwards, weights and `h` use `PruneSettings.dtype` (bfloat16 is the safe reduced
choice: the float32 range, so no overflow of large residual activations; float16 can overflow on
models with activation outliers). Norms run in float32 whatever the dtype, statistics are
accumulated in float32, and the whole gradient pass, the re-fit and every selection score are
float32. On a GPU, `allow_tf32` lets float32 matmuls use TF32 tensor cores: about 10 mantissa
bits per product instead of 23, so gradients, hence scores near a selection threshold, and so a
few mask entries, can change. Its effect on the masks has not been measured yet; off by default.

Everything that defines a block's work is in `BlockState` (block index, hidden states, report so
far), so a resume can restart the loop at any block boundary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from barber import ops, prune, reconstruct
from barber.budget import MemoryBudget
from barber.buffers import HiddenBuffer
from barber.checkpoint import Checkpoint
from barber.distributed import World
from barber.initial import INITIAL, Stats, collect_stats, initial_masks, unreached
from barber.model import Arch, Positions, SubBlock
from barber.prune import InitMethod
from barber.rebuild import gradient_pass, rebuild_subblock
from barber.report import BlockReport, LayerStats, SubblockReport
from barber.residency import HiddenStates
from barber.settings import PruneSettings, Reconstruct
from barber.sysmem import peak_rss, release_free_memory
from barber.timing import phase

log = logging.getLogger(__name__)

__all__ = ["BlockState", "Pruner", "phase"]

Tensors = dict[str, torch.Tensor]
Writer = Callable[[int, Tensors], None]


@dataclass
class BlockState:
    """The state between two blocks: what a resumed run needs to continue at `next_block`."""

    next_block: int
    hidden: HiddenBuffer  # [N, T, d], sparse trajectory entering block `next_block`
    blocks: list[BlockReport] = field(default_factory=list)  # per-block reports so far


@contextlib.contextmanager
def _matmul_precision(device: str, allow_tf32: bool) -> Iterator[None]:
    """TF32 for float32 matmuls and convolutions on a GPU while inside, as asked; restored after."""
    if torch.device(device).type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow_tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _mask_stats(mask: torch.Tensor) -> LayerStats:
    """A kept mask's report entry: shape, kept count, sparsity, and the least and most sparse row
    (equal after a row rebuild; column, layer and block rebuilds keep only their group's count)."""
    rows, cols = mask.shape
    per_row = mask.sum(dim=1)
    row_sparsity = (1 - int(per_row.max()) / cols, 1 - int(per_row.min()) / cols)
    return LayerStats((rows, cols), int(per_row.sum()), 1 - mask.float().mean().item(), row_sparsity)


class Pruner:
    """Prunes a checkpoint block by block (see the module docstring).

    Args:
        ckpt: the opened input checkpoint.
        settings: what to prune and how.
        progress: show tqdm bars over samples in the gradient pass.
        budget: memory budgets and forced choices (default: automatic, see `barber.budget`).
        work_dir: where disk-backed hidden states go (default: the system's temporary directory).
        world: this process's rank in a data-parallel run (default: a single process); rank 0
            decides the masks and weights, every rank advances its own samples.
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        settings: PruneSettings,
        progress: bool = True,
        *,
        budget: MemoryBudget | None = None,
        work_dir: Path | None = None,
        world: World | None = None,
    ):
        self.ckpt = ckpt
        self.world = world or World.solo()
        self.settings = settings
        self.arch = Arch.from_checkpoint(ckpt)
        self.linears = ckpt.family.linears
        self.progress = progress
        self.budget = budget or MemoryBudget()
        self.work_dir = work_dir
        self.states: HiddenStates | None = None

    def prepare(self, nsamples: int, seqlen: int) -> HiddenStates:
        """Plan memory for `nsamples` windows of `seqlen` tokens (once); raises BudgetError if impossible."""
        if self.states is None:
            stages = [sub.stages for sub in self.arch.subblocks()]
            extra = reconstruct.plan_bytes(self.ckpt.family.block_shapes(self.ckpt.config), stages, self.settings)
            self.states = HiddenStates(
                self.ckpt, self.settings, nsamples, seqlen, self.budget, self.work_dir, extra_block_bytes=extra,
                world=self.world,
            )
        return self.states

    @property
    def plan(self):
        """The memory plan (None before `prepare`)."""
        return self.states.plan if self.states else None

    def close(self) -> None:
        """Stop the prefetch thread and drop the buffers (hidden states handed out stay valid)."""
        if self.states is not None:
            self.states.close()

    def start(self, calib_ids: torch.Tensor) -> BlockState:
        """Embed the calibration windows [N, T] (this rank's): the state before block 0."""
        s = self.settings
        states = self.prepare(calib_ids.shape[0], calib_ids.shape[1])
        states.prefetch.ahead(0)
        w = self.ckpt.embedding_weights(dtype=s.dtype, device=s.device)
        hidden = states.new_trajectory(self.ckpt.config.hidden_size)
        for c in states.chunks():
            hidden.put(c.rows, self.arch.embed(calib_ids[c.first : c.first + len(c.samples)].to(s.device), w))
        del w
        release_free_memory()
        return BlockState(0, hidden)

    def run_block(self, state: BlockState, write: Writer) -> BlockState:
        """Prune block `state.next_block`, hand its pruned linears to `write`, return the next state."""
        s, i = self.settings, state.next_block
        if self.states is None:  # not prepared by the caller: a single process, all samples in `state.hidden`
            self.prepare(state.hidden.shape[0], state.hidden.shape[1])
        states = self.states
        hidden = states.adopt(state.hidden)
        times: dict[str, float] = {}
        with phase(times, "read"):
            raw = states.prefetch.take(i)
            dense = {k: v.to(device=s.device, dtype=s.dtype) for k, v in raw.items()}
            del raw
            states.prefetch.ahead(i + 1)
            pos = self.arch.positions(hidden.shape[1], device=s.device, layer=i)
        before = self.world.sent + self.world.received
        with _matmul_precision(s.device, s.allow_tf32):
            report = self._prune_block(i, dense, pos, write, times)
        if self.world.distributed:
            report = dataclasses.replace(report, exchanged=self.world.sent + self.world.received - before)
        del dense
        release_free_memory()
        if i + 1 >= self.ckpt.num_layers:
            self.close()  # a disk buffer's file goes; its mapping stays valid while `hidden` lives
        return BlockState(i + 1, hidden, state.blocks + [report])

    def _prune_block(
        self, i: int, dense: Tensors, pos: Positions, write: Writer, times: dict[str, float]
    ) -> BlockReport:
        """Statistics, initial masks, then per sub-block rebuild, re-fit and advance; write: block i's report.

        Only rank 0 (`World.decides`) selects, rebuilds, solves, writes and reports; the other
        ranks receive its weights (`_share`) and advance their own samples.
        """
        s, states, world = self.settings, self.states, self.world
        needs_stats, needs_xtx, _ = INITIAL[s.init]
        hessian = needs_xtx or s.reconstruct is Reconstruct.LAYER
        with phase(times, "stats"):
            stats = collect_stats(self.arch, dense, states, pos, hessian) if needs_stats or hessian else None
        weights = dict(dense)
        init_weights, masks = {}, {}
        with phase(times, "select"):
            if world.decides:
                init_weights, masks = initial_masks({n: dense[n + ".weight"] for n in self.linears}, stats, s)
                weights.update({n + ".weight": prune.apply_mask(init_weights[n], masks[n]) for n in self.linears})
            self._share(self.linears, weights, masks, dense, values=s.init is InitMethod.SPARSEGPT)
        missed = unreached(stats) if world.decides else []
        if missed:
            log.warning("block %d: no calibration token reached %d linear(s) (%s); pruned by magnitude",
                        i, len(missed), ", ".join(missed[:3]) + (", ..." if len(missed) > 3 else ""))
        subblocks = []
        if s.rebuild or s.reconstruct is not Reconstruct.NONE:
            for sub in self.arch.subblocks():
                subblocks.append(self._subblock(sub, dense, init_weights, weights, masks, stats, pos, times))
        else:
            with phase(times, "forward"), torch.no_grad():
                hidden = states.trajectory
                for c in states.chunks():
                    hidden.put(c.rows, self.arch.block_forward(hidden.get(c.rows), weights, pos))
        if world.decides:
            with phase(times, "write"):
                write(i, {n: weights[n + ".weight"] for n in self.linears})
        layers = {n: _mask_stats(masks[n]) for n in self.linears} if world.decides else {}
        peak_gpu = torch.cuda.max_memory_allocated() if torch.device(s.device).type == "cuda" else None
        return BlockReport(i, layers, subblocks, times, peak_rss(), peak_gpu, unreached=tuple(missed))

    def _subblock(
        self,
        sub: SubBlock,
        dense: Tensors,
        init_weights: Tensors,
        weights: Tensors,
        masks: Tensors,
        stats: Stats | None,
        pos: Positions,
        times: dict[str, float],
    ) -> SubblockReport:
        """Rebuild, re-fit and advance one sub-block (`weights`, `masks` in place): its report."""
        s, states, world = self.settings, self.states, self.world
        loss_before, swaps, refit = None, {}, None
        if s.rebuild:
            with phase(times, "gradient"):
                grad_sq, loss_before = gradient_pass(sub, dense, weights, states, pos, self.progress)
            with phase(times, "rebuild"):
                if world.decides:
                    swaps = rebuild_subblock(sub, dense, init_weights, weights, masks, grad_sq, states.nsamples, s)
                del grad_sq
                values = s.init is InitMethod.SPARSEGPT and s.retain_reconstruction
                self._share(sub.names, weights, masks, dense, values=values)
        if s.reconstruct is not Reconstruct.NONE:
            with phase(times, "reconstruct"):
                refit = reconstruct.refit_subblock(sub, dense, weights, masks, stats, states, pos, times)
        with phase(times, "forward"):
            loss_after = self._advance(sub, weights, None if s.rebuild else dense, pos)
        for n in sub.names:  # past its sub-block, a linear needs only its pruned weights and mask
            dense.pop(n + ".weight")
            init_weights.pop(n, None)
        return SubblockReport(sub.kind, loss_after, loss_before, swaps, refit)

    def _share(self, names: tuple[str, ...], weights: Tensors, masks: Tensors, dense: Tensors, values: bool) -> None:
        """Rank 0's pruned weights of `names` on every rank (nothing to do for a single process).

        When they are the dense weights masked (`values` False) only the masks travel, bit-packed
        (1 bit per weight), and the other ranks mask their dense copy the same way; otherwise (SparseGPT's
        updates, a re-fit) the weights themselves, in the compute dtype.
        """
        world = self.world
        if not world.distributed:
            return
        if values:
            world.share_weights(weights, [n + ".weight" for n in names], dense)
            return
        for n in names:
            w = dense[n + ".weight"]
            if world.decides:
                world.broadcast(ops.pack_bitmask(masks[n]))
            else:
                bits = world.broadcast(torch.empty((w.shape[0], (w.shape[1] + 7) // 8), dtype=torch.uint8,
                                                   device=w.device))
                weights[n + ".weight"] = prune.apply_mask(w, ops.unpack_bitmask(bits, w.shape[1]))

    def _advance(self, sub: SubBlock, weights: Tensors, dense: Tensors | None, pos: Positions) -> float | None:
        """h <- the sparse sub-block's output; returns its mean squared error against the dense sub-block
        (the gradient pass's outputs in the scratch buffer, or, given `dense`, computed here), an
        order-fixed mean over samples, on rank 0 (None on other ranks)."""
        states = self.states
        hidden, ref = states.trajectory, (states.scratch() if dense is None else None)
        loss = states.fold()
        with torch.no_grad():
            for c in states.chunks():
                h = hidden.get(c.rows)
                y = sub.core(sub.input(h, weights), weights, pos)
                y_dense = ref.get(c.rows) if ref is not None else sub.core(sub.input(h, dense), dense, pos)
                for j, s in enumerate(c.samples):
                    loss.add(s, ((y[j].float() - y_dense[j].float()) ** 2).mean().double())
                hidden.put(c.rows, sub.residual(h, y, weights))
        total = loss.result()
        return None if total is None else float(total) / states.nsamples
