#!/usr/bin/env python3
"""Re-fit solvers on real layers: calibration error against time, conjugate gradients vs exact solves.

Takes one block of SmolLM2-135M (default block 3), runs the dense model up to it on 32 x 256
Botchan tokens, collects each linear's X^T X as the pruner does, prunes with Wanda (50% or N:M)
and re-fits every linear's kept weights with `masked_pcg` at several iteration counts and with
`exact_masked_lstsq` (float64, one solve per row). Prints, per linear, the relative error
sum ||(W - W_d) x||^2 / sum ||W_d x||^2 without a re-fit and after each solver, and the seconds.

`--damps` instead re-fits at several ridge strengths and prints the error on the calibration
windows and on held-out windows of the Wikipedia excerpt (the same block, the dense model's
inputs): a re-fit that lowers the first and raises the second over-fits the calibration text.

    .venv/bin/python tools/experiments/refit_solvers.py --block 3 --pattern 2:4
    .venv/bin/python tools/experiments/refit_solvers.py --block 3 --damps 0.01,0.1,1

`--shrinks` re-fits with X^T X pulled towards its diagonal by each given amount (`--reconstruct-shrink`)
and prints, per linear, the two-fold cross-validated error on the calibration windows alone (fit on
the even windows, measure on the odd ones, and back), the amount that minimises it, and the error
on the held-out Wikipedia windows of each amount (for comparison, not for choosing).

    .venv/bin/python tools/experiments/refit_solvers.py --block 3 --shrinks 0,0.25,0.5,0.75
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from barber import assets, prune  # noqa: E402
from barber.calib import load_calibration  # noqa: E402
from barber.checkpoint import Checkpoint  # noqa: E402
from barber.initial import Stats  # noqa: E402
from barber.model import Arch  # noqa: E402
from barber.reconstruct import damped, exact_masked_lstsq, masked_pcg, shrunk  # noqa: E402
from barber.tokenizer import load_tokenizer  # noqa: E402


def relative_error(w: torch.Tensor, w_dense: torch.Tensor, hessian: torch.Tensor) -> float:
    d = (w - w_dense).double()
    h = hessian.double()
    return float(((d @ h) * d).sum() / ((w_dense.double() @ h) * w_dense.double()).sum())


def block_statistics(ckpt: Checkpoint, ids: torch.Tensor, block: int) -> tuple[dict, Stats]:
    """Block `block`'s dense weights and its linears' input statistics on `ids` (dense model up to it)."""
    arch = Arch.from_checkpoint(ckpt)
    pos = arch.positions(ids.shape[1])
    with torch.no_grad():
        h = arch.embed(ids, ckpt.embedding_weights(dtype=torch.float32))
        for i in range(block):
            h = arch.block_forward(h, ckpt.block_weights(i, dtype=torch.float32), pos)
        dense = ckpt.block_weights(block, dtype=torch.float32)
        stats = Stats(hessian=True)
        arch.block_forward(h, dense, pos, stats.linear(dense))
    return dense, stats


def compare_damps(ckpt, dense, stats, held_out, pattern, damps: list[float]) -> int:
    """Calibration and held-out relative error of the exact re-fit of Wanda masks, per ridge strength."""
    print(f"{pattern}, Wanda masks; relative error on the calibration windows / on held-out Wikipedia windows")
    header = ["linear", "no re-fit", *(f"damp {d:g}" for d in damps)]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name in ckpt.family.linears:
        w_dense, hessian, h_out = dense[name + ".weight"].float(), stats.xtx[name], held_out.xtx[name]
        mask = prune.select(prune.wanda_scores(w_dense, stats.sq[name]), 0.5, pattern)
        cells = [f"{relative_error(w_dense * mask, w_dense, hessian):.4f} / "
                 f"{relative_error(w_dense * mask, w_dense, h_out):.4f}"]
        for damp in damps:
            hd, lam = damped(hessian, damp)
            w = exact_masked_lstsq(hd, w_dense @ hessian + lam * w_dense, mask)
            cells.append(f"{relative_error(w, w_dense, hessian):.4f} / {relative_error(w, w_dense, h_out):.4f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


def _shrunk_refit(hessian, w_dense, mask, shrink: float, damp: float) -> torch.Tensor:
    hd, lam = damped(shrunk(hessian, torch.diagonal(hessian), shrink), damp)
    return exact_masked_lstsq(hd, w_dense @ hd, mask)


def cross_validate(ckpt, dense, stats, folds, held_out, pattern, shrinks: list[float], damp: float) -> int:
    """Per linear: two-fold CV error on the calibration windows per shrinkage, its choice, held-out errors."""
    print(f"{pattern}, Wanda masks, damp {damp:g}; cross-validated calibration error | held-out Wikipedia error")
    header = ["linear", *(f"cv {g:g}" for g in shrinks), "chosen", "held-out, no re-fit",
              *(f"held-out {g:g}" for g in shrinks)]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name in ckpt.family.linears:
        w_dense = dense[name + ".weight"].float()
        mask = prune.select(prune.wanda_scores(w_dense, stats.sq[name]), 0.5, pattern)
        cv = [sum(relative_error(_shrunk_refit(folds[k].xtx[name], w_dense, mask, g, damp), w_dense,
                                 folds[1 - k].xtx[name]) for k in (0, 1)) / 2 for g in shrinks]
        chosen = shrinks[min(range(len(shrinks)), key=cv.__getitem__)]
        h_out = held_out.xtx[name]
        out = [relative_error(_shrunk_refit(stats.xtx[name], w_dense, mask, g, damp), w_dense, h_out) for g in shrinks]
        cells = [*(f"{c:.4f}" for c in cv), f"{chosen:g}", f"{relative_error(w_dense * mask, w_dense, h_out):.4f}",
                 *(f"{e:.4f}" for e in out)]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--block", type=int, default=3)
    p.add_argument("--pattern", default="unstructured")
    p.add_argument("--iters", default="5,10,20,40", help="conjugate-gradient iteration counts, comma-separated")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--no-exact", action="store_true", help="skip the exact per-row solves (slow on wide rows)")
    p.add_argument("--damps", default=None, help="ridge strengths to compare on held-out text, comma-separated")
    p.add_argument("--shrinks", default=None, help="shrinkage amounts to cross-validate, comma-separated")
    args = p.parse_args(argv)
    pattern = prune.Pattern.parse(args.pattern)

    ckpt = Checkpoint.open(assets.smollm2_dir())
    tok = load_tokenizer(ckpt.path)
    ids = load_calibration(assets.botchan_path(), tok.encode, nsamples=32, seqlen=256, seed=0,
                           vocab_size=ckpt.config.vocab_size)
    dense, stats = block_statistics(ckpt, ids, args.block)
    if args.damps or args.shrinks:
        wiki = tok.encode_prefix(assets.wiki_text_path().read_text(encoding="utf-8"), 32 * 256)
        _, held_out = block_statistics(ckpt, torch.tensor(wiki[: 32 * 256]).view(32, 256), args.block)
        if args.shrinks:
            folds = [block_statistics(ckpt, ids[k::2], args.block)[1] for k in (0, 1)]
            shrinks = [float(g) for g in args.shrinks.split(",")]
            return cross_validate(ckpt, dense, stats, folds, held_out, pattern, shrinks, args.damp)
        return compare_damps(ckpt, dense, stats, held_out, pattern, [float(d) for d in args.damps.split(",")])
    print(f"block {args.block}, {args.pattern}, Wanda masks, damp {args.damp}; relative error (seconds)")
    header = ["linear", "no re-fit", *(f"cg {n}" for n in args.iters.split(","))] + ([] if args.no_exact else ["exact"])
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name in ckpt.family.linears:
        w_dense, hessian = dense[name + ".weight"].float(), stats.xtx[name]
        mask = prune.select(prune.wanda_scores(w_dense, stats.sq[name]), 0.5, pattern)
        hd, lam = damped(hessian, args.damp)
        rhs = w_dense @ hessian + lam * w_dense
        cells = [f"{relative_error(w_dense * mask, w_dense, hessian):.4f}"]
        for n in args.iters.split(","):
            t0 = time.perf_counter()
            w = masked_pcg(hd, rhs, w_dense * mask, mask, int(n))
            cells.append(f"{relative_error(w, w_dense, hessian):.4f} ({time.perf_counter() - t0:.2f})")
        if not args.no_exact:
            t0 = time.perf_counter()
            w = exact_masked_lstsq(hd, rhs, mask)
            cells.append(f"{relative_error(w, w_dense, hessian):.4f} ({time.perf_counter() - t0:.2f})")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
