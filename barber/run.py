"""A whole pruning run on files: resume, the block loop and its commit policy, the report.

`prune_checkpoint` prunes a checkpoint into an output directory (its layout, checks, lock, block
store, assembly and publication are `barber.output`'s) and returns the report, also written there
last. A run killed at any moment (SIGKILL included) is continued by the same command, from the
last finished block, and gives byte-identical files: every file is written under a temporary
name, fsynced and renamed, so a file that exists is complete; the block loop is deterministic
given the saved hidden states, whatever the micro-batch or the number of ranks (`barber.fold`). The resume state
(`barber.state`) is committed after every block, or every `--state-interval` seconds, and always
before stopping on a signal. After the report is written, the work directory is removed.
"""

from __future__ import annotations

import contextlib
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
from barber.buffers import HiddenBuffer
from barber.checkpoint import Checkpoint
from barber.distributed import World
from barber.errors import RESUME_HINT, BarberError, DistributedError, OutputError, StateError, UsageError
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
    world: World | None = None,
    save: SaveFormat | None = None,
) -> RunReport | None:
    """Prune `ckpt` into `out_dir`, block by block, and return the report (also written there, as JSON).

    The keyword options are those of `RunOptions`; `extra_report` is merged into the report.
    `budget` bounds memory (`barber.budget`; default automatic); the report's `memory` holds the plan and peaks.

    An interrupted run in `out_dir` is resumed when its fingerprint matches (`resume` only makes
    that explicit: it is an error when there is nothing to resume); `overwrite` discards it.
    The resume state is committed after every block, or, with `state_interval` > 0, after a block
    when that many seconds have passed since the last commit (a resume then redoes at most that
    much work; the output is the same). `should_stop` is polled after every block (and output
    shard): a signal number commits the state and stops the run with `Interrupted`.

    `world` makes this one rank of a data-parallel run (`barber.distributed`): every rank calls
    this with the same arguments; rank 0 alone touches `out_dir` and returns the report, the other
    ranks return None. A resume may use any number of ranks.

    Raises:
        UsageError: see `inspect_output`; a fingerprint mismatch or a damaged state.
        OutputError: a file could not be written (the run stays resumable).
        Interrupted: `should_stop` asked to stop.
        DistributedError: a rank was lost (on ranks other than 0 also: rank 0 failed, with its exit code).
    """
    opts = RunOptions(overwrite, resume, progress, should_stop, budget, state_interval, save)
    world = world or World.solo()
    if not world.decides:
        return _follow(ckpt, settings, calib_ids, opts, world)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    with contextlib.ExitStack() as stack:
        try:
            inspect_output(ckpt.path, out_dir, overwrite=overwrite, resume=resume)  # before creating anything
            make_dir(out_dir)
            stack.enter_context(locked(out_dir))
            work, fp, saved = _prepare(ckpt, out_dir, settings, calib_ids, opts)
        except BarberError as exc:
            world.share(("error", exc.exit_code, str(exc)))
            raise
        start = _Resume() if saved is None else _Resume(
            saved.next_block, saved.blocks, float(saved.extra.get("embed_seconds", 0.0)), saved
        )
        world.share(("go", start.next_block))
        try:
            result = _run(ckpt, out_dir, work, settings, calib_ids, fp, start, opts, world)
            report = build_report(ckpt, settings, result.blocks, calib_ids, dict(extra_report or {}))
            _add_run_facts(report, result, settings, time.perf_counter() - started)
            report.extra["parallel"] = {
                "world_size": world.size, "backend": world.backend,
                "sample_groups": settings.groups(int(calib_ids.shape[0])),
                "bytes_sent": world.sent, "bytes_received": world.received,
            }
            write_json_atomic(out_dir / REPORT_FILE, report.to_json())  # the completion marker
            fsync_dir(out_dir)
        except OutputError as exc:
            raise OutputError(f"{exc} (finished blocks are kept: fix this and {RESUME_HINT})") from None
        except StateError as exc:
            raise UsageError(f"cannot resume the run in {out_dir}: {exc}; add --overwrite to start over") from None
        shutil.rmtree(work, ignore_errors=True)
    return report


def _follow(
    ckpt: Checkpoint, settings: PruneSettings, calib_ids: torch.Tensor, opts: RunOptions, world: World
) -> None:
    """A rank other than 0: wait for rank 0's start (or its error), then prune this rank's samples with it."""
    status = world.share()
    if status[0] == "error":
        _, code, message = status
        exc = DistributedError(f"rank {world.rank}: rank 0 stopped the run: {message}")
        exc.exit_code = code
        raise exc
    pruner = Pruner(ckpt, settings, progress=False, budget=opts.budget, world=world)
    try:
        _block_loop(pruner, ckpt, None, calib_ids, None, _Resume(status[1]), dataclasses.replace(opts, progress=False))
    finally:
        pruner.close()
    return None


def _prepare(
    ckpt: Checkpoint, out_dir: Path, settings: PruneSettings, calib_ids: torch.Tensor, opts: RunOptions
) -> tuple[Path, Fingerprint, SavedState | None]:
    """With `out_dir` locked: the work directory, the run's fingerprint and the state to resume (if any).

    `out_dir` is inspected again (another run may have changed it before the lock), cleared on a
    restart, and the work directory is rid of what a killed process left half written.
    """
    plan = inspect_output(ckpt.path, out_dir, overwrite=opts.overwrite, resume=opts.resume)
    fp = fingerprint(ckpt, calib_ids, settings.fingerprinted())
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
    pruner: Pruner, ckpt: Checkpoint, work: Path | None, calib_ids: torch.Tensor, fp: Fingerprint | None,
    resume: _Resume, opts: RunOptions,
) -> tuple[BlockState, float, float]:
    """Prune every block not done yet, on every rank (long: the commit policy below shares the loop's state).

    Returns the final state, the embedding seconds and the state-saving seconds.

    Rank 0 decides after each block whether to commit the state: when `opts.state_interval` seconds
    have passed since the last commit (0: after every block), always after the last block and before
    stopping on a signal; the other ranks follow its decisions (their hidden states travel to it
    for the commit). Only rank 0 writes files.
    """
    world = pruner.world
    progress, should_stop, state_interval = opts.progress, opts.should_stop, opts.state_interval
    n = ckpt.num_layers
    store = BlockStore(work, ckpt) if world.decides else None
    states = pruner.prepare(*calib_ids.shape)  # asked once: placement and micro-batch
    if resume.next_block:
        log.info("resuming at block %d of %d", resume.next_block, n)
        if store is not None:
            store.adopt(range(resume.next_block), require=resume.next_block < n)
        state = BlockState(resume.next_block, _resumed_hidden(pruner, resume), resume.blocks)
        embed_seconds = resume.embed_seconds
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
        hidden = None if last else (states.gathered(state.hidden) if world.distributed else state.hidden)
        if world.decides:
            save_state(
                work / STATE_FILE, next_block=state.next_block, num_blocks=n, blocks=state.blocks,
                hidden=hidden, fp=fp, extra={"embed_seconds": embed_seconds, "micro_batch": states.plan.micro_batch},
            )
            fsync_dir(work)  # the block files' and the state's renames survive a power cut
        save_seconds += time.perf_counter() - t0
        saved_at = time.monotonic()
        kill_point(f"state:{state.next_block}")

    def stop_requested() -> int:
        """Rank 0's answer to `should_stop`, on every rank."""
        signum = (should_stop() or 0) if (should_stop and world.decides) else 0
        return int(world.share(signum))

    while state.next_block < n:
        state = pruner.run_block(state, store.write if store is not None else _no_write)
        wanted = state.next_block == n or time.monotonic() - saved_at >= state_interval
        committed = bool(world.share(wanted)) or bool(stop_requested())
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


def _no_write(i: int, tensors: dict) -> None:
    """Ranks other than 0 write nothing."""


@dataclass
class _Resume:
    """Where a run starts: block 0, or the saved state of an interrupted run (its hidden states on rank 0)."""

    next_block: int = 0
    blocks: list[BlockReport] = dataclasses.field(default_factory=list)
    embed_seconds: float = 0.0
    saved: SavedState | None = None  # rank 0


def _resumed_hidden(pruner: Pruner, resume: _Resume) -> HiddenBuffer:
    """The saved hidden states of this rank's samples (read on rank 0, sent to the others)."""
    states, world = pruner.states, pruner.world
    on_device = states.plan.hidden_placement == "device"
    if not world.distributed:
        return load_hidden(resume.saved, pruner.settings.device if on_device else None)
    saved = load_hidden(resume.saved, None) if world.decides else None  # a mapping: read piece by piece
    return states.spread(saved, pruner.ckpt.config.hidden_size)


def _run(
    ckpt: Checkpoint, out_dir: Path, work: Path, settings: PruneSettings, calib_ids: torch.Tensor,
    fp: Fingerprint, start: _Resume, opts: RunOptions, world: World,
) -> RunResult:
    """Rank 0: the block loop (from `start`), assembly and publication; returns report parts."""
    n = ckpt.num_layers
    if settings.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    pruner = Pruner(ckpt, settings, progress=opts.progress, budget=opts.budget, work_dir=work, world=world)
    try:
        state, embed_seconds, save_seconds = _block_loop(pruner, ckpt, work, calib_ids, fp, start, opts)
    finally:
        pruner.close()  # stop the prefetch thread, remove disk-backed hidden states
    resumed_at = start.next_block
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
    parts = ckpt.family.fused_parts(ckpt.config)  # the rows of each fused matrix (Phi-3's qkv_proj, gate_up_proj)
    if parts:
        extra.setdefault("fused_linears", {n: {p: list(r) for p, r in rows.items()} for n, rows in parts.items()})
    return RunReport(str(ckpt.path), ckpt.family.name, settings.describe(), calibration, blocks, __version__,
                     extra=extra)
