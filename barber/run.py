"""A whole pruning run on files: resume, the block loop and its commit policy, the report.

`prune_checkpoint` prunes a checkpoint into an output directory (its layout, checks, lock, block
store, assembly and publication are `barber.output`'s) and returns the report, also written there
last. A run killed at any moment (SIGKILL included) is continued by the same command, from the
last finished block, and gives byte-identical files: every file is written under a temporary
name, fsynced and renamed, so a file that exists is complete; the block loop is deterministic
given the saved hidden states and the micro-batch, which a resume keeps. The resume state
(`barber.state`) is committed after every block, or every `--state-interval` seconds, and always
before stopping on a signal. After the report is written, the work directory is removed.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from barber import __version__
from barber.budget import MemoryBudget
from barber.checkpoint import Checkpoint
from barber.errors import RESUME_HINT, OutputError, StateError, UsageError
from barber.output import (
    REPORT_FILE,
    STAGE_DIR,
    STATE_FILE,
    WORK_DIR,
    BlockStore,
    StopCheck,
    assemble,
    check_stop,
    clear_dir,
    inspect_output,
    kill_point,
    locked,
    make_dir,
    publish,
    remove_temporaries,
)
from barber.packed import SaveFormat
from barber.pipeline import BlockState, Pruner
from barber.report import BlockReport, RunReport
from barber.settings import PruneSettings
from barber.state import Fingerprint, SavedState, fingerprint, load_hidden, load_state, save_state
from barber.writer import copy_side_files, fsync_dir, write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """How a run treats its output directory, progress, stops, memory and resume states (never the values).

    Attributes:
        overwrite: replace a previous result or interrupted run in the output directory.
        resume: require an interrupted run to continue (one is continued anyway when it matches).
        progress: show tqdm bars.
        should_stop: polled after every block and output shard; a signal number stops the run.
        budget: memory budgets (None: automatic).
        state_interval: commit the resume state at most every this many seconds (0: after every block).
    """

    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    should_stop: StopCheck | None = None
    budget: MemoryBudget | None = None
    state_interval: float = 0.0
    save: SaveFormat | None = None  # how the output is stored (barber.packed); None: dense, input dtypes


def _resume_state(work: Path, fp: Fingerprint, out_dir: Path) -> SavedState:
    """The saved state of an interrupted run in `work`, if it matches `fp`; otherwise a UsageError."""
    try:
        saved = load_state(work / STATE_FILE)
    except StateError as exc:
        raise UsageError(
            f"cannot resume the run in {out_dir}: its saved state is damaged ({exc}); "
            "add --overwrite to start over"
        ) from None
    differences = fp.differences(saved.fingerprint)
    if differences:
        raise UsageError(
            f"--out {out_dir} holds an interrupted run with {'; '.join(differences)}; "
            "rerun the original command to resume it, or add --overwrite to start over"
        )
    return saved


def prune_checkpoint(
    ckpt: Checkpoint,
    out_dir: Path,
    settings: PruneSettings,
    calib_ids: torch.Tensor,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    extra_report: dict | None = None,
    should_stop: StopCheck | None = None,
    budget: MemoryBudget | None = None,
    state_interval: float = 0.0,
    save: SaveFormat | None = None,
) -> RunReport:
    """Prune `ckpt` into `out_dir`, block by block, and return the report (also written there, as JSON).

    The keyword options are those of `RunOptions`; `extra_report` is merged into the report.
    `budget` bounds memory (`barber.budget`; default automatic); the report's `memory` holds the plan and peaks.

    An interrupted run in `out_dir` is resumed when its fingerprint matches (`resume` only makes
    that explicit: it is an error when there is nothing to resume); `overwrite` discards it.
    The resume state is committed after every block, or, with `state_interval` > 0, after a block
    when that many seconds have passed since the last commit (a resume then redoes at most that
    much work; the output is the same). `should_stop` is polled after every block (and output
    shard): a signal number commits the state and stops the run with `Interrupted`.

    Raises:
        UsageError: see `inspect_output`; a fingerprint mismatch or a damaged state.
        OutputError: a file could not be written (the run stays resumable).
        Interrupted: `should_stop` asked to stop.
    """
    opts = RunOptions(overwrite, resume, progress, should_stop, budget, state_interval, save)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    inspect_output(ckpt.path, out_dir, overwrite=overwrite, resume=resume)  # before creating anything
    make_dir(out_dir)
    with locked(out_dir):
        work, fp, saved = _prepare(ckpt, out_dir, settings, calib_ids, opts)
        try:
            result = _run(ckpt, out_dir, work, settings, calib_ids, fp, saved, opts)
            report = build_report(ckpt, settings, result.blocks, calib_ids, dict(extra_report or {}))
            _add_run_facts(report, result, settings, time.perf_counter() - started)
            write_json_atomic(out_dir / REPORT_FILE, report.to_json())  # the completion marker
            fsync_dir(out_dir)
        except OutputError as exc:
            raise OutputError(f"{exc} (finished blocks are kept: fix this and {RESUME_HINT})") from None
        except StateError as exc:
            raise UsageError(f"cannot resume the run in {out_dir}: {exc}; add --overwrite to start over") from None
        shutil.rmtree(work, ignore_errors=True)
    return report


def _prepare(
    ckpt: Checkpoint, out_dir: Path, settings: PruneSettings, calib_ids: torch.Tensor, opts: RunOptions
) -> tuple[Path, Fingerprint, SavedState | None]:
    """With `out_dir` locked: the work directory, the run's fingerprint and the state to resume (if any).

    `out_dir` is inspected again (another run may have changed it before the lock), cleared on a
    restart, and the work directory is rid of what a killed process left half written.
    """
    plan = inspect_output(ckpt.path, out_dir, overwrite=opts.overwrite, resume=opts.resume)
    fp = fingerprint(ckpt, calib_ids, settings.describe())
    work = out_dir / WORK_DIR
    saved = _resume_state(work, fp, out_dir) if plan == "resume" else None
    if plan == "restart":
        log.info("clearing %s", out_dir)
        clear_dir(out_dir)
    make_dir(work)
    remove_temporaries(work)
    for scratch in work.glob("*.bin"):  # disk-backed hidden states of a killed process
        scratch.unlink()
    return work, fp, saved


def _add_run_facts(report: RunReport, result: RunResult, settings: PruneSettings, total_seconds: float) -> None:
    """Put what only the whole run knows into `report`: run-level times, output bytes, memory, resume point."""
    report.seconds.update(embed=result.embed_seconds, assemble=result.assemble_seconds,
                          save_state=result.save_state_seconds, total=total_seconds)
    report.output_bytes = result.output_bytes
    report.memory = result.memory
    report.resumed_at_block = result.resumed_at
    if settings.device.startswith("cuda"):
        report.peak_gpu_memory = torch.cuda.max_memory_allocated()


@dataclass
class RunResult:
    """What the loop and assembly hand to the report."""

    blocks: list[BlockReport]
    output_bytes: int
    embed_seconds: float
    assemble_seconds: float
    resumed_at: int  # first block computed by this process (0: not resumed)
    memory: dict | None = None  # HiddenStates.memory_report(): the memory plan and the peaks reached
    save_state_seconds: float = 0.0  # writing resume states


def _block_loop(
    pruner: Pruner, ckpt: Checkpoint, work: Path, calib_ids: torch.Tensor, fp: Fingerprint,
    saved: SavedState | None, opts: RunOptions,
) -> tuple[BlockState, float, float]:
    """Prune every block not done yet (long: the commit policy below shares the loop's state).

    Returns the final state, the embedding seconds and the state-saving seconds.

    The state is committed after a block when `opts.state_interval` seconds have passed since the last
    commit (0: after every block), always after the last block and before stopping on a signal.
    """
    progress, should_stop, state_interval = opts.progress, opts.should_stop, opts.state_interval
    n = ckpt.num_layers
    store = BlockStore(work, ckpt)
    plan = pruner.prepare(*calib_ids.shape).plan  # asked once: placement and micro-batch
    if saved is not None:
        log.info("resuming the run in %s at block %d of %d", work.parent, saved.next_block, n)
        store.adopt(range(saved.next_block), require=saved.next_block < n)
        on_device = plan.hidden_placement == "device"
        hidden = load_hidden(saved, pruner.settings.device if on_device else None)
        state = BlockState(saved.next_block, hidden, saved.blocks)
        embed_seconds = float(saved.extra.get("embed_seconds", 0.0))
        micro_batch = plan.micro_batch
        if micro_batch != saved.extra.get("micro_batch", micro_batch):
            log.warning(
                "the memory budget allows micro-batches of %d samples, the interrupted run used %d: the output "
                "may differ from an uninterrupted run in the last bits", micro_batch, saved.extra["micro_batch"],
            )
    else:
        t0 = time.perf_counter()
        state = pruner.start(calib_ids)
        embed_seconds = time.perf_counter() - t0

    bar = tqdm(total=n, initial=state.next_block, desc="pruning", unit="block", disable=not progress)
    saved_at, save_seconds = time.monotonic(), 0.0

    def commit(state: BlockState) -> None:
        nonlocal saved_at, save_seconds
        t0 = time.perf_counter()
        last = state.next_block == n
        save_state(
            work / STATE_FILE, next_block=state.next_block, num_blocks=n, blocks=state.blocks,
            hidden=None if last else state.hidden, fp=fp,
            extra={"embed_seconds": embed_seconds, "micro_batch": plan.micro_batch},
        )
        fsync_dir(work)  # the block files' and the state's renames survive a power cut
        save_seconds += time.perf_counter() - t0
        saved_at = time.monotonic()
        kill_point(f"state:{state.next_block}")

    def stop_requested() -> int | None:
        return should_stop() if should_stop else None

    while state.next_block < n:
        state = pruner.run_block(state, store.write)
        committed = state.next_block == n or stop_requested() or time.monotonic() - saved_at >= state_interval
        if committed:
            commit(state)
        bar.update(1)
        signum = stop_requested()  # polled again: a signal may have come while the state was written
        if signum and state.next_block < n:
            if not committed:
                commit(state)
            check_stop(should_stop, f"after block {state.next_block - 1} of {n}", signum)
    bar.close()
    state.hidden = None
    return state, embed_seconds, save_seconds


def _resumed_settings(settings: PruneSettings, saved: SavedState | None) -> PruneSettings:
    """The settings to continue `saved` with: its micro-batch, so samples are grouped as before.

    The automatic micro-batch follows the memory available at start, and the grouping of samples
    can change the last bits of batched sums; pinning it keeps a resumed run byte-identical.
    """
    micro_batch = saved.extra.get("micro_batch") if saved is not None else None
    if not isinstance(micro_batch, int) or micro_batch < 1:
        return settings
    return dataclasses.replace(settings, batch_size=micro_batch)


def _run(
    ckpt: Checkpoint, out_dir: Path, work: Path, settings: PruneSettings, calib_ids: torch.Tensor,
    fp: Fingerprint, saved: SavedState | None, opts: RunOptions,
) -> RunResult:
    """The block loop (from `saved` or from the embeddings), assembly and publication; returns report parts."""
    n = ckpt.num_layers
    if settings.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    pruner = Pruner(
        ckpt, _resumed_settings(settings, saved), progress=opts.progress, budget=opts.budget, work_dir=work
    )
    try:
        state, embed_seconds, save_seconds = _block_loop(pruner, ckpt, work, calib_ids, fp, saved, opts)
    finally:
        pruner.close()  # stop the prefetch thread, remove disk-backed hidden states
    resumed_at = saved.next_block if saved is not None else 0
    store = BlockStore(work, ckpt)
    store.adopt(range(n), require=False)

    layer_info = {}
    for block in state.blocks:
        for local, info in block.layers.items():
            layer_info[ckpt.block_tensor_name(block.block, local + ".weight")] = {
                "pattern": str(settings.pattern),
                "sparsity": info.sparsity,
            }
    t0 = time.perf_counter()
    stage = work / STAGE_DIR
    make_dir(stage)
    remove_temporaries(stage)
    copy_side_files(ckpt.path, stage, skip={REPORT_FILE})  # an input that is itself a barber result
    total_bytes = assemble(
        ckpt, store, stage, layer_info, done_dir=out_dir, should_stop=opts.should_stop, progress=opts.progress,
        save=opts.save,
    )
    publish(stage, out_dir)
    return RunResult(
        state.blocks, total_bytes, embed_seconds, time.perf_counter() - t0, resumed_at, pruner.states.memory_report(),
        save_seconds,
    )


def build_report(
    ckpt: Checkpoint, settings: PruneSettings, blocks: list[BlockReport], calib_ids: torch.Tensor, extra: dict
) -> RunReport:
    """The run report: settings, the blocks' reports (whose totals it derives), and `extra` at the top level."""
    nsamples, seqlen = int(calib_ids.shape[0]), int(calib_ids.shape[1])
    calibration = {"nsamples": nsamples, "seqlen": seqlen, **extra.pop("calibration", {})}
    return RunReport(str(ckpt.path), ckpt.family.name, settings.describe(), calibration, blocks, __version__,
                     extra=extra)
