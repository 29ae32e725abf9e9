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


#: Tokens per forward/backward call when the batch size is automatic.
AUTO_BATCH_TOKENS = 4096
#: Bound on the per-sample weight gradients held at once in the gradient pass.
GRAD_CHUNK_BYTES = 256 * 2**20


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
    batch_size: int = 0  # samples per forward/backward call; 0 = about AUTO_BATCH_TOKENS tokens

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


def _per_sample_grad_sq(
    core: Callable,
    x: torch.Tensor,
    target: torch.Tensor,
    weights: dict[str, torch.Tensor],
    pos: Positions,
    names: tuple[str, ...],
    grad_sq: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add sum_n (dL_n/dW)^2 of every linear in `names` to `grad_sq`, for a batch of samples.

    L_n is the mean squared error of sample n's sub-block output at `weights` against its
    target. One batched forward and backward give each linear's per-sample output gradient
    delta_n; the per-sample weight gradient is delta_n^T x_n (x_n the linear's input), so
    no weight gradient summed over samples is ever formed and inputs need no gradient.

    Returns:
        (the sub-block output at `weights` [B, T, d], detached; the per-sample losses [B]).
    """
    leaves = {n: weights[n + ".weight"].detach().requires_grad_(True) for n in names}
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def linear(name: str, xin: torch.Tensor) -> torch.Tensor:
        w = leaves.get(name, weights.get(name + ".weight"))
        y = F.linear(xin, w, weights.get(name + ".bias"))
        if name in leaves:
            inputs[name], outputs[name] = xin.detach(), y
        return y

    y = core(x, weights, pos, linear)
    losses = ((y - target) ** 2).mean(dim=(1, 2))
    deltas = torch.autograd.grad(losses.sum(), [outputs[n] for n in names])
    for n, delta in zip(names, deltas):
        xin = inputs[n]
        delta_t = delta.reshape(delta.shape[0], -1, delta.shape[-1]).transpose(1, 2)  # [B, out, T]
        xin = xin.reshape(xin.shape[0], -1, xin.shape[-1])  # [B, T, in]
        step = max(1, GRAD_CHUNK_BYTES // (grad_sq[n].numel() * 4))
        for b in range(0, x.shape[0], step):
            g = torch.bmm(delta_t[b : b + step], xin[b : b + step])  # per-sample weight gradients
            grad_sq[n].add_(g.square_().sum(0))
    return y.detach(), losses.detach()


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

    def _chunk(self, batch: torch.Tensor) -> int:
        """Samples per forward call: `batch_size`, or (0 = auto) about `AUTO_BATCH_TOKENS` tokens."""
        if self.settings.batch_size > 0:
            return self.settings.batch_size
        return max(1, AUTO_BATCH_TOKENS // batch.shape[1])

    # ---- the loop ----------------------------------------------------------------------------

    def start(self, calib_ids: torch.Tensor) -> BlockState:
        """Embed the calibration windows [N, T]: the state before block 0."""
        s = self.settings
        w = self.ckpt.embedding_weights(dtype=s.dtype, device=s.device)
        ids = calib_ids.to(s.device)
        hidden = torch.cat([self.arch.embed(ids[c], w) for c in _chunks(ids.shape[0], self._chunk(ids))])
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
            advance_hidden(self.arch, hidden, weights, pos, chunk_size=self._chunk(hidden))
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
            for c in _chunks(hidden.shape[0], self._chunk(hidden)):
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
            return a.attn_input, (lambda x, w, pos, linear=None: a.attn_core(x, w, pos, linear)), a.attn_residual
        return a.mlp_input, (lambda x, w, pos, linear=None: a.mlp_core(x, w, linear)), a.mlp_residual

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

        # Gradient pass: A = sum_n (dL_n/dW)^2 at the dense weights, in float32.
        t0 = time.perf_counter()
        own = [k for k in dense if k.rsplit(".", 1)[0] in names]  # the sub-block's weights and biases
        dense32 = {k: dense[k].detach().float() for k in own}  # detached: no grad flag leaks into `dense`
        sparse32 = {k: weights[k].float() for k in own}
        grad_sq = {n: torch.zeros_like(dense32[n + ".weight"]) for n in names}
        dense_out = torch.empty_like(hidden)
        loss_before = 0.0
        chunks = _chunks(n_samples, self._chunk(hidden))
        bar = tqdm(total=n_samples, desc=f"  {kind} gradients", leave=False, unit="sample", disable=not self.progress)
        for c in chunks:
            with torch.no_grad():
                x = inp(hidden[c], weights).float()
                target = core(x, sparse32, pos)
            y, losses = _per_sample_grad_sq(core, x, target, dense32, pos, names, grad_sq)
            dense_out[c] = y.to(hidden.dtype)
            loss_before += float(losses.sum())
            bar.update(c.stop - c.start)
        bar.close()
        del dense32, sparse32
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
            for c in chunks:
                h = hidden[c]
                y = core(inp(h, weights), weights, pos)
                loss_after += float(((y.float() - dense_out[c].float()) ** 2).mean(dim=(1, 2)).sum())
                hidden[c] = residual(h, y, weights)
        times["forward"] = time.perf_counter() - t0
        report = {
            "subblock": kind,
            "loss_before": loss_before / n_samples,
            "loss_after": loss_after / n_samples,
            "swaps": swaps,
        }
        return report, times
