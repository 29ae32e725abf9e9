"""A whole pruning run on files: output directory checks, the block loop, resume, shard assembly, report.

Output layout (`--out`): the input's non-weight files (config.json, tokenizer files, ...), the
safetensors shards with the input's names, tensor names and index, pruned entries exactly +0.0,
and `barber_report.json`, written last: a directory without it is not a finished result.

While running, everything lives in `--out/.barber-work/` (`WORK_DIR`):

- `block-NNNNN.safetensors`: the pruned linears of each finished block;
- `state.safetensors`: the state after the last finished block (hidden states, reports so far,
  fingerprint; see `barber.state`), replaced atomically after every block;
- `final/`: the output files, staged there and renamed into `--out` only once all are written.

A run killed at any moment (SIGKILL included) is continued by the same command, from the last
finished block, and gives byte-identical files: every file is written under a temporary name,
fsynced and renamed, so a file that exists is complete; the block loop is deterministic given the
saved hidden states. `--state-interval` trades how often the state is saved against redone work. After the report is written, the work directory is removed. The output
directory is locked (flock) for the duration, so two runs never write into the same one.

`BARBER_TEST_KILL_AT=POINT[/SIGNAME][,...]` (tests only) sends SIGNAME (default SIGKILL) to this
process at POINT, once per listed entry: `state:K` (state for block K committed), `block-write:I`
(block I's file half written), `assemble:K` (K-th output shard staged), `publish:K` (K-th output
file renamed into place).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from barber import __version__
from barber.checkpoint import INDEX_FILE, REPORT_FILE, WORK_DIR, Checkpoint
from barber.errors import RESUME_HINT, Interrupted, OutputError, StateError, UsageError
from barber.budget import MemoryBudget
from barber.pipeline import BlockState, Pruner, PruneSettings
from barber.state import (
    STATE_NAME,
    Fingerprint,
    SavedState,
    fingerprint,
    load_hidden,
    load_state,
    restore_rng,
    save_state,
)
from barber.writer import (
    TensorSpec,
    copy_side_files,
    fsync_dir,
    write_json_atomic,
    write_safetensors,
)

log = logging.getLogger(__name__)

REPORT_NAME = REPORT_FILE
STAGE_DIR = "final"
KILL_ENV = "BARBER_TEST_KILL_AT"

#: `should_stop()` returns the number of a signal asking the run to stop, or 0/None to go on.
StopCheck = Callable[[], "int | None"]


def _test_hook(point: str) -> None:
    """Tests only: signal this process at `point` when BARBER_TEST_KILL_AT names it (see module doc)."""
    for spec in os.environ.get(KILL_ENV, "").split(","):
        where, _, name = spec.partition("/")
        if where == point:
            os.kill(os.getpid(), getattr(signal, name or "SIGKILL"))


# ---- the output directory ---------------------------------------------------------------------------


def inspect_output(ckpt_dir: Path, out_dir: Path, *, overwrite: bool = False, resume: bool = False) -> str:
    """Decide what a run may do with `out_dir`, without changing anything.

    Returns:
        "fresh" (missing or empty), "resume" (an interrupted run with a saved state; the fingerprint
        is checked later), or "restart" (clear it first: `overwrite` of a barber result or work
        directory, or a work directory of a run killed before its first block was saved).

    Raises:
        UsageError: `--out` is or contains the input, is inside it, is a file, is non-empty without
            `overwrite` (or holds something other than a barber result), `--resume` with nothing
            to resume, or both `overwrite` and `resume`.
    """
    if overwrite and resume:
        raise UsageError("--overwrite and --resume contradict each other (--overwrite discards an interrupted run)")
    src, dst = Path(ckpt_dir).resolve(), Path(out_dir).resolve()
    if dst == src or src in dst.parents:
        raise UsageError(f"--out {out_dir} is the input checkpoint or inside it; choose another directory")
    if dst in src.parents:
        raise UsageError(f"--out {out_dir} contains the input checkpoint; choose another directory")
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a directory")
    try:
        empty = not dst.is_dir() or not any(dst.iterdir())
    except OSError as exc:
        raise UsageError(f"--out {out_dir}: cannot list: {exc.strerror or exc}") from None
    work = dst / WORK_DIR
    if empty:
        if resume:
            raise UsageError(f"--resume: {out_dir} holds no interrupted run (run without --resume to start)")
        return "fresh"
    if (dst / REPORT_NAME).exists():
        if overwrite:
            return "restart"
        if resume:
            raise UsageError(
                f"--resume: {out_dir} holds a finished result, nothing to resume (--overwrite replaces it)"
            )
        raise UsageError(f"--out {out_dir} already holds a finished barber result (use --overwrite to replace it)")
    if work.is_dir():
        if overwrite:
            return "restart"
        if (work / STATE_NAME).exists():
            return "resume"
        if resume:
            raise UsageError(
                f"--resume: the run in {out_dir} stopped before its first block was saved; nothing to resume "
                "(run without --resume to start over)"
            )
        return "restart"
    if resume:
        raise UsageError(f"--resume: {out_dir} holds no interrupted run (it is not a barber output)")
    if overwrite:
        raise UsageError(f"--out {out_dir} is not empty and holds no barber result; refusing to overwrite it")
    raise UsageError(
        f"--out {out_dir} is not empty (use --overwrite to replace a previous result, "
        "or choose an empty directory)"
    )


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {path}: {exc.strerror or exc}") from None


def _clear_dir(path: Path) -> None:
    """Remove everything inside `path` (the directory itself stays, with its lock)."""
    try:
        for item in path.iterdir():
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()
    except OSError as exc:
        raise OutputError(f"cannot clear {path}: {exc.strerror or exc}") from None


def _remove_temporaries(path: Path) -> None:
    """Remove `.NAME.tmp` files left by a killed write."""
    for item in path.glob(".*.tmp"):
        item.unlink(missing_ok=True)


@contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive flock on `out_dir` (released on exit, and by the kernel if the process dies)."""
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"--out {out_dir} is in use by another barber-stream run") from None
        yield
    finally:
        os.close(fd)


# ---- pruned blocks in the work directory ------------------------------------------------------------


def _shard_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


class BlockStore:
    """The pruned linears of finished blocks, one safetensors file per block in the work directory."""

    def __init__(self, work: Path, ckpt: Checkpoint):
        self.work = work
        self.ckpt = ckpt
        self.location: dict[str, int] = {}  # full tensor name -> block index

    def path(self, i: int) -> Path:
        return self.work / f"block-{i:05d}.safetensors"

    def names(self, i: int) -> list[str]:
        """Full names of the tensors block i's file holds."""
        return [self.ckpt.block_tensor_name(i, local + ".weight") for local in self.ckpt.family.linears]

    def write(self, i: int, linears: dict[str, torch.Tensor]) -> None:
        """Store block i's pruned linear weights under their full names, in the input's dtypes."""
        specs = []
        for k, (local, tensor) in enumerate(linears.items()):
            name = self.ckpt.block_tensor_name(i, local + ".weight")
            stored = tensor.detach().to("cpu", self.ckpt.info(name).dtype).contiguous()

            def produce(t=stored, second=k == 1) -> torch.Tensor:
                if second:
                    _test_hook(f"block-write:{i}")  # the file is half written here
                return t

            specs.append(TensorSpec(name, stored.dtype, tuple(stored.shape), produce))
            self.location[name] = i
        write_safetensors(self.path(i), specs)

    def adopt(self, blocks: range, require: bool) -> None:
        """Register blocks finished by an earlier process; `require`: their files must all exist."""
        for i in blocks:
            if require and not self.path(i).is_file():
                raise StateError(f"{self.path(i)} is missing")
            self.location.update({name: i for name in self.names(i)})

    def read(self, name: str) -> torch.Tensor:
        path = self.path(self.location[name])
        if not path.is_file():
            raise StateError(f"{path} is missing")
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)

    def remove(self, i: int) -> None:
        """Delete block i's file (its tensors are all in written output shards)."""
        self.path(i).unlink(missing_ok=True)


# ---- assembly ---------------------------------------------------------------------------------------------


def _check_stop(should_stop: StopCheck | None, where: str, signum: int | None = None) -> None:
    """Raise `Interrupted` if `signum` (default: polled from `should_stop`) asks to stop."""
    if signum is None:
        signum = should_stop() if should_stop else None
    if signum:
        name = signal.Signals(signum).name
        raise Interrupted(f"stopped by {name} {where}; the progress is saved: {RESUME_HINT}", signum)


def assemble(
    ckpt: Checkpoint,
    store: BlockStore,
    stage: Path,
    layer_info: dict[str, dict],
    *,
    done_dir: Path | None = None,
    should_stop: StopCheck | None = None,
    progress: bool = True,
) -> int:
    """Write the output shards into `stage` (same names, tensors and index as the input); returns total bytes.

    A shard already in `stage` or in `done_dir` (written before an interruption) is not rewritten.
    A block file is deleted as soon as every shard holding its tensors is written.
    """
    total = 0
    by_shard: dict[str, list[str]] = {}
    for name, shard in ckpt.weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    pending: dict[int, set[str]] = {}  # block -> shards still to write that hold its tensors
    for name, i in store.location.items():
        pending.setdefault(i, set()).add(ckpt.weight_map[name])
    shards = tqdm(sorted(by_shard), desc="writing shards", unit="shard", leave=False, disable=not progress)
    for k, shard in enumerate(shards, 1):
        names = by_shard[shard]
        if (stage / shard).is_file() or (done_dir is not None and (done_dir / shard).is_file()):
            total += sum(ckpt.info(n).end - ckpt.info(n).start for n in names)
        else:
            specs = []
            for name in names:
                info = ckpt.info(name)
                produce = (lambda n=name: store.read(n)) if name in store.location else (lambda n=name: ckpt.tensor(n))
                specs.append(TensorSpec(name, info.dtype, tuple(info.shape), produce))
            metadata = _shard_metadata(ckpt.path / shard)
            metadata.setdefault("format", "pt")
            pruned_here = {n: layer_info[n] for n in names if n in layer_info}
            if pruned_here:
                metadata["barber"] = json.dumps({"version": __version__, "tensors": pruned_here}, sort_keys=True)
            total += write_safetensors(stage / shard, specs, metadata)
            ckpt.release()
            _test_hook(f"assemble:{k}")
        for i in list(pending):
            pending[i].discard(shard)
            if not pending[i]:
                store.remove(i)
                del pending[i]
        _check_stop(should_stop, "while writing the output")
    if (ckpt.path / INDEX_FILE).exists():
        index = json.loads((ckpt.path / INDEX_FILE).read_text())
        index.setdefault("metadata", {})["total_size"] = total
        index["weight_map"] = dict(sorted(ckpt.weight_map.items()))
        write_json_atomic(stage / INDEX_FILE, index)
    return total


def publish(stage: Path, out_dir: Path) -> list[str]:
    """Rename every staged file into `out_dir` (the index last) and make the renames durable."""
    names = sorted(p.name for p in stage.iterdir() if p.is_file() and not p.name.startswith("."))
    names.sort(key=lambda n: n == INDEX_FILE)
    try:
        for k, name in enumerate(names, 1):
            os.replace(stage / name, out_dir / name)
            _test_hook(f"publish:{k}")
        fsync_dir(out_dir)
    except OSError as exc:
        raise OutputError(f"cannot move the output into {out_dir}: {exc.strerror or exc}") from None
    return names


# ---- the run ---------------------------------------------------------------------------------------------


def _resume_state(work: Path, fp: Fingerprint, out_dir: Path) -> SavedState:
    """The saved state of an interrupted run in `work`, if it matches `fp`; otherwise a UsageError."""
    try:
        saved = load_state(work / STATE_NAME)
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
) -> dict:
    """Prune `ckpt` into `out_dir`, block by block, and return the report (also written there).

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
    started = time.perf_counter()
    out_dir = Path(out_dir)
    inspect_output(ckpt.path, out_dir, overwrite=overwrite, resume=resume)  # before creating anything
    _make_dir(out_dir)
    with _locked(out_dir):
        plan = inspect_output(ckpt.path, out_dir, overwrite=overwrite, resume=resume)
        fp = fingerprint(ckpt, calib_ids, settings.describe())
        work = out_dir / WORK_DIR
        saved = _resume_state(work, fp, out_dir) if plan == "resume" else None
        if plan == "restart":
            log.info("clearing %s", out_dir)
            _clear_dir(out_dir)
        _make_dir(work)
        _remove_temporaries(work)
        for scratch in work.glob("*.bin"):  # disk-backed hidden states of a killed process
            scratch.unlink()
        try:
            result = _run(
                ckpt, out_dir, work, settings, calib_ids, fp, saved, progress, should_stop, budget, state_interval
            )
            report = build_report(ckpt, settings, result.blocks, calib_ids, dict(extra_report or {}))
            report["seconds"]["embed"] = result.embed_seconds
            report["seconds"]["assemble"] = result.assemble_seconds
            report["seconds"]["save_state"] = result.save_state_seconds
            report["seconds"]["total"] = time.perf_counter() - started
            report["output_bytes"] = result.output_bytes
            report["memory"] = result.memory
            if result.resumed_at:
                report["resumed_at_block"] = result.resumed_at
            if settings.device.startswith("cuda"):
                report["peak_gpu_memory"] = torch.cuda.max_memory_allocated()
            write_json_atomic(out_dir / REPORT_NAME, report)  # the completion marker
            fsync_dir(out_dir)
        except OutputError as exc:
            raise OutputError(f"{exc} (finished blocks are kept: fix this and {RESUME_HINT})") from None
        except StateError as exc:
            raise UsageError(f"cannot resume the run in {out_dir}: {exc}; add --overwrite to start over") from None
        shutil.rmtree(work, ignore_errors=True)
    return report


@dataclass
class RunResult:
    """What the loop and assembly hand to the report."""

    blocks: list[dict]
    output_bytes: int
    embed_seconds: float
    assemble_seconds: float
    resumed_at: int  # first block computed by this process (0: not resumed)
    memory: dict | None = None  # Pruner.memory_report(): the memory plan and the peaks reached
    save_state_seconds: float = 0.0  # writing resume states


def _block_loop(
    pruner: Pruner,
    ckpt: Checkpoint,
    work: Path,
    calib_ids: torch.Tensor,
    fp: Fingerprint,
    saved: SavedState | None,
    progress: bool,
    should_stop: StopCheck | None,
    state_interval: float,
) -> tuple[BlockState, float, float]:
    """Prune every block not done yet; returns the final state, the embedding and the state-saving seconds.

    The state is committed after a block when `state_interval` seconds have passed since the last
    commit (0: after every block), always after the last block and before stopping on a signal.
    """
    n = ckpt.num_layers
    store = BlockStore(work, ckpt)
    if saved is not None:
        log.info("resuming the run in %s at block %d of %d", work.parent, saved.next_block, n)
        store.adopt(range(saved.next_block), require=saved.next_block < n)
        restore_rng(saved.rng)
        on_device = pruner.plan_for(*calib_ids.shape).hidden_placement == "device"
        hidden = load_hidden(saved, pruner.settings.device if on_device else None)
        state = BlockState(saved.next_block, hidden, saved.blocks)
        embed_seconds = float(saved.extra.get("embed_seconds", 0.0))
        micro_batch = pruner.plan_for(*calib_ids.shape).micro_batch
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
            work / STATE_NAME, next_block=state.next_block, num_blocks=n, blocks=state.blocks,
            hidden=None if last else state.hidden, fp=fp,
            extra={"embed_seconds": embed_seconds, "micro_batch": pruner.plan_for(*calib_ids.shape).micro_batch},
        )
        fsync_dir(work)  # the block files' and the state's renames survive a power cut
        save_seconds += time.perf_counter() - t0
        saved_at = time.monotonic()
        _test_hook(f"state:{state.next_block}")

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
            _check_stop(should_stop, f"after block {state.next_block - 1} of {n}", signum)
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
    ckpt: Checkpoint,
    out_dir: Path,
    work: Path,
    settings: PruneSettings,
    calib_ids: torch.Tensor,
    fp: Fingerprint,
    saved: SavedState | None,
    progress: bool,
    should_stop: StopCheck | None,
    budget: MemoryBudget | None = None,
    state_interval: float = 0.0,
) -> RunResult:
    """The block loop (from `saved` or from the embeddings), assembly and publication; returns report parts."""
    n = ckpt.num_layers
    if settings.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    pruner = Pruner(ckpt, _resumed_settings(settings, saved), progress=progress, budget=budget, work_dir=work)
    try:
        state, embed_seconds, save_seconds = _block_loop(
            pruner, ckpt, work, calib_ids, fp, saved, progress, should_stop, state_interval
        )
    finally:
        pruner.release()  # stop the prefetch thread, remove disk-backed hidden states
    resumed_at = saved.next_block if saved is not None else 0
    store = BlockStore(work, ckpt)
    store.adopt(range(n), require=False)

    layer_info = {}
    for block in state.blocks:
        for local, info in block["layers"].items():
            layer_info[ckpt.block_tensor_name(block["block"], local + ".weight")] = {
                "pattern": str(settings.pattern),
                "sparsity": info["sparsity"],
            }
    t0 = time.perf_counter()
    stage = work / STAGE_DIR
    _make_dir(stage)
    _remove_temporaries(stage)
    copy_side_files(ckpt.path, stage, skip={REPORT_NAME})  # an input that is itself a barber result
    total_bytes = assemble(ckpt, store, stage, layer_info, done_dir=out_dir, should_stop=should_stop, progress=progress)
    publish(stage, out_dir)
    return RunResult(
        state.blocks, total_bytes, embed_seconds, time.perf_counter() - t0, resumed_at, pruner.memory_report(),
        save_seconds,
    )


def build_report(
    ckpt: Checkpoint, settings: PruneSettings, blocks: list[dict], calib_ids: torch.Tensor, extra: dict
) -> dict:
    """The run report: settings, per-layer sparsity, per-sub-block losses and swaps, times, memory."""
    kept = sum(layer["kept"] for b in blocks for layer in b["layers"].values())
    numel = sum(layer["shape"][0] * layer["shape"][1] for b in blocks for layer in b["layers"].values())
    seconds: dict[str, float] = {}
    for b in blocks:
        for phase, value in b["seconds"].items():
            seconds[phase] = seconds.get(phase, 0.0) + value
    swaps = sum(sum(sb["swaps"].values()) for b in blocks for sb in b["subblocks"])
    row_ranges = [layer.get("row_sparsity", [layer["sparsity"]] * 2) for b in blocks for layer in b["layers"].values()]
    return {
        "barber_version": __version__,
        "input": str(ckpt.path),
        "family": ckpt.family.name,
        "settings": settings.describe(),
        "calibration": {"nsamples": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1]), **extra.pop("calibration", {})},
        "sparsity": 1 - kept / numel if numel else 0.0,
        "row_sparsity": [min(r[0] for r in row_ranges), max(r[1] for r in row_ranges)] if row_ranges else [0.0, 0.0],
        "swaps": swaps,
        "blocks": blocks,
        "seconds": seconds,
        "peak_rss": max((b["peak_rss"] for b in blocks), default=0),
        **extra,
    }
