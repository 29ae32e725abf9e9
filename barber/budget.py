"""Memory budgets for the streaming pruner: sizes, the shapes a plan needs, and the plan.

The pruner holds, at any time (perf.md §6):

- two hidden-state buffers [N, T, d] in the compute dtype: the sparse trajectory `h` and the dense
  sub-block outputs of the gradient pass (for the reported reconstruction loss);
- one block's weights: dense, masked copy and bool masks, plus (SparseGPT) updated weights and one
  X^T X per linear;
- during a sub-block's gradient pass: float32 copies of its dense and sparse weights (none when the
  compute dtype is float32), the float32 sum of squared per-sample gradients and its sample
  group's partial (`barber.fold`), one sample's squared gradient, and the activations of one
  micro-batch;
- the next block's tensors in their stored dtype, read by a background thread (prefetch);
- what the process held before the pruner started (interpreter, torch, tokenizer, ids).

`plan_memory` turns those shapes and the budgets (`--max-cpu-memory`, `--max-gpu-memory`; automatic
when absent) into a `MemoryPlan`: where the hidden states live (a `barber.buffers.Placement`:
``device``, on the compute device, GPU memory or plain RAM; ``host``, page-locked host RAM copied to
the GPU one micro-batch at a time; ``disk``, a file under the work directory, mapped and read one
micro-batch at a time, pages dropped after each use so they never accumulate in RSS), whether the
next block is prefetched, and the micro-batch (samples per forward/backward call). Cheaper savings
come first: the micro-batch shrinks to 1, then prefetch is dropped, then hidden states leave the
device (host, then disk). A budget the model cannot meet even then is a one-line `BudgetError`.

Estimates are upper bounds from the formulas above, not measurements; the report gives both the
plan's estimate and the peak reached. Nothing here changes the math: placement, prefetch and the
micro-batch never change a value (the sums have a fixed order, `barber.fold`).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from barber.buffers import Placement
from barber.errors import BudgetError
from barber.families import EMBED_KEYS
from barber.sysmem import available_memory, current_rss

if TYPE_CHECKING:
    from barber.checkpoint import Checkpoint

log = logging.getLogger(__name__)

#: Tokens per forward/backward call when the micro-batch is automatic, by device type.
AUTO_BATCH_TOKENS = {"cpu": 1024, "cuda": 8192}
#: Share of the memory available at start that an automatic CPU budget takes.
AUTO_CPU_FRACTION = 0.8
#: Automatic GPU budget: this share of the free GPU memory, capped at AUTO_GPU_CAP bytes. More buys
#: little (the micro-batch is compute-bound well below it) and leaves the GPU to others.
AUTO_GPU_FRACTION = 0.9
AUTO_GPU_CAP = 9 * 2**30
#: Safety factor on activation estimates (autograd temporaries, allocator rounding).
ACTIVATION_SLACK = 1.25
#: Factor on everything the pruner allocates (not on the process's base): heap fragmentation, kernel
#: workspaces, libraries loaded after the plan. At LLaMA-13B width on a CPU (4 x 128 tokens, float32)
#: the peak RSS of 2-8 blocks was 1.06-1.16 x the unscaled estimate (three runs, a shared machine).
OVERHEAD = 1.20
#: The same for GPU memory: max_memory_allocated counts live tensors only (no fragmentation), so a
#: smaller margin for kernel workspaces (cuBLAS, attention). Not measured yet.
GPU_OVERHEAD = 1.05

_UNITS = {
    "": 1, "b": 1,
    "k": 2**10, "kb": 10**3, "kib": 2**10,
    "m": 2**20, "mb": 10**6, "mib": 2**20,
    "g": 2**30, "gb": 10**9, "gib": 2**30,
    "t": 2**40, "tb": 10**12, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str) -> int:
    """A size such as ``6GiB``, ``500MiB``, ``1.5G``, ``6GB`` or ``123456`` (bytes) -> bytes.

    KiB/MiB/GiB/TiB and the one-letter K/M/G/T are powers of 1024; KB/MB/GB/TB are powers of 1000.

    Raises:
        ValueError: not a positive size with a known unit (the message is one line).
    """
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 6GiB, 500MiB, 8GB or a number of bytes)")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"a memory budget must be positive, got {text!r}")
    return value


def format_bytes(n: float) -> str:
    """Bytes as a short human string in GiB or MiB."""
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class MemoryBudget:
    """What the user asked for: byte budgets (None = automatic) and an optional forced placement."""

    cpu: int | None = None
    gpu: int | None = None
    hidden: Placement | str = "auto"  # auto, or a Placement (its value is accepted, "pinned" as host)
    prefetch: bool = True  # allow the background read of the next block

    def __post_init__(self) -> None:
        if self.hidden == "auto":
            return
        try:
            object.__setattr__(self, "hidden", Placement(self.hidden))
        except ValueError:
            names = tuple(p.value for p in Placement)
            raise ValueError(f"hidden placement must be auto or one of {names}, got {self.hidden!r}") from None


@dataclass(frozen=True)
class ModelShapes:
    """The sizes the plan needs, in elements (see `model_shapes`)."""

    hidden: int  # d
    block_numel: int  # every tensor of one block
    block_stored_bytes: int  # one block as stored in the checkpoint
    linears: dict[str, tuple[int, int]]  # block-local linear name -> (out, in)
    attn: tuple[str, ...]
    mlp: tuple[str, ...]
    embed_numel: int  # the tensors `start` reads (embedding, positions, projection)
    score_heads: int = 0  # heads whose [T, T] scores are materialised (Gemma 2's soft-capped attention), else 0
    mlp_width: int = 0  # MLP activation width per token (a mixture of experts: top-k routed + shared); 0: widest
    one_window: bool = False  # one calibration window per call (a mixture of experts: see barber.moe)


def model_shapes(ckpt: Checkpoint) -> ModelShapes:
    """The plan's shape summary of an opened `barber.checkpoint.Checkpoint` (headers only)."""
    fam = ckpt.family
    shapes = fam.block_shapes(ckpt.config)
    linears = {n: tuple(shapes[n + ".weight"]) for n in fam.linears}
    stored = sum(math.prod(s) * ckpt.info(ckpt.block_tensor_name(0, k)).dtype.itemsize for k, s in shapes.items())
    globals_ = fam.global_tensors(ckpt.config)
    embed = sum(math.prod(globals_[k][1]) for k in EMBED_KEYS if k in globals_)
    return ModelShapes(
        hidden=ckpt.config.hidden_size,
        block_numel=sum(math.prod(s) for s in shapes.values()),
        block_stored_bytes=stored,
        linears=linears,
        attn=tuple(fam.attn_linears),
        mlp=tuple(fam.mlp_linears),
        embed_numel=embed,
        score_heads=ckpt.config.num_heads if fam.attn_softcapping and ckpt.config.attn_logit_softcapping else 0,
        mlp_width=_moe_width(ckpt.config) if fam.moe else 0,
        one_window=fam.moe is not None,
    )


def _moe_width(cfg) -> int:
    """Per token, the widths of the experts it runs: its top-k routed experts and the shared one."""
    return cfg.experts_per_token * cfg.moe_intermediate_size + cfg.shared_expert_intermediate_size


@dataclass(frozen=True)
class MemoryPlan:
    """Where things live and how big each step is, with the byte estimates behind the choice."""

    device: str  # the compute device type: cpu or cuda
    hidden_placement: Placement
    micro_batch: int  # samples per forward/backward call
    prefetch: bool  # the next block is read while this one computes
    cpu_budget: int
    cpu_budget_source: str  # given or auto
    gpu_budget: int | None
    gpu_budget_source: str | None
    estimates: dict[str, int]  # named byte estimates; peak_cpu and peak_gpu are the totals

    def describe(self) -> dict:
        """JSON-ready description for the run report."""
        return asdict(self)

    def summary(self) -> str:
        """One line for logs."""
        est = self.estimates
        gpu = f", GPU {format_bytes(est['peak_gpu'])} of {format_bytes(self.gpu_budget)}" if self.gpu_budget else ""
        return (
            f"memory plan: hidden states on {self.hidden_placement}, micro-batch {self.micro_batch}, "
            f"prefetch {'on' if self.prefetch else 'off'}; estimated peak RSS {format_bytes(est['peak_cpu'])} "
            f"of {format_bytes(self.cpu_budget)}{gpu}"
        )


def _per_sample_activation_bytes(sh: ModelShapes, seqlen: int, compute_bytes: int) -> int:
    """Peak activation bytes per sample: the float32 gradient pass or a compute-dtype forward.

    Gradient pass, attention: x, q, k, v, rotated q and k, attention output, output, target and
    their output gradients, about 16 values of width d per token. MLP: x, output, target and their
    gradients (4 of width d) and gate, up, act(gate), inner and their gradients (8 of width f).
    Soft-capped attention (no fused kernel) adds its [heads, T, T] scores: raw, capped, probabilities
    and a gradient, 4 float32 values per entry.
    """
    d = sh.hidden
    f = sh.mlp_width or max((max(sh.linears[n]) for n in sh.mlp), default=d)
    scores = 4 * 4 * sh.score_heads * seqlen * seqlen
    grad = 4 * seqlen * max(16 * d, 4 * d + 8 * f) + scores
    forward = compute_bytes * seqlen * (6 * d + 4 * f) + 4 * seqlen * 2 * max(d, f) + scores  # + float32 statistics
    return int(ACTIVATION_SLACK * max(grad, forward))


def _block_bytes(sh: ModelShapes, compute_bytes: int, sparsegpt: bool, rebuild: bool = True) -> dict[str, int]:
    """Byte estimates of one block on the compute device (resident and per-phase transients)."""
    c = compute_bytes
    numel = {n: o * i for n, (o, i) in sh.linears.items()}
    lin = sum(numel.values())
    resident = sh.block_numel * c + lin * c + lin  # dense, masked copy, bool masks
    if sparsegpt:
        # updated weights, X^T X (once per input; counted per linear, which covers the sums' group partials)
        resident += lin * c + sum(4 * i * i for _, i in sh.linears.values())
    largest = max(numel.values())
    # Initial selection: the float32 score of one linear and the selector's scratch (about 2x).
    select = 3 * 4 * largest
    gradient = rebuild_peak = 0
    freed = 0  # dense (and SparseGPT's updated) weights of the sub-blocks already rebuilt
    for names in (sh.attn, sh.mlp):
        sub = sum(numel[n] for n in names)
        big = max(numel[n] for n in names)
        copies = 0 if c == 4 else 4 * sub + 4 * big  # float32 dense copies; one sparse linear converted at a time
        # Per linear the order-fixed sum of squared gradients and its group's partial (barber.fold), and one
        # sample's squared gradient at a time.
        gradient = max(gradient, copies + 2 * 4 * sub + 4 * big - freed)
        # Scores (A dropped as scored), new masks and scoring scratch, less the masked weights dropped meanwhile.
        rebuild_peak = max(rebuild_peak, 4 * sub + sub + 3 * 4 * big - freed - sub * c)
        freed += sub * c * (2 if sparsegpt else 1)
    if not rebuild:  # no gradient pass, no rebuild
        gradient = rebuild_peak = 0
    return {"block_resident": resident, "select": select, "gradient_pass": gradient, "rebuild": rebuild_peak}


def _auto_cpu_budget() -> int:
    """AUTO_CPU_FRACTION of what this process holds plus what the system could still give it."""
    return int(AUTO_CPU_FRACTION * (available_memory() + current_rss()))


def _auto_gpu_budget(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return int(min(AUTO_GPU_FRACTION * (free + torch.cuda.memory_allocated(device)), AUTO_GPU_CAP))


def _budgets(
    budget: MemoryBudget, device: str, cpu_auto: int | None, gpu_auto: int | None
) -> tuple[int, str, int | None, str | None]:
    """(CPU budget, its source, GPU budget, its source): given, else `*_auto`, else measured; no GPU on a CPU run."""
    cpu_source = "given" if budget.cpu is not None else "auto"
    cpu = budget.cpu if budget.cpu is not None else (cpu_auto if cpu_auto is not None else _auto_cpu_budget())
    if torch.device(device).type != "cuda":
        return cpu, cpu_source, None, None
    gpu_source = "given" if budget.gpu is not None else "auto"
    gpu = budget.gpu if budget.gpu is not None else (
        gpu_auto if gpu_auto is not None else _auto_gpu_budget(torch.device(device))
    )
    return cpu, cpu_source, gpu, gpu_source


@dataclass(frozen=True)
class _Sizes:
    """What every estimate of one `plan_memory` call shares (bytes unless named otherwise)."""

    shapes: ModelShapes
    seqlen: int
    compute_bytes: int  # per element
    sparsegpt: bool
    on_gpu: bool
    rebuild: bool
    base_rss: int
    extra_block: int  # a step beyond the rebuild at its peak (the re-fit), on top of every phase
    per_sample: int  # activations of one sample
    hidden_all: int  # the trajectory and the gradient pass's dense outputs
    embed: int  # the tensors of the embedding phase


def _estimate(z: _Sizes, placement: Placement, prefetch: bool, mb: int) -> dict[str, int]:
    """Named byte estimates of one configuration; peak_cpu (and on a GPU run peak_gpu) are the totals."""
    sh, c = z.shapes, z.compute_bytes
    block = _block_bytes(sh, c, z.sparsegpt, z.rebuild)
    work = block["block_resident"] + max(block["select"], block["gradient_pass"], block["rebuild"]) + z.extra_block
    staging = 2 * mb * z.seqlen * sh.hidden * c  # one micro-batch read from / written to a buffer
    prefetch_bytes = sh.block_stored_bytes if prefetch else 0
    device_hidden = z.hidden_all if placement == Placement.DEVICE else staging
    host_hidden = {Placement.DEVICE: 0, Placement.HOST: z.hidden_all, Placement.DISK: staging}[placement]
    acts = mb * z.per_sample
    compute = work + acts + device_hidden
    start = z.embed + device_hidden  # the embedding phase: embedding table and hidden states
    est = {
        "base_rss": z.base_rss,
        "hidden_states": z.hidden_all,
        "embedding": z.embed,
        "activations_per_sample": z.per_sample,
        "activations": acts,
        "prefetch": prefetch_bytes,
        **block,
        "reconstruct": z.extra_block,
    }
    if z.on_gpu:
        est["peak_gpu"] = int(GPU_OVERHEAD * max(compute, start))
        est["peak_cpu"] = z.base_rss + int(OVERHEAD * (prefetch_bytes + host_hidden + sh.block_stored_bytes))
    else:
        est["peak_cpu"] = z.base_rss + int(OVERHEAD * (prefetch_bytes + host_hidden + max(compute, start)))
    return est


def _candidates(budget: MemoryBudget, on_gpu: bool) -> list[tuple[Placement, bool]]:
    """(placement, prefetch) in the order tried: cheaper savings first."""
    if budget.hidden != "auto":
        placements = [Placement(budget.hidden)]
    else:
        placements = (
            [Placement.DEVICE, Placement.HOST, Placement.DISK] if on_gpu else [Placement.DEVICE, Placement.DISK]
        )
    if not on_gpu:  # host RAM is just RAM on a CPU run
        placements = [Placement.DEVICE if p is Placement.HOST else p for p in placements]
    prefetches = [True, False] if budget.prefetch else [False]
    return [(p, f) for p in placements for f in prefetches]


def plan_memory(
    sh: ModelShapes,
    *,
    nsamples: int,
    seqlen: int,
    compute_dtype: torch.dtype,
    device: str,
    budget: MemoryBudget,
    batch_size: int = 0,
    sparsegpt: bool = False,
    rebuild: bool = True,
    base_rss: int = 0,
    extra_block_bytes: int = 0,
    cpu_budget: int | None = None,
    gpu_budget: int | None = None,
) -> MemoryPlan:
    """Choose hidden-state placement, prefetch and micro-batch for the budgets (long: its documented arguments).

    Args:
        sh: `model_shapes(ckpt)`.
        nsamples, seqlen: the calibration windows.
        compute_dtype: dtype of forwards, weights and hidden states.
        device: the compute device (cpu, cuda, cuda:N).
        budget: the user's budgets (None = automatic) and forced placement.
        batch_size: samples per call asked for (0 = automatic: AUTO_BATCH_TOKENS tokens); the
            plan may lower it to fit the budget, never raise it. A mixture of experts
            (`ModelShapes.one_window`) always runs one window per call.
        sparsegpt: the initial method keeps X^T X and updated weights.
        rebuild: the run has the gradient pass and the rebuild (without them, their peaks are not counted).
        base_rss: what the process holds already (RSS before the pruner allocates).
        extra_block_bytes: what a step beyond the rebuild holds on the compute device at its peak
            (the re-fit: `barber.reconstruct.plan_bytes`), counted on top of every phase.
        cpu_budget, gpu_budget: the automatic budgets to use when `budget` leaves them open
            (default: measured, see AUTO_CPU_FRACTION and AUTO_GPU_FRACTION).

    Raises:
        BudgetError: even the smallest configuration does not fit.
    """
    kind = torch.device(device).type
    on_gpu = kind == "cuda"
    c = compute_dtype.itemsize
    cpu, cpu_source, gpu, gpu_source = _budgets(budget, device, cpu_budget, gpu_budget)
    z = _Sizes(
        shapes=sh, seqlen=seqlen, compute_bytes=c, sparsegpt=sparsegpt, on_gpu=on_gpu, rebuild=rebuild,
        base_rss=base_rss,
        extra_block=extra_block_bytes,
        per_sample=_per_sample_activation_bytes(sh, seqlen, c),
        hidden_all=2 * nsamples * seqlen * sh.hidden * c,
        embed=sh.embed_numel * c,
    )
    wanted = batch_size if batch_size > 0 else max(1, AUTO_BATCH_TOKENS.get(kind, 4096) // seqlen)
    wanted = 1 if sh.one_window else min(wanted, nsamples)
    candidates = _candidates(budget, on_gpu)
    for placement, prefetch in candidates:
        for mb in range(wanted, 0, -1) if wanted <= 64 else _halving(wanted):
            est = _estimate(z, placement, prefetch, mb)
            if est["peak_cpu"] <= cpu and (not on_gpu or est["peak_gpu"] <= gpu):
                plan = MemoryPlan(
                    kind, placement, mb, prefetch, cpu, cpu_source, gpu, gpu_source, est
                )
                log.info("%s", plan.summary())
                return plan
    smallest = _estimate(z, candidates[-1][0], False, 1)
    need = f"RSS {format_bytes(smallest['peak_cpu'])} (budget {format_bytes(cpu)})"
    if on_gpu:
        need += f" and GPU {format_bytes(smallest['peak_gpu'])} (budget {format_bytes(gpu)})"
    raise BudgetError(
        f"the memory budget is too small: even with hidden states on {candidates[-1][0]}, no prefetch and "
        f"micro-batch 1, pruning this model needs about {need}"
    )


def _halving(n: int):
    """n, then halves down to 1 (a coarse search for large automatic micro-batches)."""
    while n > 1:
        yield n
        n = n // 2
    yield 1
