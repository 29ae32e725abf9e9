"""Benchmark barber's native ops against research code and plain torch (issue #2).

    .venv/bin/python tools/bench/bench_ops.py [--device cpu|cuda] [--quick] [--json PATH] [--ops OP ...]

For LLaMA-13B weight shapes (5120x13824, 13824x5120, 5120x5120; --quick: the same
aspects divided by 8) and each dtype (float32, float16, bfloat16) it times every native
op (median of several runs after a warmup) next to:
  (a) how research code does it: stable torch.sort + scatter_ for top-k (Wanda), a
      Python loop over column groups for N:M (Wanda: topk on scores[:, ii:ii+m]), the
      pure-torch reference for the rebuild, torch's CUTLASS converters for 2:4 packing;
  (b) plain torch alternatives: torch.topk + scatter_, torch.kthvalue + compare,
      vectorised group topk, numpy packbits for bitmasks;
as speed-ups from the same run, and (c) the achieved bytes/s (bytes the op must read
plus write) against a plain copy of the same number of bytes (dst.copy_(src)).
Prints a markdown table; --json writes every number. Times are wall-clock medians; on a
shared machine they are noisy, compare ratios from one run rather than across runs.
On CPU every op allocates its output, and first-touch page faults of large fresh buffers
can dominate; THP_MEM_ALLOC_ENABLE=1 lets torch use transparent huge pages (numpy does).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

from barber import _native, ops, reference

FULL_SHAPES = [(5120, 13824), (13824, 5120), (5120, 5120)]
QUICK_DIVISOR = 8  # 640x1728, 1728x640, 640x640: still valid 2:4 CUTLASS shapes
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
ALL_OPS = ["topk_mask", "nm_mask", "rebuild_mask", "pack_24", "unpack_24", "pack_bitmask", "unpack_bitmask"]
SPARSITY = 0.5  # fraction pruned by topk_mask (keep half of every row)
N, M = 2, 4  # N:M pattern of nm_mask and pack_24
REBUILD_RATIO = 0.01  # LLM-Barber's default mask rebuilding ratio (alpha)
MIN_REPS = {"quick": 0, "full": 3}  # timed runs per callable (after the warmup) at least ...
MAX_REPS = 50  # ... and at most; in between, as many as fit in the time budget
BUDGET_S = {"quick": 0.1, "full": 1.0}  # timed seconds per callable


@dataclass
class Result:
    """Timings of one op on one (shape, dtype): native and baselines, in seconds."""

    op: str
    shape: tuple[int, int]
    dtype: str
    bytes_moved: int
    native_s: float | None = None
    copy_s: float | None = None
    baselines: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def speedups(self) -> dict[str, float]:
        if not self.native_s:
            return {}
        return {name: t / self.native_s for name, t in self.baselines.items()}

    def gbps(self, seconds: float | None) -> float | None:
        return self.bytes_moved / seconds / 1e9 if seconds else None

    def as_json(self) -> dict:
        return {
            "op": self.op,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "bytes": self.bytes_moved,
            "native_s": self.native_s,
            "native_gbps": self.gbps(self.native_s),
            "copy_s": self.copy_s,
            "copy_gbps": self.gbps(self.copy_s),
            "fraction_of_copy": (self.copy_s / self.native_s) if self.native_s and self.copy_s else None,
            "baselines_s": self.baselines,
            "speedups": self.speedups(),
            "note": self.note,
        }


class Timer:
    """Median wall-clock time of a callable on one device (CUDA: synchronised)."""

    def __init__(self, device: torch.device, warmup: int, budget_s: float, min_reps: int, reps: int | None = None):
        self.device, self.warmup, self.budget_s, self.min_reps, self.reps = device, warmup, budget_s, min_reps, reps

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _once(self, fn: Callable[[], object]) -> float:
        self._sync()
        start = time.perf_counter()
        fn()
        self._sync()
        return time.perf_counter() - start

    def __call__(self, fn: Callable[[], object]) -> float:
        first = min(self._once(fn) for _ in range(max(1, self.warmup)))
        reps = self.reps or min(MAX_REPS, max(self.min_reps, int(self.budget_s / max(first, 1e-6))))
        if self.min_reps == 0 and reps == 0:
            return first  # quick mode: a callable slower than the budget is timed by its warmup
        return statistics.median(self._once(fn) for _ in range(reps))


# --- research-code and plain-torch baselines ---------------------------------------------


def sort_scatter_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Wanda: stable ascending sort, scatter the lowest C-k as pruned, return kept."""
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    order = torch.sort(scores, dim=-1, stable=True)[1]
    pruned.scatter_(1, order[:, : scores.shape[1] - k], True)
    return ~pruned


def topk_scatter(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, torch.topk(scores, k, dim=-1).indices, True)


def kthvalue_compare(scores: torch.Tensor, k: int) -> torch.Tensor:
    threshold = torch.kthvalue(scores.float(), scores.shape[1] - k + 1, dim=-1, keepdim=True).values
    return scores >= threshold.to(scores.dtype)


def wanda_nm_loop(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Wanda's N:M: a Python loop over column groups, prune the m-n smallest of each."""
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    for ii in range(0, scores.shape[1], m):
        tmp = scores[:, ii : ii + m].float()
        pruned.scatter_(1, ii + torch.topk(tmp, m - n, dim=1, largest=False)[1], True)
    return ~pruned


def grouped_topk(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, cols = scores.shape
    groups = scores.view(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    return mask.scatter_(-1, groups.topk(n, dim=-1).indices, True).view(rows, cols)


# --- cases ------------------------------------------------------------------------------


@dataclass
class Inputs:
    """Tensors shared by the cases of one (shape, dtype)."""

    scores: torch.Tensor  # [R, C] nonnegative, the given dtype
    mask: torch.Tensor  # [R, C] bool, half of every row kept
    mask24: torch.Tensor  # [R, C] bool, 2 of every 4 kept
    dense24: torch.Tensor  # [R, C] the given dtype, exactly 2:4

    @staticmethod
    def make(shape: tuple[int, int], dtype: torch.dtype, device: torch.device, seed: int = 0) -> "Inputs":
        gen = torch.Generator(device=device).manual_seed(seed)
        scores = torch.randn(shape, generator=gen, device=device).abs_().to(dtype)
        mask = topk_scatter(scores, shape[1] // 2)
        mask24 = grouped_topk(scores, N, M)
        dense24 = torch.where(mask24, scores, torch.zeros((), dtype=dtype, device=device))
        return Inputs(scores, mask, mask24, dense24)


def native_missing(op: str) -> str:
    """Why the native `op` cannot run here, or ""."""
    if not _native.available():
        return "barber._C not built"
    if not hasattr(ops, op):
        return f"barber.ops.{op} not implemented yet"
    return ""


def cases(op: str, x: Inputs, device: torch.device) -> tuple[Callable | None, dict[str, Callable], int, str]:
    """(native callable, baselines, bytes read+written, note) of `op` on inputs `x`."""
    rows, cols = x.scores.shape
    elem = x.scores.element_size()
    dense_bytes, mask_bytes, bits_bytes = rows * cols * elem, rows * cols, rows * ((cols + 7) // 8)
    missing = native_missing(op)
    k = cols - int(cols * SPARSITY)
    if op == "topk_mask":
        native = None if missing else (lambda: ops.topk_mask(x.scores, k, backend="native"))
        base = {
            "sort+scatter (wanda)": lambda: sort_scatter_topk(x.scores, k),
            "topk+scatter": lambda: topk_scatter(x.scores, k),
            "kthvalue+compare": lambda: kthvalue_compare(x.scores, k),
        }
        return native, base, dense_bytes + mask_bytes, missing
    if op == "nm_mask":
        native = None if missing else (lambda: ops.nm_mask(x.scores, N, M, backend="native"))
        base = {
            "column loop (wanda)": lambda: wanda_nm_loop(x.scores, N, M),
            "grouped topk+scatter": lambda: grouped_topk(x.scores, N, M),
        }
        return native, base, dense_bytes + mask_bytes, missing
    if op == "rebuild_mask":
        native = None if missing else (lambda: ops.rebuild_mask(x.scores, x.mask, REBUILD_RATIO, backend="native"))
        base = {}
        if hasattr(reference, "rebuild_mask"):
            base["reference (torch)"] = lambda: reference.rebuild_mask(x.scores, x.mask, REBUILD_RATIO)
        return native, base, dense_bytes + 2 * mask_bytes, missing
    if op in ("pack_24", "unpack_24"):
        if x.dense24.dtype not in (torch.float16, torch.bfloat16):
            return None, {}, 0, f"{x.dense24.dtype} has no 2:4 CUTLASS layout here (1:2 TF32)"
        values, meta = sparse_semi_structured_from_dense_cutlass(x.dense24.cpu())
        values, meta = values.to(device), meta.to(device)
        packed_bytes = values.numel() * elem + meta.numel() * meta.element_size()
        if op == "pack_24":
            native = None if missing else (lambda: ops.pack_24(x.dense24, backend="native"))
            base = {
                "torch CUTLASS converter": lambda: sparse_semi_structured_from_dense_cutlass(x.dense24),
                "reference (torch)": lambda: reference.pack_24(x.dense24),
            }
        else:
            native = None if missing else (lambda: ops.unpack_24(values, meta, backend="native"))
            base = {
                "torch CUTLASS to_dense": lambda: sparse_semi_structured_to_dense_cutlass(values, meta),
                "reference (torch)": lambda: reference.unpack_24(values, meta),
            }
        return native, base, dense_bytes + packed_bytes, missing
    if op == "pack_bitmask":
        native = None if missing else (lambda: ops.pack_bitmask(x.mask, backend="native"))
        base = {"reference (torch)": lambda: reference.pack_bitmask(x.mask)}
        if device.type == "cpu":
            mask_np = x.mask.numpy()
            base["numpy packbits"] = lambda: np.packbits(mask_np, axis=-1, bitorder="little")
        return native, base, mask_bytes + bits_bytes, missing
    if op == "unpack_bitmask":
        packed = reference.pack_bitmask(x.mask)
        native = None if missing else (lambda: ops.unpack_bitmask(packed, cols, backend="native"))
        base = {"reference (torch)": lambda: reference.unpack_bitmask(packed, cols)}
        if device.type == "cpu":
            packed_np = packed.numpy()
            base["numpy unpackbits"] = lambda: np.unpackbits(packed_np, axis=-1, count=cols, bitorder="little")
        return native, base, mask_bytes + bits_bytes, missing
    raise ValueError(f"unknown op {op!r}")


def copy_time(nbytes: int, device: torch.device, timer: Timer, cache: dict[int, float]) -> float:
    """Time of dst.copy_(src) moving `nbytes` in total (nbytes/2 read, nbytes/2 written)."""
    if nbytes not in cache:
        src = torch.ones(max(1, nbytes // 2), dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        cache[nbytes] = timer(lambda: dst.copy_(src))
    return cache[nbytes]


def run(device: torch.device, shapes: list[tuple[int, int]], dtypes: list[str], op_names: list[str], timer: Timer,
        log: Callable[[str], None]) -> list[Result]:
    results: list[Result] = []
    copies: dict[int, float] = {}
    for shape in shapes:
        for dtype_name in dtypes:
            x = Inputs.make(shape, DTYPES[dtype_name], device)
            for op in op_names:
                bitmask_op = op in ("pack_bitmask", "unpack_bitmask")
                if bitmask_op and dtype_name != dtypes[0]:
                    continue  # bool in, bool out: independent of the score dtype
                native, base, nbytes, note = cases(op, x, device)
                result = Result(op, shape, "bool" if bitmask_op else dtype_name, nbytes, note=note)
                if native is not None:
                    try:
                        result.native_s = timer(native)
                    except (RuntimeError, NotImplementedError, TypeError) as exc:  # e.g. a kernel not registered yet
                        first_line = str(exc).splitlines()[0]
                        if first_line.startswith("Could not run"):
                            first_line = f"no native {device.type} kernel registered"
                        result.note = f"native failed: {first_line[:120]}"
                if nbytes:
                    result.copy_s = copy_time(nbytes, device, timer, copies)
                for name, fn in base.items():
                    result.baselines[name] = timer(fn)
                log(f"{op} {shape[0]}x{shape[1]} {result.dtype}: native {fmt_ms(result.native_s)} ms {result.note}")
                results.append(result)
    return results


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def markdown(results: list[Result]) -> str:
    lines = [
        "| op | shape | dtype | native ms | native GB/s | copy GB/s | % of copy | baselines: ms (native speed-up) |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        native_gbps, copy_gbps = r.gbps(r.native_s), r.gbps(r.copy_s)
        frac = f"{100 * r.copy_s / r.native_s:.0f}%" if r.native_s and r.copy_s else "-"
        speedups = r.speedups()
        base = "; ".join(
            f"{name}: {fmt_ms(t)}" + (f" ({speedups[name]:.1f}x)" if name in speedups else "")
            for name, t in r.baselines.items()
        )
        if r.note:
            base = f"{base}; _{r.note}_" if base else f"_{r.note}_"
        lines.append(
            f"| {r.op} | {r.shape[0]}x{r.shape[1]} | {r.dtype} | {fmt_ms(r.native_s)} | "
            f"{'-' if native_gbps is None else f'{native_gbps:.2f}'} | "
            f"{'-' if copy_gbps is None else f'{copy_gbps:.2f}'} | {frac} | {base} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--quick", action="store_true", help=f"shapes divided by {QUICK_DIVISOR}, fewer runs (< 1 min on 2 cores)"
    )
    parser.add_argument("--json", metavar="PATH", help="write all numbers as JSON")
    parser.add_argument("--ops", nargs="+", choices=ALL_OPS, default=ALL_OPS, help="ops to run (default: all)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--reps", type=int, default=None, help="timed runs per callable (default: fit a time budget)")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    shapes = FULL_SHAPES
    if args.quick:
        shapes = [(r // QUICK_DIVISOR, c // QUICK_DIVISOR) for r, c in FULL_SHAPES]
    mode = "quick" if args.quick else "full"
    timer = Timer(device, warmup=1, budget_s=BUDGET_S[mode], min_reps=MIN_REPS[mode], reps=args.reps)
    info = {
        "device": str(torch.cuda.get_device_name(device)) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "build_info": _native.build_info(),
        "quick": args.quick,
    }
    print(f"# barber ops benchmark: {info}", flush=True)
    start = time.perf_counter()
    results = run(device, shapes, args.dtypes, args.ops, timer, lambda s: print(f"  {s}", file=sys.stderr, flush=True))
    print(markdown(results))
    print(f"\n({time.perf_counter() - start:.1f} s; medians of wall-clock times; speed-up = baseline / native)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": [r.as_json() for r in results]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
