#!/usr/bin/env python3
"""Does the pruned output depend on the micro-batch? Prune SmolLM2-135M with several micro-batch
sizes and compare the output files byte for byte (and, with --eval, their perplexities).

The micro-batch (samples per forward/backward call) is chosen by the memory plan from the budget, so
an output that depends on it would depend on the machine's memory. Every calibration statistic is
an order-fixed sum over sample groups (barber.fold), so the outputs should be identical.

    .venv/bin/python tools/experiments/microbatch_check.py                          # wanda 50%, no rebuild, 4 vs 16
    .venv/bin/python tools/experiments/microbatch_check.py --batch-sizes 1 4 16 --reconstruct subblock
    .venv/bin/python tools/experiments/microbatch_check.py --rebuild-ratio 0.1 --eval
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from barber import assets  # noqa: E402
from barber.api import Evaluation, prune_and_evaluate  # noqa: E402
from barber.prune import InitMethod  # noqa: E402
from barber.settings import PruneSettings, Reconstruct  # noqa: E402


def weights_digest(path: Path) -> str:
    """sha256 over the output's safetensors files, in name order."""
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", choices=[m.value for m in InitMethod], default="wanda")
    p.add_argument("--rebuild-ratio", type=float, default=None, help="rebuild at row granularity (default: no rebuild)")
    p.add_argument("--reconstruct", choices=[r.value for r in Reconstruct], default="none",
                   help="re-fit the kept weights (subblock: the default recipe's)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16])
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval", action="store_true", help="also the perplexity on 16 x 512 Wikipedia tokens")
    args = p.parse_args(argv)

    model = assets.smollm2_dir()
    evaluation = Evaluation(assets.wiki_text_path(), windows=16, seqlen=512) if args.eval else None
    rebuild = args.rebuild_ratio is not None
    digests = {}
    for bs in args.batch_sizes:
        settings = PruneSettings(init=InitMethod(args.init), rebuild=rebuild, ratio=args.rebuild_ratio or 0.0,
                                 batch_size=bs, reconstruct=Reconstruct(args.reconstruct))
        with tempfile.TemporaryDirectory(prefix="barber-mb-") as tmp:
            out = Path(tmp) / "out"
            report = prune_and_evaluate(model, out, settings, assets.botchan_path(), nsamples=args.nsamples,
                                        seqlen=args.seqlen, evaluation=evaluation)
            digests[bs] = weights_digest(out)
            line = f"micro-batch {bs:3d}: weights sha256 {digests[bs][:16]}, {report.swaps} swaps"
            if evaluation is not None:
                line += f", perplexity {report.eval['pruned']['ppl']:.4f}"
        print(line, flush=True)
    same = len(set(digests.values())) == 1
    print("identical outputs" if same else "the outputs differ", flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
