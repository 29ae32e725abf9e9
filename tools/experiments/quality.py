#!/usr/bin/env python3
"""Quality table: perplexity of SmolLM2-135M pruned by every method, with and without the rebuild.

Calibrates on one text (default: Botchan) and evaluates on held-out windows of another (default:
the Wikipedia excerpt), both fetched by barber-fetch-assets. Each configuration is pruned with the
streaming pruner into a temporary directory and evaluated with the streaming evaluator. Results are
cached per configuration in the JSON file, so an interrupted run continues where it stopped.

    .venv/bin/python tools/experiments/quality.py                       # the main table (dense + 21 runs)
    .venv/bin/python tools/experiments/quality.py --set sweep           # rebuild settings on Wanda 50%
    .venv/bin/python tools/experiments/quality.py --only wanda          # configurations whose name matches a regex
    .venv/bin/python tools/experiments/quality.py --only wanda --rerun  # the same, ignoring the cached results
    .venv/bin/python tools/experiments/quality.py --set recipes         # baselines vs the re-fit recipes, 3 seeds
    .venv/bin/python tools/experiments/quality.py --set recipes --protocol wiki-halves  # same-domain calibration

`--protocol botchan` (the default) calibrates on Botchan and evaluates on the Wikipedia excerpt;
`wiki-halves` calibrates on the second half of the Wikipedia articles and evaluates on the first
(the same evaluation windows), to tell better pruning apart from less overfitting to a novel.

Writes `--json` and `--markdown` (default runs/quality.json and .md for the main set on Botchan,
runs/quality-SET-PROTOCOL.json and .md otherwise).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from barber import assets  # noqa: E402
from barber.calib import load_calibration  # noqa: E402
from barber.checkpoint import Checkpoint  # noqa: E402
from barber.evaluate import perplexity  # noqa: E402
from barber.prune import Granularity, InitMethod, Metric, Pattern  # noqa: E402
from barber.run import prune_checkpoint  # noqa: E402
from barber.settings import PruneSettings, Reconstruct, default_rebuild  # noqa: E402
from barber.tokenizer import load_tokenizer  # noqa: E402

PATTERNS = {"50%": Pattern(), "2:4": Pattern(2, 4), "4:8": Pattern(4, 8)}
CALIB_SIZES = (16, 64, 128)  # calibration windows for the calibration-size axis of the sweep
SEEDS = (1, 2)  # other calibration samplings, to see which differences are larger than the sampling's


@dataclass(frozen=True)
class Run:
    """One configuration: pruning settings (None = the dense model) and, where they differ from
    `--nsamples` and `--seed`, its own number of calibration windows and sampling seed."""

    settings: PruneSettings | None
    nsamples: int | None = None
    seed: int | None = None


def main_table() -> dict[str, Run]:
    """dense, then every initial method x pattern, without and with the rebuild (reference defaults)."""
    runs: dict[str, Run] = {"dense": Run(None)}
    for label, pattern in PATTERNS.items():
        for init in InitMethod:
            ratio, granularity = default_rebuild(init, pattern)
            base = PruneSettings(sparsity=0.5, pattern=pattern, init=init, ratio=ratio, granularity=granularity)
            runs[f"{init.value} {label}"] = Run(replace(base, rebuild=False))
            runs[f"{init.value} {label} + rebuild ({granularity.value}, a={ratio:g})"] = Run(base)
            if init is InitMethod.SPARSEGPT:  # the rebuild otherwise starts from the dense values
                runs[f"{init.value} {label} + rebuild ({granularity.value}, a={ratio:g}), retain reconstruction"] = Run(
                    replace(base, retain_reconstruction=True)
                )
    return runs


def sweep() -> dict[str, Run]:
    """Rebuild settings on Wanda 50%: ratio x granularity, the metric, the calibration sampling and size,
    and the micro-batch (the order of float32 sums)."""
    base = PruneSettings(sparsity=0.5, init=InitMethod.WANDA)
    runs: dict[str, Run] = {"wanda 50%": Run(replace(base, rebuild=False))}
    for ratio in (0.01, 0.05, 0.1, 0.3):
        for granularity in Granularity:
            runs[f"wanda 50% + rebuild ({granularity.value}, a={ratio:g})"] = Run(
                replace(base, ratio=ratio, granularity=granularity)
            )
    for metric in (Metric.W, Metric.G):  # wg at row, a=0.1 is in the grid above
        runs[f"wanda 50% + rebuild (row, a=0.1, metric {metric.value})"] = Run(
            replace(base, ratio=0.1, granularity=Granularity.ROW, metric=metric)
        )
    for ratio in (0.01, 0.05, 0.3):
        runs[f"wanda 50% + rebuild (row, a={ratio:g}, metric w)"] = Run(
            replace(base, ratio=ratio, granularity=Granularity.ROW, metric=Metric.W)
        )
    for granularity in (Granularity.BLOCK, Granularity.LAYER, Granularity.COLUMN):
        runs[f"wanda 50% + rebuild ({granularity.value}, a=0.1, metric w)"] = Run(
            replace(base, ratio=0.1, granularity=granularity, metric=Metric.W)
        )
    for seed in SEEDS:  # how much of a difference is the sampling of the calibration windows?
        runs[f"wanda 50%, seed {seed}"] = Run(replace(base, rebuild=False), seed=seed)
        for granularity, ratio, metric in ((Granularity.ROW, 0.01, Metric.WG), (Granularity.COLUMN, 0.01, Metric.WG),
                                           (Granularity.ROW, 0.05, Metric.W)):
            runs[f"wanda 50% + rebuild ({granularity.value}, a={ratio:g}, metric {metric.value}), seed {seed}"] = Run(
                replace(base, ratio=ratio, granularity=granularity, metric=metric), seed=seed
            )
    for label, settings in (("wanda 50%", replace(base, rebuild=False)), ("wanda 50% + rebuild (row, a=0.01)", base)):
        # float32 sums in another order: the micro-batch (set by the memory plan) is 4 samples here by default
        runs[f"{label}, micro-batches of 16 samples"] = Run(replace(settings, batch_size=16))
    for n in CALIB_SIZES:
        runs[f"wanda 50%, {n} calibration windows"] = Run(replace(base, rebuild=False), n)
        for metric in (Metric.WG, Metric.W):
            runs[f"wanda 50% + rebuild (row, a=0.1, metric {metric.value}), {n} calibration windows"] = Run(
                replace(base, ratio=0.1, granularity=Granularity.ROW, metric=metric), n
            )
    return runs


RECIPE_SEEDS = (0, 1, 2)


def recipes() -> dict[str, Run]:
    """Per pattern and calibration seed: Wanda, SparseGPT, the paper's recipe, and the re-fit recipes."""
    runs: dict[str, Run] = {"dense": Run(None)}
    for seed in RECIPE_SEEDS:
        tag = "" if seed == 0 else f", seed {seed}"
        for label, pattern in PATTERNS.items():
            sparsity = 1 - pattern.n / pattern.m if pattern.structured else 0.5
            ratio, granularity = default_rebuild(InitMethod.WANDA, pattern)
            paper = PruneSettings(sparsity=sparsity, pattern=pattern, ratio=ratio, granularity=granularity)
            wanda = replace(paper, rebuild=False)
            sgpt = replace(wanda, init=InitMethod.SPARSEGPT)
            configs = {
                f"wanda {label}": wanda,
                f"sparsegpt {label}": sgpt,
                f"paper (wanda + rebuild) {label}": paper,
                f"wanda {label} + refit layer": replace(wanda, reconstruct=Reconstruct.LAYER),
                f"wanda {label} + refit subblock": replace(wanda, reconstruct=Reconstruct.SUBBLOCK),
                f"paper {label} + refit subblock": replace(paper, reconstruct=Reconstruct.SUBBLOCK),
                f"sparsegpt {label} + refit subblock": replace(sgpt, reconstruct=Reconstruct.SUBBLOCK),
            }
            runs.update({name + tag: Run(settings, seed=seed) for name, settings in configs.items()})
    return runs


def calibration_loss(report: dict) -> float | None:
    """Geometric mean over sub-blocks of the final sub-block output error on the calibration windows
    (against the dense sub-block on the same input); None where the run records none."""
    logs = [math.log(sb["loss_after"]) for b in report["blocks"] for sb in b["subblocks"] if sb.get("loss_after")]
    return math.exp(sum(logs) / len(logs)) if logs else None


def wiki_halves(text: str) -> tuple[str, str]:
    """The Wikipedia excerpt split between its articles (lines "= Title ="): (first half, second half)."""
    starts = [m.start() for m in re.finditer(r"^= [^=].* =$", text, flags=re.M)]
    cut = starts[len(starts) // 2] if len(starts) > 1 else len(text) // 2
    return text[:cut], text[cut:]


def reconstruction_ratio(report: dict) -> float | None:
    """Geometric mean over sub-blocks of the calibration reconstruction loss after the rebuild over
    the loss before it (below 1: the rebuild fits the calibration data better)."""
    logs = [
        math.log(sb["loss_after"] / sb["loss_before"])
        for block in report["blocks"] for sb in block["subblocks"]
        if sb["loss_before"] > 0 and sb["loss_after"] > 0
    ]
    return math.exp(sum(logs) / len(logs)) if logs else None


def markdown(results: dict, meta: dict) -> str:
    """Every configuration run, one row each."""
    caption = (
        f"SmolLM2-135M, calibration: {meta['nsamples']} x {meta['seqlen']} tokens of {meta['calib_name']} "
        f"(seed {meta['seed']}); perplexity on {meta['eval_windows']} held-out windows of {meta['eval_seqlen']} "
        f"tokens of {meta['eval_name']}, no BOS, {meta['dtype']} on {meta['device']}."
    )
    header = ["configuration", "perplexity", "swaps", "calibration loss after / before the rebuild", "prune time (s)"]
    rows = [
        [
            name, _ppl(r["ppl"]), "" if r.get("swaps") is None else str(r["swaps"]),
            "" if r.get("recon_ratio") is None else f"{r['recon_ratio']:.4f}",
            "" if r.get("seconds") is None else f"{r['seconds']:.0f}",
        ]
        for name, r in results.items()
    ]
    return "\n".join(_table(caption, header, rows))


def recipe_tables(results: dict, meta: dict) -> str:
    """The recipes set: per configuration and pattern, the perplexity at each calibration seed and its ratio to
    the better of Wanda and SparseGPT at the same seed; then calibration loss, prune time and peak RSS (seed 0)."""
    by: dict[tuple[str, str], dict[int, dict]] = {}
    for name, r in results.items():
        base, _, seed = name.partition(", seed ")
        for label in PATTERNS:
            if f" {label}" in base:
                by.setdefault((base.replace(f" {label}", ""), label), {})[int(seed or 0)] = r
    if not by:
        return ""
    configs = list(dict.fromkeys(c for c, _ in by))
    seeds = sorted({s for runs in by.values() for s in runs})

    def cell(config: str, label: str) -> str:
        runs, out = by.get((config, label), {}), []
        for s in seeds:
            if s not in runs:
                continue
            best = min((by.get((b, label), {}).get(s, {}).get("ppl", math.inf) for b in ("wanda", "sparsegpt")))
            ratio = f" ({runs[s]['ppl'] / best:.3f})" if math.isfinite(best) else ""
            out.append(f"{runs[s]['ppl']:.2f}{ratio}")
        return " / ".join(out)

    caption = (f"Perplexity at calibration seeds {', '.join(map(str, seeds))} (in brackets: over the better of Wanda "
               f"and SparseGPT at that seed); calibration {meta['nsamples']} x {meta['seqlen']} tokens of "
               f"{meta['calib_name']}, {meta['eval_windows']} x {meta['eval_seqlen']} held-out tokens of "
               f"{meta['eval_name']}.")
    out = _table(caption, ["configuration", *PATTERNS], [[c, *(cell(c, p) for p in PATTERNS)] for c in configs])

    def cost(config: str, label: str) -> str:
        r = by.get((config, label), {}).get(0)
        if r is None:
            return ""
        loss = "" if r.get("calib_loss") is None else f"{r['calib_loss']:.3g}, "
        return f"{loss}{r['seconds']:.0f} s"

    out += _table("Seed 0: calibration loss (geometric mean over sub-blocks of the output error against the dense "
                  "sub-block) and prune time (in-process; peak memory per run: tools/experiments/recipe_cost.py).",
                  ["configuration", *PATTERNS],
                  [[c, *(cost(c, p) for p in PATTERNS)] for c in configs])
    return "\n".join(out)


def grids(results: dict, meta: dict) -> str:
    """The rebuild runs on the default calibration as ratio x granularity tables, one per metric and
    initial method x pattern, next to the same mask without the rebuild."""
    cells: dict[tuple[str, str], dict[tuple[float, str], float]] = {}
    plain: dict[str, float] = {}
    for r in results.values():
        s = r.get("settings")
        if not _default_run(r, meta, "nsamples", "seed"):
            continue
        mask = _mask_and_rebuild(s)[0]
        if not s["rebuild"]:
            plain[mask] = r["ppl"]
            continue
        cells.setdefault((mask, s["metric"]), {})[s["ratio"], s["granularity"]] = r["ppl"]
    out = []
    for (mask, metric), table in cells.items():
        ratios = sorted({k[0] for k in table})
        grans = [g.value for g in Granularity if any(k[1] == g.value for k in table)]
        if len(ratios) * len(grans) < 4:
            continue
        base = plain.get(mask)
        out += _table(
            f"{mask} + rebuild, metric {metric}: perplexity by ratio (rows) and granularity (columns)"
            + (f"; without the rebuild {base:.2f}." if base is not None else "."),
            ["a", *grans], [[f"{a:g}", *(_ppl(table.get((a, g))) for g in grans)] for a in ratios],
        )
    return "\n".join(out)


def _default_run(r: dict, meta: dict, *keys: str) -> bool:
    """Whether `r` is a pruning run with the default values of `keys` and the automatic micro-batch."""
    s = r.get("settings")
    return bool(s) and s.get("batch_size", 0) == 0 and all(r.get(k, meta[k]) == meta[k] for k in keys)


def _ppl(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _table(caption: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """A captioned markdown table, as lines (with a blank line after it)."""
    lines = [caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def _mask_and_rebuild(s: dict) -> tuple[str, str]:
    """(initial mask, rebuild) labels of a run's settings."""
    mask = f"{s['init']} {s['sparsity'] * 100:g}%" if s["pattern"] == "unstructured" else f"{s['init']} {s['pattern']}"
    rebuild = f"+ rebuild ({s['granularity']}, a={s['ratio']:g}, {s['metric']})" if s["rebuild"] else "no rebuild"
    return mask, rebuild


def axis_tables(results: dict, meta: dict) -> str:
    """Runs that vary the number of calibration windows or their sampling seed, as tables: one row
    per value (the default value included), one column per configuration."""
    out = []
    for key, title in (("nsamples", "calibration windows"), ("seed", "calibration seed")):
        other = "seed" if key == "nsamples" else "nsamples"
        varied = [r for r in results.values() if _default_run(r, meta, other) and r.get(key, meta[key]) != meta[key]]
        columns = list(dict.fromkeys(_mask_and_rebuild(r["settings"]) for r in varied))
        if not columns:
            continue
        cells = {}
        for r in results.values():
            if _default_run(r, meta, other):
                cells[r.get(key, meta[key]), _mask_and_rebuild(r["settings"])] = r["ppl"]
        values = sorted({v for v, _ in cells if any((v, c) in cells for c in columns)})
        out += _table(
            f"Perplexity by {title} ({title} {meta[key]} is the default of the other tables).",
            [title, *(f"{m} {rb}" for m, rb in columns)],
            [[str(v), *(_ppl(cells.get((v, c))) for c in columns)] for v in values],
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", choices=["main", "sweep", "recipes"], default="main")
    p.add_argument("--protocol", choices=["botchan", "wiki-halves"], default="botchan",
                   help="calibration text: Botchan, or the second half of the Wikipedia articles (see above)")
    p.add_argument("--only", default=None, help="run only configurations whose name matches this regular expression")
    p.add_argument("--rerun", action="store_true", help="run the selected configurations again even if cached")
    p.add_argument("--ckpt", default=None, help="model (default: the fetched SmolLM2-135M)")
    p.add_argument("--calib", default=None, help="calibration text (default: Botchan)")
    p.add_argument("--eval", default=None, help="evaluation text (default: the Wikipedia excerpt)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    stem = (
        "runs/quality" if (args.set, args.protocol) == ("main", "botchan")
        else f"runs/quality-{args.set}-{args.protocol}"
    )
    args.json, args.markdown = args.json or stem + ".json", args.markdown or stem + ".md"

    ckpt_dir = Path(args.ckpt) if args.ckpt else assets.smollm2_dir()
    eval_text = Path(args.eval) if args.eval else assets.wiki_text_path()
    calib = Path(args.calib) if args.calib else assets.botchan_path()
    eval_source = eval_text.read_text(encoding="utf-8")
    if args.protocol == "wiki-halves":
        eval_source, calib_source = wiki_halves(eval_source)
        calib = Path(args.json).with_suffix(".calib.txt")
        calib.parent.mkdir(parents=True, exist_ok=True)
        calib.write_text(calib_source, encoding="utf-8")
    dtype = getattr(torch, args.dtype)
    ckpt = Checkpoint.open(ckpt_dir)
    tok = load_tokenizer(ckpt_dir)
    calib_ids: dict[tuple[int, int], torch.Tensor] = {}

    def calibration(nsamples: int, seed: int) -> torch.Tensor:
        if (nsamples, seed) not in calib_ids:
            calib_ids[nsamples, seed] = load_calibration(
                calib, tok.encode, nsamples=nsamples, seqlen=args.seqlen, seed=seed,
                vocab_size=ckpt.config.vocab_size,
            )
        return calib_ids[nsamples, seed]

    eval_ids = tok.encode_prefix(eval_source, args.eval_windows * args.eval_seqlen)
    meta = {
        "model": str(ckpt_dir), "calib": str(calib), "calib_name": calib.name, "eval": str(eval_text),
        "eval_name": eval_text.name + (" (first half of the articles)" if args.protocol == "wiki-halves" else ""),
        "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
        "eval_seqlen": args.eval_seqlen, "eval_windows": args.eval_windows, "device": args.device, "dtype": args.dtype,
    }

    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    stored = json.loads(json_path.read_text()) if json_path.exists() else {}
    results = stored.get("results", {}) if stored.get("meta") == meta else {}

    def evaluate(path: Path) -> float:
        return perplexity(
            Checkpoint.open(path), eval_ids, seqlen=args.eval_seqlen, max_windows=args.eval_windows,
            device=args.device, dtype=dtype, progress=False,
        ).ppl

    runs = {"main": main_table, "sweep": sweep, "recipes": recipes}[args.set]()
    def stale(name: str) -> bool:
        """A cached result of this name made with other settings (an older default): run again, do not show."""
        run = runs[name]
        return run.settings is not None and name in results and results[name].get("settings") != replace(
            run.settings, device=args.device, dtype=dtype).describe()

    for name, run in runs.items():
        if args.only and not re.search(args.only, name):
            continue
        if name in results and not args.rerun and not stale(name):
            print(f"{name}: {results[name]['ppl']:.2f} (cached)", flush=True)
            continue
        started = time.perf_counter()
        if run.settings is None:
            results[name] = {"ppl": evaluate(ckpt_dir)}
        else:
            settings = replace(run.settings, device=args.device, dtype=dtype)
            nsamples = run.nsamples or args.nsamples
            seed = args.seed if run.seed is None else run.seed
            with tempfile.TemporaryDirectory(prefix="barber-quality-") as tmp:
                out = Path(tmp) / "out"
                report = prune_checkpoint(
                    Checkpoint.open(ckpt_dir), out, settings, calibration(nsamples, seed), progress=False
                ).to_json()
                results[name] = {
                    "ppl": evaluate(out),
                    "swaps": report["swaps"] if settings.rebuild else None,
                    "seconds": report["seconds"]["total"],
                    "recon_ratio": reconstruction_ratio(report) if settings.rebuild else None,
                    "calib_loss": calibration_loss(report),
                    "row_sparsity": report["row_sparsity"],
                    "nsamples": nsamples,
                    "seed": seed,
                    "settings": settings.describe(),
                }
                shutil.rmtree(out, ignore_errors=True)
        print(f"{name}: {results[name]['ppl']:.2f} ({time.perf_counter() - started:.0f} s)", flush=True)
        json_path.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    ordered = {k: results[k] for k in runs if k in results and not stale(k)}
    if args.set == "recipes":
        tables = [recipe_tables(ordered, meta)]
    else:
        tables = [grids(ordered, meta), axis_tables(ordered, meta)]
    text = "\n".join([markdown(ordered, meta), *tables])
    Path(args.markdown).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
