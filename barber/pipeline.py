"""The streaming pruner: one transformer block at a time, initial mask then the Barber rebuild.

Data flow (algorithm.md Part A): calibration hidden states `h` [N, T, d] follow the sparse
trajectory. For each block, in order:

1. read the block's dense weights from the checkpoint;
2. initial mask of every linear: magnitude (no data), or Wanda / SparseGPT from one forward
   pass of the dense block over `h` that records each linear's input statistics;
3. the Barber rebuild, attention sub-block then MLP sub-block: the target is the current
   sparse sub-block output on the sparse-trajectory input; per-sample float32 gradients of
   the reconstruction loss at the dense weights give A = mean of squared gradients; the
   score |W|*sqrt(A) rebuilds the mask; the sparse output advances `h`;
4. the pruned linears of the block are written to the work directory.

At the end the output shards are assembled tensor by tensor with the input's names and
layout. Only one block's weights (dense and sparse) and `h` are ever in memory.

Everything that defines a block's work is in `BlockState` (block index, hidden states,
report so far), so a later resume can restart the loop at any block boundary.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from barber import prune
from barber.checkpoint import Checkpoint
from barber.evaluate import advance_hidden
from barber.model import Arch, Positions
from barber.prune import Granularity, InitMethod, Metric, Pattern

log = logging.getLogger(__name__)


def default_rebuild(init: InitMethod, pattern: Pattern) -> tuple[float, Granularity]:
    """The reference code's rebuild ratio and granularity for an initial method (algorithm.md §1.8)."""
    if pattern.structured:
        return 0.01, Granularity.ROW
    return {
        InitMethod.WANDA: (0.01, Granularity.ROW),
        InitMethod.MAGNITUDE: (0.1, Granularity.BLOCK),
        InitMethod.SPARSEGPT: (0.1, Granularity.LAYER),
    }[init]


@dataclass(frozen=True)
class PruneSettings:
    """Everything that decides the pruned weights (and nothing about files or progress)."""

    sparsity: float = 0.5
    pattern: Pattern = Pattern()
    init: InitMethod = InitMethod.WANDA
    rebuild: bool = True
    ratio: float = 0.01
    granularity: Granularity = Granularity.ROW
    metric: Metric = Metric.WG
    retain_reconstruction: bool = False
    magnitude_per_matrix: bool = False
    sparsegpt_blocksize: int = 128
    sparsegpt_percdamp: float = 0.01
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    batch_size: int = 1

    def describe(self) -> dict:
        """A JSON-ready description of the settings."""
        out = asdict(self)
        out["pattern"] = str(self.pattern)
        out["init"] = self.init.value
        out["granularity"] = self.granularity.value
        out["metric"] = self.metric.value
        out["dtype"] = str(self.dtype).removeprefix("torch.")
        return out


@dataclass
class BlockState:
    """The state between two blocks: what a resumed run needs to continue at `next_block`."""

    next_block: int
    hidden: torch.Tensor  # [N, T, d], sparse trajectory entering block `next_block`
    blocks: list[dict] = field(default_factory=list)  # per-block reports so far


class Stats:
    """Per-linear input statistics as sums over samples (all-reducible): x^2 per column, X^T X."""

    def __init__(self, hessian: bool):
        self.hessian = hessian
        self.sq: dict[str, torch.Tensor] = {}
        self.xtx: dict[str, torch.Tensor] = {}
        self.samples = 0

    def linear(self, w: dict[str, torch.Tensor]) -> Callable[[str, torch.Tensor], torch.Tensor]:
        """A `linear(name, x)` for `Arch` that records x before applying the dense layer."""

        def record(name: str, x: torch.Tensor) -> torch.Tensor:
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            sq = (flat * flat).sum(0)
            self.sq[name] = self.sq[name] + sq if name in self.sq else sq
            if self.hessian:
                xtx = flat.T @ flat
                self.xtx[name] = self.xtx[name] + xtx if name in self.xtx else xtx
            return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))

        return record


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Pruner:
    """Prunes a checkpoint block by block. See the module docstring for the data flow.

    Args:
        ckpt: the opened input checkpoint.
        settings: what to prune and how.
        progress: show tqdm bars (over blocks, and over samples in the gradient pass).
    """

    def __init__(self, ckpt: Checkpoint, settings: PruneSettings, progress: bool = True):
        self.ckpt = ckpt
        self.settings = settings
        self.arch = Arch.from_checkpoint(ckpt)
        self.family = ckpt.family
        self.progress = progress

    # ---- the loop ----------------------------------------------------------------------------

    def start(self, calib_ids: torch.Tensor) -> BlockState:
        """Embed the calibration windows [N, T]: the state before block 0."""
        s = self.settings
        w = self.ckpt.embedding_weights(dtype=s.dtype, device=s.device)
        ids = calib_ids.to(s.device)
        hidden = torch.cat([self.arch.embed(ids[c], w) for c in _chunks(ids.shape[0], s.batch_size)])
        return BlockState(0, hidden)

    def run_block(self, state: BlockState, write: Callable[[int, dict[str, torch.Tensor]], None]) -> BlockState:
        """Prune block `state.next_block`, hand its pruned linears to `write`, return the next state."""
        s = self.settings
        i = state.next_block
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        dense = self.ckpt.block_weights(i, dtype=s.dtype, device=s.device)
        pos = self.arch.positions(state.hidden.shape[1], device=s.device)
        times["read"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        init_weights, masks = self._initial(dense, state.hidden, pos)
        times["init"] = time.perf_counter() - t0

        hidden = state.hidden
        subblocks = []
        weights = dict(dense)
        weights.update({n + ".weight": prune.apply_mask(init_weights[n], masks[n]) for n in self.family.linears})
        if s.rebuild:
            for kind, names in (("attn", self.family.attn_linears), ("mlp", self.family.mlp_linears)):
                report, times_sub = self._rebuild_subblock(kind, names, dense, init_weights, weights, masks, hidden, pos)
                subblocks.append(report)
                for k, v in times_sub.items():
                    times[k] = times.get(k, 0.0) + v
        else:
            t0 = time.perf_counter()
            advance_hidden(self.arch, hidden, weights, pos, chunk_size=s.batch_size)
            times["forward"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        pruned = {n: weights[n + ".weight"] for n in self.family.linears}
        write(i, pruned)
        times["write"] = time.perf_counter() - t0
        layers = {
            n: {"shape": list(masks[n].shape), "kept": int(masks[n].sum()), "sparsity": 1 - masks[n].float().mean().item()}
            for n in self.family.linears
        }
        report = {"block": i, "layers": layers, "subblocks": subblocks, "seconds": times, "peak_rss": _rss_bytes()}
        return BlockState(i + 1, hidden, state.blocks + [report])

    # ---- initial masks --------------------------------------------------------------------------

    def _initial(
        self, dense: dict[str, torch.Tensor], hidden: torch.Tensor, pos: Positions
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Initial masks of every linear (name -> kept mask) and the weights they apply to.

        The weights are the dense ones, except for SparseGPT, which updates the kept weights.
        """
        s = self.settings
        names = self.family.linears
        weight = {n: dense[n + ".weight"] for n in names}
        if s.init is InitMethod.MAGNITUDE:
            return weight, {n: prune.magnitude_mask(weight[n], s.sparsity, s.pattern, s.magnitude_per_matrix) for n in names}

        stats = Stats(hessian=s.init is InitMethod.SPARSEGPT)
        linear = stats.linear(dense)
        with torch.no_grad():
            for c in _chunks(hidden.shape[0], s.batch_size):
                self.arch.block_forward(hidden[c], dense, pos, linear)
        stats.samples = hidden.shape[0]
        if s.init is InitMethod.WANDA:
            masks = {n: prune.select(prune.wanda_scores(weight[n], stats.sq[n]), s.sparsity, s.pattern) for n in names}
            return weight, masks
        updated, masks = {}, {}
        for n in names:
            new, keep = prune.sparsegpt_prune(
                weight[n], stats.xtx[n], stats.samples, s.sparsity, s.pattern, s.sparsegpt_blocksize, s.sparsegpt_percdamp
            )
            updated[n], masks[n] = new.to(weight[n].dtype), keep
        return updated, masks

    # ---- the Barber rebuild ---------------------------------------------------------------------

    def _subblock(self, kind: str) -> tuple[Callable, Callable, Callable]:
        a = self.arch
        if kind == "attn":
            return a.attn_input, (lambda x, w, pos: a.attn_core(x, w, pos)), a.attn_residual
        return a.mlp_input, (lambda x, w, pos: a.mlp_core(x, w)), a.mlp_residual

    def _rebuild_subblock(
        self,
        kind: str,
        names: tuple[str, ...],
        dense: dict[str, torch.Tensor],
        init_weights: dict[str, torch.Tensor],
        weights: dict[str, torch.Tensor],
        masks: dict[str, torch.Tensor],
        hidden: torch.Tensor,
        pos: Positions,
    ) -> tuple[dict, dict[str, float]]:
        """Rebuild the masks of one sub-block in place (`weights`, `masks`) and advance `hidden`.

        `hidden` enters as the sub-block's residual input and leaves as its output (in place,
        sample by sample). Returns the sub-block report and its phase times.
        """
        s = self.settings
        inp, core, residual = self._subblock(kind)
        n_samples = hidden.shape[0]
        times = {}

        # Gradient pass: A = sum_n (dL_n/dW)^2 at the dense weights, float32, one sample at a time.
        t0 = time.perf_counter()
        own = [k for k in dense if k.rsplit(".", 1)[0] in names]  # the sub-block's weights and biases
        grad_w = {k: dense[k].detach().float() for k in own}  # detached: no grad flag leaks into `dense`
        params = {n: grad_w[n + ".weight"].requires_grad_(True) for n in names}
        sparse32 = {k: weights[k].float() for k in own}
        grad_sq = {n: torch.zeros_like(p) for n, p in params.items()}
        dense_out = torch.empty_like(hidden)
        loss_before = 0.0
        samples = range(n_samples)
        if self.progress:
            samples = tqdm(samples, desc=f"  {kind} gradients", leave=False, unit="sample")
        for j in samples:
            with torch.no_grad():
                x = inp(hidden[j : j + 1], weights).float()
                target = core(x, sparse32, pos)
            y = core(x, grad_w, pos)
            loss = F.mse_loss(y, target)
            grads = torch.autograd.grad(loss, list(params.values()))
            for n, g in zip(params, grads):
                grad_sq[n].addcmul_(g, g)
            dense_out[j : j + 1] = y.detach().to(hidden.dtype)
            loss_before += loss.item()
            del y, loss, grads
        del params, grad_w, sparse32
        times["gradient"] = time.perf_counter() - t0

        # Rebuild: score every weight, swap within the chosen groups, re-apply the masks.
        t0 = time.perf_counter()
        base = {}
        for n in names:
            w_dense = dense[n + ".weight"]
            base[n] = torch.where(masks[n], init_weights[n], w_dense) if s.retain_reconstruction else w_dense
        scores = {n: prune.rebuild_scores(base[n], grad_sq[n] / n_samples, s.metric) for n in names}
        new_masks = prune.rebuild(scores, {n: masks[n] for n in names}, s.ratio, s.granularity, s.pattern)
        swaps = {n: int((new_masks[n] & ~masks[n]).sum()) for n in names}
        for n in names:
            masks[n] = new_masks[n]
            weights[n + ".weight"] = prune.apply_mask(base[n], new_masks[n])
        times["rebuild"] = time.perf_counter() - t0

        # Advance the sparse trajectory through the rebuilt sub-block; measure the new loss.
        t0 = time.perf_counter()
        loss_after = 0.0
        with torch.no_grad():
            for j in range(n_samples):
                h = hidden[j : j + 1]
                y = core(inp(h, weights), weights, pos)
                loss_after += F.mse_loss(y.float(), dense_out[j : j + 1].float()).item()
                hidden[j : j + 1] = residual(h, y, weights)
        times["forward"] = time.perf_counter() - t0
        report = {
            "subblock": kind,
            "loss_before": loss_before / n_samples,
            "loss_after": loss_after / n_samples,
            "swaps": swaps,
        }
        return report, times
