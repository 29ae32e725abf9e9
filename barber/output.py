"""barber-stream's output directory: its layout, checks, lock, block store, assembly and publication.

Output layout (`--out`): the input's non-weight files (config.json, tokenizer files, ...), the
safetensors shards with the input's names, tensor names and index, pruned entries exactly +0.0,
and `barber_report.json` (`REPORT_FILE`), written last: a directory without it is not a finished
result. With a `SaveFormat` other than the default, every floating tensor is stored in its dtype and,
for "packed", each pruned linear as two tensors (`barber.packed`); config.json then has a "barber"
section (`config_section`) and each shard's `__metadata__["barber"]` says how its tensors are stored.

While running, everything lives in `--out/.barber-work/` (`WORK_DIR`):

- `block-NNNNN.safetensors` (`BLOCK_FILE`): the pruned linears of each finished block (`BlockStore`);
- `state.safetensors` (`STATE_FILE`): the state after the last finished block (hidden states,
  reports so far, fingerprint; see `barber.state`), replaced atomically;
- `final/` (`STAGE_DIR`): the output files, staged there by `assemble` and renamed into `--out` by
  `publish` only once all are written.

Every file is written under a temporary name, fsynced and renamed, so a file that exists is
complete. The output directory is locked (`locked`, flock) while a run uses it, so two runs never
write into the same one. The names themselves live in the leaf module `barber.layout`.

`BARBER_TEST_KILL_AT=POINT[/SIGNAME][,...]` (tests only) sends SIGNAME (default SIGKILL) to this
process at POINT, once per listed entry: `state:K` (state for block K committed), `block-write:I`
(block I's file half written), `assemble:K` (K-th output shard staged), `publish:K` (K-th output
file renamed into place).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from barber import __version__
from barber import packed as packed_format
from barber.checkpoint import Checkpoint
from barber.errors import RESUME_HINT, Interrupted, OutputError, StateError, UsageError
from barber.layout import BLOCK_FILE, INDEX_FILE, REPORT_FILE, STAGE_DIR, STATE_FILE, WORK_DIR
from barber.packed import SaveFormat
from barber.prune import Pattern
from barber.safetensors_format import Header, read_header
from barber.writer import TensorSpec, fsync_dir, write_json_atomic, write_safetensors

__all__ = [
    "BLOCK_FILE", "INDEX_FILE", "KILL_ENV", "REPORT_FILE", "STAGE_DIR", "STATE_FILE", "WORK_DIR",
    "BlockStore", "StopCheck", "assemble", "check_stop", "clear_dir", "config_section", "inspect_output",
    "kill_point", "locked", "make_dir", "publish", "remove_temporaries",
]

KILL_ENV = "BARBER_TEST_KILL_AT"

#: `should_stop()` returns the number of a signal asking the run to stop, or 0/None to go on.
StopCheck = Callable[[], "int | None"]


def kill_point(point: str) -> None:
    """Tests only: signal this process at `point` when BARBER_TEST_KILL_AT names it (see module doc).

    `point@R` names the point on rank R of a data-parallel run only (RANK in the environment).
    """
    for spec in os.environ.get(KILL_ENV, "").split(","):
        where, _, name = spec.partition("/")
        where, _, rank = where.partition("@")
        if where == point and (not rank or rank == os.environ.get("RANK", "0")):
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
    if (dst / REPORT_FILE).exists():
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
        if (work / STATE_FILE).exists():
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


def make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {path}: {exc.strerror or exc}") from None


def clear_dir(path: Path) -> None:
    """Remove everything inside `path` (the directory itself stays, with its lock)."""
    try:
        for item in path.iterdir():
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()
    except OSError as exc:
        raise OutputError(f"cannot clear {path}: {exc.strerror or exc}") from None


def remove_temporaries(path: Path) -> None:
    """Remove `.NAME.tmp` files left by a killed write."""
    for item in path.glob(".*.tmp"):
        item.unlink(missing_ok=True)


@contextmanager
def locked(out_dir: Path) -> Iterator[None]:
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
        return self.work / BLOCK_FILE.format(i=i)

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
                    kill_point(f"block-write:{i}")  # the file is half written here
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


# ---- assembly and publication ----------------------------------------------------------------------


def check_stop(should_stop: StopCheck | None, where: str, signum: int | None = None) -> None:
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
    save: SaveFormat | None = None,
) -> int:
    """Write the output shards into `stage` (same names, tensors and index as the input); returns total bytes.

    A shard already in `stage` or in `done_dir` (written before an interruption) is not rewritten.
    A block file is deleted as soon as every shard holding its tensors is written.

    `save` (default: dense, input dtypes, which writes exactly what earlier versions wrote) casts every
    floating tensor to `save.dtype` and, for "packed", stores each pruned linear in the encoding
    `barber.packed.plan` picks; then config.json in `stage` gets a "barber" section (`config_section`).
    """
    save = save or SaveFormat()
    total = 0
    by_shard: dict[str, list[str]] = {}
    for name, shard in ckpt.weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    pending: dict[int, set[str]] = {}  # block -> shards still to write that hold its tensors
    for name, i in store.location.items():
        pending.setdefault(i, set()).add(ckpt.weight_map[name])
    weight_map: dict[str, str] = {}
    packed: dict[str, dict] = {}
    shards = tqdm(sorted(by_shard), desc="writing shards", unit="shard", leave=False, disable=not progress)
    for k, shard in enumerate(shards, 1):
        names = by_shard[shard]
        existing = next((d / shard for d in (stage, done_dir) if d is not None and (d / shard).is_file()), None)
        if existing is not None:
            header = _written_header(existing, save)
            total += sum(info.end - info.start for info in header.tensors.values())
            weight_map.update(dict.fromkeys(header.tensors, shard))
            barber = json.loads(header.metadata.get("barber", "{}"))
            packed.update({n: e["packed"] for n, e in barber.get("tensors", {}).items() if "packed" in e})
        else:
            specs, pruned_here = _shard_specs(ckpt, store, names, layer_info, save)
            metadata = _shard_metadata(ckpt.path / shard)
            metadata.setdefault("format", "pt")
            if not save.is_default or ckpt.packed:
                metadata.pop("barber", None)  # from an input that is a barber output: not this output's
            if pruned_here:
                entry = {"version": __version__, "tensors": pruned_here}
                if not save.is_default:
                    entry["save"] = save.describe()
                metadata["barber"] = json.dumps(entry, sort_keys=True)
            total += write_safetensors(stage / shard, specs, metadata)
            weight_map.update(dict.fromkeys((s.name for s in specs), shard))
            packed.update({n: e["packed"] for n, e in pruned_here.items() if "packed" in e})
            ckpt.release()
            kill_point(f"assemble:{k}")
        for i in list(pending):
            pending[i].discard(shard)
            if not pending[i]:
                store.remove(i)
                del pending[i]
        check_stop(should_stop, "while writing the output")
    if (ckpt.path / INDEX_FILE).exists():
        index = json.loads((ckpt.path / INDEX_FILE).read_text())
        index.setdefault("metadata", {})["total_size"] = total
        index["weight_map"] = dict(sorted(weight_map.items()))
        write_json_atomic(stage / INDEX_FILE, index)
    _write_config(stage, save, packed)
    return total


def _written_header(path: Path, save: SaveFormat) -> Header:
    """The header of an output shard written before an interruption; refused when written in another save format."""
    header = read_header(path)
    barber = json.loads(header.metadata.get("barber", "{}"))
    if "tensors" in barber and barber.get("save") != (None if save.is_default else save.describe()):
        was = barber.get("save") or SaveFormat().describe()
        raise UsageError(
            f"{path} was written by the interrupted run with --save-format {was['format']} --save-dtype "
            f"{was['dtype'] or 'unchanged'}; rerun with those, or add --overwrite to start over"
        )
    return header


def _shard_specs(
    ckpt: Checkpoint, store: BlockStore, names: list[str], layer_info: dict[str, dict], save: SaveFormat
) -> tuple[list[TensorSpec], dict[str, dict]]:
    """The tensors of one output shard, and its pruned linears' metadata entries (with "packed" when packed)."""
    specs, pruned_here = [], {}

    def read(name: str) -> torch.Tensor:
        t = store.read(name) if name in store.location else ckpt.tensor(name)
        return t.to(save.dtype) if save.dtype is not None and t.dtype.is_floating_point else t

    for name in names:
        info = ckpt.info(name)
        dtype = save.dtype if save.dtype is not None and info.dtype.is_floating_point else info.dtype
        if name in layer_info:
            pruned_here[name] = dict(layer_info[name])
        if name in layer_info and save.format == "packed":
            plan = packed_format.plan(read(name), Pattern.parse(layer_info[name]["pattern"]))
            pruned_here[name]["packed"] = plan.to_json()
            parts = _PackedParts(lambda n=name: read(n), plan)
            for suffix, (part_dtype, shape) in plan.component_shapes().items():
                specs.append(TensorSpec(name + suffix, part_dtype, shape, lambda p=parts, s=suffix: p.take(s)))
        else:
            specs.append(TensorSpec(name, dtype, tuple(info.shape), lambda n=name: read(n)))
    return specs, pruned_here


class _PackedParts:
    """One packed linear's stored tensors, packed on first use and handed out once each."""

    def __init__(self, read: Callable[[], torch.Tensor], plan: packed_format.Packed):
        self.read, self.plan, self.parts = read, plan, None

    def take(self, suffix: str) -> torch.Tensor:
        if self.parts is None:
            self.parts = packed_format.pack(self.read(), self.plan)
        return self.parts.pop(suffix)


def _write_config(stage: Path, save: SaveFormat, packed: dict[str, dict]) -> None:
    """Put the "barber" section (`config_section`) into the staged config.json, and `save.dtype` as its dtype.

    Left untouched (byte for byte the input's) for a default save of an input without such a section.
    """
    path = stage / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if save.is_default and "barber" not in config:
        return
    config.pop("barber", None)  # an input that was itself a barber output
    if not save.is_default:
        config["barber"] = config_section(save, packed)
    if save.dtype is not None:
        for key in {"torch_dtype", "dtype"} & config.keys() or {"torch_dtype"}:
            config[key] = str(save.dtype).removeprefix("torch.")
    write_json_atomic(path, config)


def config_section(save: SaveFormat, packed: dict[str, dict]) -> dict:
    """config.json's "barber" section: the save format and dtype, and for "packed" every packed tensor's entry.

    ``{"save_format", "save_dtype", "version" (the packed layout's), "encodings" (encoding -> its two tensors),
    "tensors": {NAME: {"encoding", "shape", "dtype", "nnz"}}}`` (see `barber.packed`).
    """
    section: dict = {"save_format": save.format, "save_dtype": save.describe()["dtype"], "barber_version": __version__}
    if save.format == "packed":
        section["version"] = packed_format.FORMAT_VERSION
        encodings = packed_format.ENCODINGS.items()
        section["encodings"] = {enc: [f"NAME{s}" for s in suffixes] for enc, suffixes in encodings}
        section["tensors"] = dict(sorted(packed.items()))
    return section


def publish(stage: Path, out_dir: Path) -> list[str]:
    """Rename every staged file into `out_dir` (the index last) and make the renames durable."""
    names = sorted(p.name for p in stage.iterdir() if p.is_file() and not p.name.startswith("."))
    names.sort(key=lambda n: n == INDEX_FILE)
    try:
        for k, name in enumerate(names, 1):
            os.replace(stage / name, out_dir / name)
            kill_point(f"publish:{k}")
        fsync_dir(out_dir)
    except OSError as exc:
        raise OutputError(f"cannot move the output into {out_dir}: {exc.strerror or exc}") from None
    return names
