"""The library entry point: load calibration, prune a checkpoint, measure perplexity (`prune_and_evaluate`).

The command line (`barber-stream`) and every tool call this, so what a run does is defined once:

    from barber import PruneSettings, prune_and_evaluate
    report = prune_and_evaluate("ckpt", "out", PruneSettings(), calib="botchan.txt", nsamples=32, seqlen=256,
                                eval_text="wiki.txt", eval_windows=16, eval_seqlen=512)
    report.eval["pruned"]["ppl"]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from barber.budget import MemoryBudget
from barber.calib import load_calibration
from barber.checkpoint import Checkpoint
from barber.distributed import World
from barber.errors import DataError, UsageError
from barber.evaluate import PerplexityResult, perplexity
from barber.layout import REPORT_FILE
from barber.output import StopCheck, inspect_output
from barber.packed import SaveFormat
from barber.report import RunReport
from barber.run import prune_checkpoint
from barber.settings import PruneSettings
from barber.tokenizer import load_tokenizer
from barber.writer import write_json_atomic

__all__ = ["Evaluation", "check_pattern_fits", "dense_bytes", "prune_and_evaluate", "read_text", "summary"]


@dataclass(frozen=True)
class Evaluation:
    """What to measure the perplexity on: the first `windows` windows of `seqlen` tokens of `text`
    (all windows for None; `seqlen` None = the calibration's), and whether the input too (`dense`)."""

    text: str | Path
    windows: int | None = None
    seqlen: int | None = None
    dense: bool = False


def check_pattern_fits(ckpt: Checkpoint, settings: PruneSettings) -> None:
    """An N:M pattern needs every linear's input width divisible by M (UsageError otherwise)."""
    pattern = settings.pattern
    if not pattern.structured:
        return
    for name, shape in ckpt.family.block_shapes(ckpt.config).items():
        if name.endswith(".weight") and name.rsplit(".", 1)[0] in ckpt.family.linears and shape[1] % pattern.m:
            raise UsageError(f"--pattern {pattern}: {name} has {shape[1]} input columns, not divisible by {pattern.m}")


def read_text(path: str | Path) -> str:
    """The text of an evaluation file; missing or unreadable is a DataError."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such text file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read text ({exc})") from None


def prune_and_evaluate(
    ckpt: str | Path | Checkpoint,
    out: str | Path,
    settings: PruneSettings,
    calib: str | Path | torch.Tensor,
    *,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    evaluation: Evaluation | None = None,
    budget: MemoryBudget | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    should_stop: StopCheck | None = None,
    state_interval: float = 0.0,
    save: SaveFormat | None = None,
    say: Callable[[str], None] | None = None,
    world: World | None = None,
) -> RunReport | None:
    """Prune `ckpt` into `out` calibrated on `calib`, optionally measure perplexity (long: its arguments).

    Args:
        calib: a calibration file (see `barber.calib.load_calibration`) or token ids [nsamples, seqlen].
        nsamples, seqlen, seed: the calibration windows drawn from a file.
        evaluation: perplexity of the result (and of the input, `dense`) on held-out text; the
            report then has an "eval" section.
        budget, overwrite, resume, should_stop, state_interval, save: see `barber.run.prune_checkpoint`;
            with `save`, the report's "save" section has its format, dtype and `dense_bytes`, the size of
            the dense output in that dtype (its `output_bytes` are what was written).
        say: receives one line per result as it is known (the CLI prints them).
        world: this process's rank in a data-parallel run (`barber.distributed`; default: one
            process). Rank 0 alone touches `out`, evaluates and says; the others only prune.

    Returns:
        The run report (`RunReport.to_json()` is what `out/barber_report.json` holds); None on
        ranks other than 0.

    Raises:
        BarberError subclasses, each a one-line message (see `barber.errors`).
    """
    ckpt = ckpt if isinstance(ckpt, Checkpoint) else Checkpoint.open(ckpt)
    out = Path(out)
    world = world or World.solo()
    if world.decides:
        inspect_output(ckpt.path, out, overwrite=overwrite, resume=resume)  # fail before the slow parts
    else:
        evaluation, say = None, None
    check_pattern_fits(ckpt, settings)
    extra: dict = {}
    if save is not None and not save.is_default:
        save.check(settings.pattern, ckpt.info(ckpt.block_tensor_name(0, ckpt.family.linears[0] + ".weight")).dtype)
        extra["save"] = {**save.describe(), "dense_bytes": dense_bytes(ckpt, save.dtype)}
    tokenizer = load_tokenizer(ckpt.path)
    if isinstance(calib, torch.Tensor):
        ids, source = calib, "token ids"
    else:
        ids = load_calibration(
            Path(calib), tokenizer.encode, nsamples=nsamples, seqlen=seqlen, seed=seed,
            vocab_size=ckpt.config.vocab_size,
        )
        source = str(calib)
    measure = _evaluator(evaluation, tokenizer, ids.shape[1], settings, progress)
    dense = measure(ckpt) if evaluation is not None and evaluation.dense else None
    if dense is not None and say:
        say(f"dense perplexity {dense.ppl:.4f} ({_windows(dense)} of {evaluation.text})")
    report = prune_checkpoint(
        ckpt, out, settings, ids, overwrite=overwrite, resume=resume, progress=progress,
        extra_report={"calibration": {"source": source, "seed": seed}, **extra}, should_stop=should_stop,
        budget=budget, state_interval=state_interval, world=world, save=save,
    )
    if report is None:  # not rank 0
        return None
    if say:
        say(summary(ckpt.num_layers, settings, report, out))
    if evaluation is not None:
        result = measure(Checkpoint.open(out))
        report.eval = {"pruned": result.to_dict(), "dense": dense.to_dict() if dense else None}
        write_json_atomic(out / REPORT_FILE, report.to_json())
        if say:
            say(f"pruned perplexity {result.ppl:.4f} ({_windows(result)} of {evaluation.text})")
    return report


def dense_bytes(ckpt: Checkpoint, dtype: torch.dtype | None = None) -> int:
    """Data bytes of `ckpt`'s tensors stored dense, floating ones in `dtype` (None: as stored)."""
    total = 0
    for name in ckpt.tensor_names:
        info = ckpt.info(name)
        itemsize = dtype.itemsize if dtype is not None and info.dtype.is_floating_point else info.dtype.itemsize
        total += itemsize * math.prod(info.shape)
    return total


def _evaluator(
    evaluation: Evaluation | None, tokenizer, calib_seqlen: int, settings: PruneSettings, progress: bool
) -> Callable[[Checkpoint], PerplexityResult]:
    """checkpoint -> its perplexity on the evaluation windows (tokenized once, here)."""
    if evaluation is None:
        return lambda checkpoint: None
    seqlen = evaluation.seqlen or calib_seqlen
    needed = None if evaluation.windows is None else evaluation.windows * seqlen
    ids = tokenizer.encode_prefix(read_text(evaluation.text), needed)

    def measure(checkpoint: Checkpoint) -> PerplexityResult:
        return perplexity(
            checkpoint, ids, seqlen=seqlen, max_windows=evaluation.windows, device=settings.device,
            dtype=settings.dtype, progress=progress,
        )

    return measure


def _windows(result: PerplexityResult) -> str:
    return f"{result.n_windows} windows of {result.tokens // result.n_windows + 1} tokens"


def summary(blocks: int, settings: PruneSettings, report: RunReport, out: Path) -> str:
    """One line saying what the run did."""
    method = f"{settings.pattern}, {settings.init.value}"
    if settings.rebuild:
        method += f" + rebuild ({settings.granularity.value}, alpha {settings.ratio:g}): {report.swaps} swaps"
    else:
        method += ", no rebuild"
    if settings.reconstruct.value != "none":
        method += f", {settings.reconstruct.value} re-fit"
    resumed = f" (resumed at block {report.resumed_at_block})" if report.resumed_at_block else ""
    lo, hi = report.row_sparsity
    rows = f", rows {lo:.4f} to {hi:.4f}" if hi - lo > 1e-12 else ""
    save, stored = report.extra.get("save"), ""
    if save and save.get("dense_bytes"):
        stored = (f", {save['format']} {report.output_bytes / 1e6:.1f} MB = "
                  f"{report.output_bytes / save['dense_bytes']:.3f} of dense {save['dense_bytes'] / 1e6:.1f} MB")
    return (
        f"pruned {blocks} blocks{resumed} to sparsity {report.sparsity:.4f}{rows} ({method}) "
        f"in {report.seconds['total']:.1f} s, "
        f"peak RSS {report.peak_rss / 2**30:.2f} GiB{stored} -> {out}"
    )
