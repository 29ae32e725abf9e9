"""Memory budgets for the streaming pruner: the plan, hidden-state placement, block prefetch.

The pruner holds, at any time (perf.md §6):

- two hidden-state buffers [N, T, d] in the compute dtype: the sparse trajectory `h` and the dense
  sub-block outputs of the gradient pass (for the reported reconstruction loss);
- one block's weights: dense, masked copy and bool masks, plus (SparseGPT) updated weights and one
  X^T X per linear;
- during a sub-block's gradient pass: float32 copies of its dense and sparse weights (none when the
  compute dtype is float32), the float32 sum of squared per-sample gradients, one chunk of
  per-sample gradients, and the activations of one micro-batch;
- the next block's tensors in their stored dtype, read by a background thread (prefetch);
- what the process held before the pruner started (interpreter, torch, tokenizer, ids).

`plan_memory` turns those shapes and the budgets (`--max-cpu-memory`, `--max-gpu-memory`; automatic
when absent) into a `MemoryPlan`: where the hidden states live (``device``: on the compute device,
GPU memory or plain RAM; ``pinned``: page-locked host RAM, copied to the GPU one micro-batch at a
time; ``disk``: a file under the work directory, mapped and read one micro-batch at a time, pages
dropped after each use so they never accumulate in RSS), whether the next block is prefetched, and
the micro-batch (samples per forward/backward call). Cheaper savings come first: the micro-batch
shrinks to 1, then prefetch is dropped, then hidden states leave the device (pinned, then disk). A
budget the model cannot meet even then is a one-line `BudgetError`.

Estimates are upper bounds from the formulas above, not measurements; the report gives both the
plan's estimate and the peak reached. Nothing here changes the math: placement and prefetch never
change a value, and the micro-batch only where the planned default does not fit.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import re
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from barber.errors import BudgetError

log = logging.getLogger(__name__)

#: Tokens per forward/backward call when the micro-batch is automatic, by device type.
AUTO_BATCH_TOKENS = {"cpu": 1024, "cuda": 8192}
#: Bound on the per-sample weight gradients held at once in the gradient pass (at least one sample).
GRAD_CHUNK_BYTES = 256 * 2**20
#: Share of the memory available at start that an automatic CPU budget takes.
AUTO_CPU_FRACTION = 0.8
#: Automatic GPU budget: this share of the free GPU memory, capped at AUTO_GPU_CAP bytes. More buys
#: little (the micro-batch is compute-bound well below it) and leaves the GPU to others.
AUTO_GPU_FRACTION = 0.9
AUTO_GPU_CAP = 9 * 2**30
#: CUDA context and allocator slack not seen by max_memory_allocated.
CUDA_CONTEXT_BYTES = 0
#: Safety factor on activation estimates (autograd temporaries, allocator rounding).
ACTIVATION_SLACK = 1.25
#: Factor on everything the pruner allocates (not on the process's base): heap fragmentation, kernel
#: workspaces, libraries loaded after the plan. At LLaMA-13B width on a CPU (4 x 128 tokens, float32)
#: the peak RSS of 2-8 blocks was 1.06-1.16 x the unscaled estimate (three runs, a shared machine).
OVERHEAD = 1.20
#: The same for GPU memory: max_memory_allocated counts live tensors only (no fragmentation), so a
#: smaller margin for kernel workspaces (cuBLAS, attention). Not measured yet.
GPU_OVERHEAD = 1.05

PLACEMENTS = ("device", "pinned", "disk")

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
    hidden: str = "auto"  # auto, or one of PLACEMENTS
    prefetch: bool = True  # allow the background read of the next block

    def __post_init__(self) -> None:
        if self.hidden != "auto" and self.hidden not in PLACEMENTS:
            raise ValueError(f"hidden placement must be auto or one of {PLACEMENTS}, got {self.hidden!r}")


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


def model_shapes(ckpt) -> ModelShapes:
    """The plan's shape summary of an opened `barber.checkpoint.Checkpoint` (headers only)."""
    fam = ckpt.family
    shapes = fam.block_shapes(ckpt.config)
    linears = {n: tuple(shapes[n + ".weight"]) for n in fam.linears}
    stored = sum(math.prod(s) * ckpt.info(ckpt.block_tensor_name(0, k)).dtype.itemsize for k, s in shapes.items())
    globals_ = fam.global_tensors(ckpt.config)
    embed = sum(math.prod(globals_[k][1]) for k in ("embed_tokens", "embed_positions", "project_in") if k in globals_)
    return ModelShapes(
        hidden=ckpt.config.hidden_size,
        block_numel=sum(math.prod(s) for s in shapes.values()),
        block_stored_bytes=stored,
        linears=linears,
        attn=tuple(fam.attn_linears),
        mlp=tuple(fam.mlp_linears),
        embed_numel=embed,
    )


@dataclass(frozen=True)
class MemoryPlan:
    """Where things live and how big each step is, with the byte estimates behind the choice."""

    device: str  # the compute device type: cpu or cuda
    hidden_placement: str  # device, pinned or disk
    micro_batch: int  # samples per forward/backward call
    prefetch: bool  # the next block is read while this one computes
    grad_chunk_bytes: int
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
    """
    d = sh.hidden
    f = max((max(sh.linears[n]) for n in sh.mlp), default=d)
    grad = 4 * seqlen * max(16 * d, 4 * d + 8 * f)
    forward = compute_bytes * seqlen * (6 * d + 4 * f) + 4 * seqlen * 2 * max(d, f)  # + float32 statistics
    return int(ACTIVATION_SLACK * max(grad, forward))


def _block_bytes(sh: ModelShapes, compute_bytes: int, sparsegpt: bool, micro_batch: int) -> dict[str, int]:
    """Byte estimates of one block on the compute device (resident and per-phase transients)."""
    c = compute_bytes
    numel = {n: o * i for n, (o, i) in sh.linears.items()}
    lin = sum(numel.values())
    resident = sh.block_numel * c + lin * c + lin  # dense, masked copy, bool masks
    if sparsegpt:
        resident += lin * c + sum(4 * i * i for _, i in sh.linears.values())  # updated weights, X^T X
    largest = max(numel.values())
    # Initial selection: the float32 score of one linear and the selector's scratch (about 2x).
    select = 3 * 4 * largest
    gradient = rebuild = 0
    freed = 0  # dense (and SparseGPT's updated) weights of the sub-blocks already rebuilt
    for names in (sh.attn, sh.mlp):
        sub = sum(numel[n] for n in names)
        big = max(numel[n] for n in names)
        copies = 0 if c == 4 else 2 * 4 * sub  # float32 dense and sparse copies
        step = min(max(1, GRAD_CHUNK_BYTES // (4 * big)), micro_batch)  # samples of per-sample gradients at once
        chunk = step * 4 * big + (4 * big if step > 1 else 0)  # the squared gradients and their sum over samples
        gradient = max(gradient, copies + 4 * sub + chunk - freed)
        # Scores (A dropped as scored), new masks and scoring scratch, less the masked weights dropped meanwhile.
        rebuild = max(rebuild, 4 * sub + sub + 3 * 4 * big - freed - sub * c)
        freed += sub * c * (2 if sparsegpt else 1)
    return {"block_resident": resident, "select": select, "gradient_pass": gradient, "rebuild": rebuild}


def _meminfo_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _auto_cpu_budget() -> int:
    """AUTO_CPU_FRACTION of what this process holds plus what the system could still give it."""
    available = _meminfo_available() or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(AUTO_CPU_FRACTION * (available + current_rss()))


def _auto_gpu_budget(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return int(min(AUTO_GPU_FRACTION * (free + torch.cuda.memory_allocated(device)), AUTO_GPU_CAP))


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
    base_rss: int = 0,
    cpu_budget: int | None = None,
    gpu_budget: int | None = None,
) -> MemoryPlan:
    """Choose hidden-state placement, prefetch and micro-batch for the budgets.

    Args:
        sh: `model_shapes(ckpt)`.
        nsamples, seqlen: the calibration windows.
        compute_dtype: dtype of forwards, weights and hidden states.
        device: the compute device (cpu, cuda, cuda:N).
        budget: the user's budgets (None = automatic) and forced placement.
        batch_size: samples per call asked for (0 = automatic: AUTO_BATCH_TOKENS tokens); the
            plan may lower it to fit the budget, never raise it.
        sparsegpt: the initial method keeps X^T X and updated weights.
        base_rss: what the process holds already (RSS before the pruner allocates).
        cpu_budget, gpu_budget: the automatic budgets to use when `budget` leaves them open
            (default: measured, see AUTO_CPU_FRACTION and AUTO_GPU_FRACTION).

    Raises:
        BudgetError: even the smallest configuration does not fit.
    """
    kind = torch.device(device).type
    on_gpu = kind == "cuda"
    c = torch.empty((), dtype=compute_dtype).element_size()
    cpu_source = "given" if budget.cpu is not None else "auto"
    cpu = budget.cpu if budget.cpu is not None else (cpu_budget if cpu_budget is not None else _auto_cpu_budget())
    gpu = gpu_source = None
    if on_gpu:
        gpu_source = "given" if budget.gpu is not None else "auto"
        gpu = budget.gpu if budget.gpu is not None else (
            gpu_budget if gpu_budget is not None else _auto_gpu_budget(torch.device(device))
        )

    per_sample = _per_sample_activation_bytes(sh, seqlen, c)
    hidden_one = nsamples * seqlen * sh.hidden * c
    hidden_all = 2 * hidden_one  # the trajectory and the gradient pass's dense outputs
    embed = sh.embed_numel * c
    wanted = batch_size if batch_size > 0 else max(1, AUTO_BATCH_TOKENS.get(kind, 4096) // seqlen)
    wanted = min(wanted, nsamples)

    def estimate(placement: str, prefetch: bool, mb: int) -> dict[str, int]:
        block = _block_bytes(sh, c, sparsegpt, mb)
        work = block["block_resident"] + max(block["select"], block["gradient_pass"], block["rebuild"])
        staging = 2 * mb * seqlen * sh.hidden * c  # one micro-batch read from / written to a buffer
        prefetch_bytes = sh.block_stored_bytes if prefetch else 0
        device_hidden = hidden_all if placement == "device" else staging
        host_hidden = {"device": 0, "pinned": hidden_all, "disk": staging}[placement]
        acts = mb * per_sample
        compute = work + acts + device_hidden
        start = embed + device_hidden  # the embedding phase: embedding table and hidden states
        est = {
            "base_rss": base_rss,
            "hidden_states": hidden_all,
            "embedding": embed,
            "activations_per_sample": per_sample,
            "activations": acts,
            "prefetch": prefetch_bytes,
            **block,
        }
        if on_gpu:
            est["peak_gpu"] = CUDA_CONTEXT_BYTES + int(GPU_OVERHEAD * max(compute, start))
            est["peak_cpu"] = base_rss + int(OVERHEAD * (prefetch_bytes + host_hidden + sh.block_stored_bytes))
        else:
            est["peak_cpu"] = base_rss + int(OVERHEAD * (prefetch_bytes + host_hidden + max(compute, start)))
        return est

    def fits(est: dict[str, int]) -> bool:
        return est["peak_cpu"] <= cpu and (not on_gpu or est["peak_gpu"] <= gpu)

    placements = [budget.hidden] if budget.hidden != "auto" else (
        ["device", "pinned", "disk"] if on_gpu else ["device", "disk"]
    )
    if not on_gpu and "pinned" in placements:
        placements = ["device" if p == "pinned" else p for p in placements]  # pinned RAM is just RAM on a CPU run
    prefetches = [True, False] if budget.prefetch else [False]
    candidates = [(p, f) for p in placements for f in prefetches]
    for placement, prefetch in candidates:
        for mb in range(wanted, 0, -1) if wanted <= 64 else _halving(wanted):
            est = estimate(placement, prefetch, mb)
            if fits(est):
                plan = MemoryPlan(
                    kind, placement, mb, prefetch, GRAD_CHUNK_BYTES, cpu, cpu_source, gpu, gpu_source, est
                )
                log.info("%s", plan.summary())
                return plan
    smallest = estimate(candidates[-1][0], False, 1)
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


# ---- hidden-state buffers ---------------------------------------------------------------------


class HiddenBuffer:
    """A [N, T, d] buffer of hidden states on the device, in pinned host memory or in a mapped file.

    `get(rows)` returns those samples on the compute device (a view when they already live there,
    else a copy); `put(rows, value)` stores them. A disk buffer drops the mapped pages after every
    access, so only the micro-batch in use counts towards RSS; the data stays in the file (and the
    page cache).

    Attributes:
        tensor: the whole buffer (for a disk buffer: backed by the file mapping).
        placement: device, pinned or disk.
    """

    def __init__(self, tensor: torch.Tensor, placement: str, device: torch.device, path: Path | None = None,
                 mapping: mmap.mmap | None = None):
        self.tensor = tensor
        self.placement = placement
        self.device = device
        self.path = path
        self._mapping = mapping
        self._row_bytes = tensor[0].numel() * tensor.element_size() if tensor.shape[0] else 0
        self._map_offset = 0  # where the tensor starts in `mapping`
        self._writable = True  # False for a mapped state file (map_file)

    @classmethod
    def allocate(cls, shape: tuple[int, ...], dtype: torch.dtype, placement: str, device: str | torch.device,
                 path: Path | None = None) -> "HiddenBuffer":
        """An uninitialised buffer; `path` is the file of a disk buffer (created, truncated to size)."""
        device = torch.device(device)
        if placement == "device":
            return cls(torch.empty(shape, dtype=dtype, device=device), placement, device)
        if placement == "pinned":
            pin = device.type == "cuda"
            return cls(torch.empty(shape, dtype=dtype, pin_memory=pin), placement, device)
        if placement != "disk":
            raise ValueError(f"unknown placement {placement!r}")
        if path is None:
            raise ValueError("a disk buffer needs a path")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w+b") as f:
            f.truncate(max(nbytes, 1))
            mapping = mmap.mmap(f.fileno(), max(nbytes, 1))
        flat = torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes) if nbytes else torch.empty(0, dtype=torch.uint8)
        return cls(flat.view(dtype).view(shape), placement, device, path, mapping)

    @classmethod
    def map_file(cls, path: Path, offset: int, shape: tuple[int, ...], dtype: torch.dtype,
                 device: str | torch.device = "cpu") -> "HiddenBuffer":
        """A copy-on-write mapping of `shape` x `dtype` bytes at `offset` in the file `path`.

        Nothing is read up front, and `get` drops the pages it read, as for a disk buffer; the
        file is never written nor removed (`close` leaves it).

        Raises:
            OSError, ValueError: the file cannot be mapped or is shorter than the tensor.
        """
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        device = torch.device(device)
        if nbytes == 0:
            return cls(torch.empty(shape, dtype=dtype), "pinned", device)
        with open(path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if len(mapping) < offset + nbytes:
            raise ValueError(f"{path} is shorter than the {nbytes} bytes at offset {offset}")
        flat = torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=offset)
        buf = cls(flat.view(dtype).view(shape), "disk", device, None, mapping)
        buf._map_offset, buf._writable = offset, False
        return buf

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    def host_pieces(self, max_bytes: int = 64 * 1024 * 1024) -> Iterator[torch.Tensor]:
        """The whole buffer as consecutive pieces along samples, each at most about `max_bytes`.

        A disk buffer yields host copies and drops their pages, so streaming it to a file keeps
        one piece in RSS; other buffers yield views (copied to the host by whoever writes them).
        """
        n = self.tensor.shape[0]
        rows = max(1, max_bytes // self._row_bytes) if self._row_bytes else max(n, 1)
        for start in range(0, n, rows):
            c = slice(start, min(start + rows, n))
            if self.placement == "disk":
                piece = self.tensor[c].clone()
                self._drop(c)
                yield piece
            else:
                yield self.tensor[c]

    def get(self, rows: slice) -> torch.Tensor:
        """Samples `rows` on the compute device."""
        if self.placement == "device":
            return self.tensor[rows]
        if self.placement == "pinned":
            return self.tensor[rows].to(self.device, non_blocking=False)
        out = self.tensor[rows].to(self.device, copy=True)
        self._drop(rows)
        return out

    def put(self, rows: slice, value: torch.Tensor) -> None:
        """Store `value` as samples `rows` (converted to the buffer's dtype)."""
        if not self._writable:
            raise RuntimeError("a mapped state file is read-only")
        self.tensor[rows] = value
        if self.placement == "disk":
            self._drop(rows)

    def _drop(self, rows: slice) -> None:
        """Drop the mapped pages of `rows` from this process (the file keeps the data)."""
        start, stop, _ = rows.indices(self.tensor.shape[0])
        if stop <= start or self._mapping is None:
            return
        lo, hi = start * self._row_bytes + self._map_offset, stop * self._row_bytes + self._map_offset
        lo -= lo % mmap.PAGESIZE
        try:
            self._mapping.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError):  # pragma: no cover - platform without madvise
            pass

    def close(self) -> None:
        """Remove a disk buffer's file (its mapping lives until the last tensor using it is gone)."""
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None


# ---- prefetch ---------------------------------------------------------------------------------


class BlockPrefetcher:
    """Reads blocks in a background thread, one ahead, in their stored dtype on the CPU.

    `take(i)` returns block i's tensors (waiting for a read in flight, or reading now); `ahead(i)`
    starts reading block i. At most one block is read ahead. Conversion to the compute dtype and
    device happens in the caller, so values are the same as a direct read.
    """

    def __init__(self, ckpt, enabled: bool = True):
        self.ckpt = ckpt
        self.enabled = enabled
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()

    def ahead(self, i: int) -> None:
        """Start reading block i in the background (no-op when disabled, out of range or in flight)."""
        if not self.enabled or not 0 <= i < self.ckpt.num_layers:
            return
        with self._lock:
            if i in self._pending:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="barber-prefetch")
            self._pending[i] = self._pool.submit(self.ckpt.block_weights, i)

    def take(self, i: int) -> dict[str, torch.Tensor]:
        """Block i's tensors in their stored dtype on the CPU."""
        with self._lock:
            future = self._pending.pop(i, None)
        if future is not None:
            return future.result()
        return self.ckpt.block_weights(i)

    def close(self) -> None:
        """Drop any block read ahead and stop the thread."""
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
            pool, self._pool = self._pool, None
        for future in pending:
            future.cancel()
        if pool is not None:
            pool.shutdown(wait=True)


_LIBC: list = []  # the loaded C library, once (or None where there is none to load)


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc `malloc_trim`); a no-op elsewhere.

    Tensors of a few MB (activations of short sequences) live on the heap, and the holes they leave
    stay resident; trimming at block boundaries keeps that from growing with depth.
    """
    if not _LIBC:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            _LIBC.append(libc if hasattr(libc, "malloc_trim") else None)
        except OSError:
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0].malloc_trim(0)


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int:
    """Resident set size of this process now (VmRSS), in bytes."""
    rss = _status_bytes("VmRSS")
    if rss is None:  # pragma: no cover - no /proc
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return rss


def peak_rss() -> int:
    """Peak resident set size of this process so far (VmHWM), in bytes."""
    rss = _status_bytes("VmHWM")
    if rss is None:  # pragma: no cover - no /proc
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return rss
