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

Memory (`barber.memory`): a `MemoryPlan`, made from the shapes and the budgets when the
calibration size is known, says where `h` (and the gradient pass's dense outputs, the same
size) live: on the compute device, in pinned host memory, or in a mapped file of the work
directory, read and written one micro-batch at a time; how many samples each forward and
backward call takes (the micro-batch); and whether the next block is read by a background
thread while this one computes. Placement and prefetch never change a value.

Precision: forwards, weights and `h` use `PruneSettings.dtype` (bfloat16 is the safe
reduced choice: the float32 range, so no overflow of large residual activations; float16
can overflow on models with activation outliers). Norms run in float32 whatever the dtype,
Wanda/SparseGPT statistics are accumulated in float32, and the whole gradient pass (weights,
activations, per-sample gradients, their squared sum) and every selection score are float32.
On a GPU, `allow_tf32` lets float32 matmuls (the gradient pass; float32 forwards) use TF32
tensor cores: about 10 mantissa bits per product instead of 23, so gradients, hence scores
near a selection threshold, and so a few mask entries, can change. Its effect on the masks
has not been measured yet (no GPU run); off by default.

Everything that defines a block's work is in `BlockState` (block index, hidden states,
report so far), so a later resume can restart the loop at any block boundary.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from barber import prune
from barber.budget import AUTO_BATCH_TOKENS, GRAD_CHUNK_BYTES, MemoryBudget, MemoryPlan, model_shapes, plan_memory
from barber.buffers import HiddenBuffer
from barber.checkpoint import BlockPrefetcher, Checkpoint
from barber.model import Arch, Positions
from barber.prune import Granularity, InitMethod, Metric, Pattern
from barber.sysmem import current_rss, peak_rss, release_free_memory

log = logging.getLogger(__name__)

__all__ = ["AUTO_BATCH_TOKENS", "GRAD_CHUNK_BYTES", "BlockState", "PruneSettings", "Pruner", "default_rebuild"]


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
    batch_size: int = 0  # samples per forward/backward call; 0 = about AUTO_BATCH_TOKENS tokens, within budget
    allow_tf32: bool = False  # let float32 matmuls on a GPU use TF32 (see the module docstring)

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
    hidden: HiddenBuffer  # [N, T, d], sparse trajectory entering block `next_block`
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
    chunk_bytes: int = GRAD_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add sum_n (dL_n/dW)^2 of every linear in `names` to `grad_sq`, for a batch of samples.

    L_n is the mean squared error of sample n's sub-block output at `weights` against its
    target. One batched forward and backward give each linear's per-sample output gradient
    delta_n; the per-sample weight gradient is delta_n^T x_n (x_n the linear's input), so
    no weight gradient summed over samples is ever formed and inputs need no gradient.
    At most `chunk_bytes` of per-sample gradients (at least one sample's) exist at once.

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
        step = max(1, chunk_bytes // (grad_sq[n].numel() * 4))
        for b in range(0, x.shape[0], step):
            g = torch.bmm(delta_t[b : b + step], xin[b : b + step]).square_()  # squared per-sample gradients
            grad_sq[n].add_(g[0] if g.shape[0] == 1 else g.sum(0))  # a sum over one sample is that sample, exactly
    return y.detach(), losses.detach()


def _on(tensor: torch.Tensor, device: str) -> bool:
    """Whether `tensor` lives on `device` ("cuda" matches the current GPU)."""
    want = torch.device(device)
    if tensor.device.type != want.type:
        return False
    if want.type == "cuda" and want.index is None:
        return tensor.device.index == torch.cuda.current_device()
    return want.index is None or tensor.device.index == want.index


def _mask_stats(mask: torch.Tensor) -> dict:
    """A kept mask's report entry: shape, kept count, sparsity, and the least and most sparse row
    (equal after a row rebuild; column, layer and block rebuilds keep only their group's count)."""
    rows, cols = mask.shape
    per_row = mask.sum(dim=1)
    return {
        "shape": [rows, cols],
        "kept": int(per_row.sum()),
        "sparsity": 1 - mask.float().mean().item(),
        "row_sparsity": [1 - int(per_row.max()) / cols, 1 - int(per_row.min()) / cols],
    }


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


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


class Pruner:
    """Prunes a checkpoint block by block. See the module docstring for the data flow.

    Args:
        ckpt: the opened input checkpoint.
        settings: what to prune and how.
        progress: show tqdm bars (over blocks, and over samples in the gradient pass).
        budget: memory budgets and forced choices (default: automatic, see `barber.memory`).
        work_dir: where disk-backed hidden states go (default: the system's temporary directory).
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        settings: PruneSettings,
        progress: bool = True,
        *,
        budget: MemoryBudget | None = None,
        work_dir: Path | None = None,
    ):
        self.ckpt = ckpt
        self.settings = settings
        self.arch = Arch.from_checkpoint(ckpt)
        self.family = ckpt.family
        self.progress = progress
        self.budget = budget or MemoryBudget()
        self.work_dir = work_dir
        self.plan: MemoryPlan | None = None
        self._prefetch: BlockPrefetcher | None = None
        self._hidden: HiddenBuffer | None = None  # the trajectory h
        self._scratch: HiddenBuffer | None = None  # the gradient pass's dense sub-block outputs

    # ---- memory -------------------------------------------------------------------------------

    def plan_for(self, nsamples: int, seqlen: int) -> MemoryPlan:
        """Make (once) and return the memory plan for `nsamples` windows of `seqlen` tokens."""
        if self.plan is None:
            s = self.settings
            self.plan = plan_memory(
                model_shapes(self.ckpt), nsamples=nsamples, seqlen=seqlen, compute_dtype=s.dtype, device=s.device,
                budget=self.budget, batch_size=s.batch_size, sparsegpt=s.init is InitMethod.SPARSEGPT,
                base_rss=current_rss(),
            )
            self._prefetch = BlockPrefetcher(self.ckpt, enabled=self.plan.prefetch)
        return self.plan

    def _buffer(self, name: str, shape: tuple[int, ...]) -> HiddenBuffer:
        """A planned buffer of hidden-state shape in the compute dtype (disk: `work_dir/<name>.bin`)."""
        s, plan = self.settings, self.plan_for(shape[0], shape[1])
        path = None
        if plan.hidden_placement == "disk":
            root = self.work_dir if self.work_dir is not None else Path(tempfile.gettempdir())
            path = root / f"{name}-{id(self):x}.bin"
        return HiddenBuffer.allocate(shape, s.dtype, plan.hidden_placement, s.device, path)

    def _adopt(self, hidden: HiddenBuffer) -> HiddenBuffer:
        """The planned buffer holding `hidden` (a state from `start`, a previous block or a resume)."""
        if hidden is self._hidden:
            return hidden
        s, plan = self.settings, self.plan_for(hidden.shape[0], hidden.shape[1])
        t = hidden.tensor
        if plan.hidden_placement == "device" and hidden.placement == "device" and _on(t, s.device) and t.dtype == s.dtype:
            self._hidden = HiddenBuffer(t, "device", torch.device(s.device))
        else:
            self._hidden = self._buffer("hidden", tuple(hidden.shape))
            for c in _chunks(hidden.shape[0], plan.micro_batch):
                self._hidden.put(c, hidden.get(c))
        return self._hidden

    def release(self) -> None:
        """Stop the prefetch thread and drop the scratch buffer (hidden states stay with the state)."""
        if self._prefetch is not None:
            self._prefetch.close()
        for buf in (self._scratch, self._hidden):
            if buf is not None:
                buf.close()  # a disk buffer's file goes; a mapping in use stays valid
        self._scratch = self._hidden = None

    def memory_report(self) -> dict:
        """The plan chosen and the peaks reached so far (RSS; GPU max allocated on a GPU run)."""
        out = {"plan": self.plan.describe() if self.plan else None, "peak_rss": peak_rss()}
        if torch.device(self.settings.device).type == "cuda":
            out["peak_gpu_allocated"] = torch.cuda.max_memory_allocated()
            out["peak_gpu_reserved"] = torch.cuda.max_memory_reserved()
        return out

    # ---- the loop ----------------------------------------------------------------------------

    def start(self, calib_ids: torch.Tensor) -> BlockState:
        """Embed the calibration windows [N, T]: the state before block 0."""
        s = self.settings
        plan = self.plan_for(calib_ids.shape[0], calib_ids.shape[1])
        self._prefetch.ahead(0)
        w = self.ckpt.embedding_weights(dtype=s.dtype, device=s.device)
        hidden = self._buffer("hidden", (calib_ids.shape[0], calib_ids.shape[1], self.ckpt.config.hidden_size))
        for c in _chunks(calib_ids.shape[0], plan.micro_batch):
            hidden.put(c, self.arch.embed(calib_ids[c].to(s.device), w))
        self._hidden = hidden
        del w
        release_free_memory()
        return BlockState(0, hidden)

    def _read_block(self, i: int) -> dict[str, torch.Tensor]:
        """Block i's tensors in the compute dtype on the device, and start reading block i + 1."""
        s = self.settings
        raw = self._prefetch.take(i)
        dense = {k: v.to(device=s.device, dtype=s.dtype) for k, v in raw.items()}
        del raw
        self._prefetch.ahead(i + 1)
        return dense

    def run_block(self, state: BlockState, write: Callable[[int, dict[str, torch.Tensor]], None]) -> BlockState:
        """Prune block `state.next_block`, hand its pruned linears to `write`, return the next state."""
        s = self.settings
        i = state.next_block
        hidden = self._adopt(state.hidden)
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        dense = self._read_block(i)
        pos = self.arch.positions(hidden.shape[1], device=s.device)
        times["read"] = time.perf_counter() - t0
        with _matmul_precision(s.device, s.allow_tf32):
            report = self._prune_block(i, dense, hidden, pos, write, times)
        del dense
        release_free_memory()
        if i + 1 >= self.ckpt.num_layers:
            self.release()  # a disk buffer's file goes; its mapping stays valid while `hidden` lives
        return BlockState(i + 1, hidden, state.blocks + [report])

    def _prune_block(
        self,
        i: int,
        dense: dict[str, torch.Tensor],
        hidden: HiddenBuffer,
        pos: Positions,
        write: Callable[[int, dict[str, torch.Tensor]], None],
        times: dict[str, float],
    ) -> dict:
        """Initial masks, rebuild, advance `hidden`, write: block i's report."""
        s = self.settings
        init_weights, masks = self._initial(dense, hidden, pos, times)

        subblocks = []
        weights = dict(dense)
        weights.update({n + ".weight": prune.apply_mask(init_weights[n], masks[n]) for n in self.family.linears})
        if s.rebuild:
            for kind, names in (("attn", self.family.attn_linears), ("mlp", self.family.mlp_linears)):
                report, times_sub = self._rebuild_subblock(kind, names, dense, init_weights, weights, masks, hidden, pos)
                subblocks.append(report)
                for k, v in times_sub.items():
                    times[k] = times.get(k, 0.0) + v
                for n in names:  # past its rebuild, a sub-block needs only its pruned weights and masks
                    dense.pop(n + ".weight")
                    init_weights.pop(n)
        else:
            t0 = time.perf_counter()
            with torch.no_grad():
                for c in _chunks(hidden.shape[0], self.plan.micro_batch):
                    hidden.put(c, self.arch.block_forward(hidden.get(c), weights, pos))
            times["forward"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        pruned = {n: weights[n + ".weight"] for n in self.family.linears}
        write(i, pruned)
        times["write"] = time.perf_counter() - t0
        layers = {n: _mask_stats(masks[n]) for n in self.family.linears}
        report = {"block": i, "layers": layers, "subblocks": subblocks, "seconds": times, "peak_rss": peak_rss()}
        if torch.device(s.device).type == "cuda":
            report["peak_gpu"] = torch.cuda.max_memory_allocated()
        return report

    # ---- initial masks --------------------------------------------------------------------------

    def _initial(
        self, dense: dict[str, torch.Tensor], hidden: HiddenBuffer, pos: Positions, times: dict[str, float]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Initial masks of every linear (name -> kept mask) and the weights they apply to.

        The weights are the dense ones, except for SparseGPT, which updates the kept weights.
        Records the statistics forward as `times["stats"]` and the selection as `times["select"]`.
        """
        s = self.settings
        names = self.family.linears
        weight = {n: dense[n + ".weight"] for n in names}
        t0 = time.perf_counter()
        if s.init is InitMethod.MAGNITUDE:
            masks = {n: prune.magnitude_mask(weight[n], s.sparsity, s.pattern, s.magnitude_per_matrix) for n in names}
            times["stats"], times["select"] = 0.0, time.perf_counter() - t0
            return weight, masks

        stats = Stats(hessian=s.init is InitMethod.SPARSEGPT)
        linear = stats.linear(dense)
        with torch.no_grad():
            for c in _chunks(hidden.shape[0], self.plan.micro_batch):
                self.arch.block_forward(hidden.get(c), dense, pos, linear)
        stats.samples = hidden.shape[0]
        times["stats"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if s.init is InitMethod.WANDA:
            masks = {n: prune.select(prune.wanda_scores(weight[n], stats.sq[n]), s.sparsity, s.pattern) for n in names}
            times["select"] = time.perf_counter() - t0
            return weight, masks
        updated, masks = {}, {}
        for n in names:
            new, keep = prune.sparsegpt_prune(
                weight[n], stats.xtx[n], stats.samples, s.sparsity, s.pattern, s.sparsegpt_blocksize, s.sparsegpt_percdamp
            )
            updated[n], masks[n] = new.to(weight[n].dtype), keep
        times["select"] = time.perf_counter() - t0
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
        hidden: HiddenBuffer,
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
        if self._scratch is None or self._scratch.shape != hidden.shape:
            self._scratch = self._buffer("dense-out", tuple(hidden.shape))
        dense_out = self._scratch
        loss_before = 0.0
        chunks = _chunks(n_samples, self.plan.micro_batch)
        bar = tqdm(total=n_samples, desc=f"  {kind} gradients", leave=False, unit="sample", disable=not self.progress)
        for c in chunks:
            with torch.no_grad():
                x = inp(hidden.get(c), weights).float()
                target = core(x, sparse32, pos)
            y, losses = _per_sample_grad_sq(core, x, target, dense32, pos, names, grad_sq, self.plan.grad_chunk_bytes)
            dense_out.put(c, y.to(s.dtype))
            loss_before += float(losses.sum())
            bar.update(c.stop - c.start)
        bar.close()
        del dense32, sparse32
        for n in names:  # the masked weights are rebuilt below; dropping them now bounds the rebuild's peak
            del weights[n + ".weight"]
        times["gradient"] = time.perf_counter() - t0

        # Rebuild: score every weight, swap within the chosen groups, re-apply the masks.
        t0 = time.perf_counter()
        base = {}
        for n in names:
            w_dense = dense[n + ".weight"]
            base[n] = torch.where(masks[n], init_weights[n], w_dense) if s.retain_reconstruction else w_dense
        scores = {}
        for n in names:  # each A is dropped once scored: A and the scores of a sub-block never coexist whole
            scores[n] = prune.rebuild_scores(base[n], grad_sq.pop(n).div_(n_samples), s.metric)
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
                h = hidden.get(c)
                y = core(inp(h, weights), weights, pos)
                loss_after += float(((y.float() - dense_out.get(c).float()) ** 2).mean(dim=(1, 2)).sum())
                hidden.put(c, residual(h, y, weights))
        times["forward"] = time.perf_counter() - t0
        report = {
            "subblock": kind,
            "loss_before": loss_before / n_samples,
            "loss_after": loss_after / n_samples,
            "swaps": swaps,
        }
        return report, times
