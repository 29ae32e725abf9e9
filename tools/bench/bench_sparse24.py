"""Tokens/s of dense against 2:4 semi-structured linears on a GPU, at LLaMA-7B and 13B linear shapes.

For each shape [out, in] and batch (tokens) from 1 to 4096, times `x @ W.T` with W dense (bfloat16) and
with W = `torch.sparse.to_sparse_semi_structured` of a 2:4-pruned W (the layout `barber.load_pruned`
gives the 2:4 linears of a barber output on CUDA), and prints tokens/s of each and their ratio.
Needs a CUDA GPU with 2:4 sparse tensor cores (sm80+); exits 0 with a notice otherwise.

    python tools/bench/bench_sparse24.py [--batches 1,16,256,4096] [--iters 50]
"""

from __future__ import annotations

import argparse
import sys

import torch

#: name -> [out, in] of the linears of one block.
SHAPES = {
    "7B q/k/v/o": (4096, 4096), "7B gate/up": (11008, 4096), "7B down": (4096, 11008),
    "13B q/k/v/o": (5120, 5120), "13B gate/up": (13824, 5120), "13B down": (5120, 13824),
}


def _time(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / iters


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,16,64,256,1024,4096")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_sparse24: no CUDA device, nothing measured")
        return 0
    from torch.sparse import to_sparse_semi_structured

    print(f"{'shape':<12} {'batch':>6} {'dense tok/s':>14} {'2:4 tok/s':>14} {'2:4/dense':>9}")
    for name, (out, inp) in SHAPES.items():
        w = torch.randn(out, inp, device="cuda", dtype=torch.bfloat16)
        w.view(out, -1, 4)[..., 2:] = 0
        sparse = to_sparse_semi_structured(w)
        for batch in map(int, args.batches.split(",")):
            x = torch.randn(batch, inp, device="cuda", dtype=torch.bfloat16)
            dense_s = _time(lambda: torch.nn.functional.linear(x, w), args.iters)
            try:
                sparse_s = _time(lambda: torch.nn.functional.linear(x, sparse), args.iters)
            except RuntimeError as exc:  # a batch the kernels do not take
                print(f"{name:<12} {batch:>6} {batch / dense_s:>14.0f} {'-':>14} {'-':>9}  ({str(exc)[:60]})")
                continue
            print(f"{name:<12} {batch:>6} {batch / dense_s:>14.0f} {batch / sparse_s:>14.0f} "
                  f"{dense_s / sparse_s:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
