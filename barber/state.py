"""The resumable state of a pruning run: its fingerprint, and the state file saved after each block.

A run is resumable when `--out/.barber-work/state.safetensors` exists. That file is one safetensors
file, written through a temporary name, fsynced and renamed over the previous one, so it is always
either the old state or the new one, never a mix. It holds:

- tensor `hidden`: the calibration hidden states entering block `next_block`, raw (bit-exact), or an
  empty tensor once every block is done (assembly needs only the reports);
- metadata `barber_state`: JSON with the format, `next_block`, the per-block reports so far, and the
  fingerprint of what the run was started with.

No random state is saved: the pruner draws no random numbers (the calibration windows are sampled
before the run, from `--seed`, and are part of the fingerprint). A method that draws some must
take an explicit `torch.Generator` and save its state here. States written when the torch random
state was saved (tensors `rng_cpu`, `rng_cuda`) still load; those tensors are ignored.

The fingerprint hashes, separately, the checkpoint (config.json bytes, the index, every shard's
name, size and safetensors header, and the first and last MiB of its tensor data), the calibration
token ids (dtype, shape, bytes) and the settings (`PruneSettings.describe()` plus the barber
version). A resumed run must match all three, and `Fingerprint.differences` says in words which
one does not.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from barber import __version__
from barber.buffers import HiddenBuffer, Placement
from barber.checkpoint import Checkpoint
from barber.errors import CheckpointError, StateError
from barber.layout import INDEX_FILE
from barber.report import BlockReport
from barber.safetensors_format import TensorInfo, read_header
from barber.writer import TensorSpec, write_safetensors

STATE_FORMAT = 1
_META_KEY = "barber_state"
_CHUNK = 64 * 1024 * 1024  # bytes per read when restoring hidden states
_SAMPLE_BYTES = 1024 * 1024  # bytes hashed at each end of every shard's data


@dataclass(frozen=True)
class Fingerprint:
    """Digests of what decides a run's output: checkpoint, calibration data, settings (+ barber version)."""

    checkpoint: str
    calibration: str
    settings: str
    settings_described: dict
    version: str = __version__

    def to_dict(self) -> dict:
        return {
            "checkpoint": self.checkpoint,
            "calibration": self.calibration,
            "settings": self.settings,
            "settings_described": self.settings_described,
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, d: object) -> "Fingerprint":
        if not isinstance(d, dict):
            raise StateError("no fingerprint")
        try:
            return cls(
                str(d["checkpoint"]), str(d["calibration"]), str(d["settings"]),
                dict(d["settings_described"]), str(d["version"]),
            )
        except (KeyError, TypeError, ValueError):
            raise StateError("malformed fingerprint") from None

    def differences(self, saved: "Fingerprint") -> list[str]:
        """What differs between this (the new run) and `saved`, in words; empty when they match."""
        out = []
        if self.checkpoint != saved.checkpoint:
            out.append("a different checkpoint (config.json, safetensors headers or data changed)")
        if self.calibration != saved.calibration:
            out.append("different calibration data")
        if self.version != saved.version:
            out.append(f"a different barber version ({saved.version} -> {self.version})")
        if self.settings != saved.settings:
            keys = sorted(set(self.settings_described) | set(saved.settings_described))
            changed = [
                f"{k} {saved.settings_described.get(k)!r} -> {self.settings_described.get(k)!r}"
                for k in keys
                if self.settings_described.get(k) != saved.settings_described.get(k)
            ]
            out.append("different settings" + (f" ({', '.join(changed)})" if changed else ""))
        return out


def _sha256_json(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def checkpoint_digest(ckpt: Checkpoint) -> str:
    """sha256 of config.json, the index (if any), and every shard's name, size, header and the first
    and last MiB of its data (a sample: hashing every byte of a 26 GB checkpoint would take minutes)."""
    h = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        h.update(label.encode() + b"\0" + len(data).to_bytes(8, "little") + data)

    try:
        add("config.json", (ckpt.path / "config.json").read_bytes())
        if (ckpt.path / INDEX_FILE).exists():
            add(INDEX_FILE, (ckpt.path / INDEX_FILE).read_bytes())
        for shard in ckpt.shard_files:
            path = ckpt.path / shard
            size = path.stat().st_size
            add("shard", shard.encode())
            add("size", str(size).encode())
            header = read_header(path).raw
            add("header", header)
            with open(path, "rb") as f:  # a sample of the data: its first and last MiB
                f.seek(len(header))
                add("head", f.read(_SAMPLE_BYTES))
                f.seek(max(len(header), size - _SAMPLE_BYTES))
                add("tail", f.read(_SAMPLE_BYTES))
    except OSError as exc:
        raise CheckpointError(f"{ckpt.path}: cannot read: {exc.strerror or exc}") from None
    return h.hexdigest()


def calibration_digest(ids: torch.Tensor) -> str:
    """sha256 of the calibration token ids: dtype, shape and bytes."""
    t = ids.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}:{list(t.shape)}\0".encode())
    h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def fingerprint(ckpt: Checkpoint, calib_ids: torch.Tensor, settings_described: dict) -> Fingerprint:
    """The fingerprint of a run on `ckpt` with these calibration ids and `PruneSettings.describe()`."""
    return Fingerprint(
        checkpoint=checkpoint_digest(ckpt),
        calibration=calibration_digest(calib_ids),
        settings=_sha256_json({"settings": settings_described, "version": __version__}),
        settings_described=settings_described,
    )


@dataclass
class SavedState:
    """A state read back from disk (`load_state`); `hidden` is None until `load_hidden` fills it."""

    path: Path
    next_block: int
    num_blocks: int
    blocks: list[BlockReport]
    fingerprint: Fingerprint
    extra: dict
    infos: dict[str, TensorInfo]
    hidden: torch.Tensor | None = None


def save_state(
    path: Path,
    *,
    next_block: int,
    num_blocks: int,
    blocks: list[BlockReport],
    hidden: HiddenBuffer | None,
    fp: Fingerprint,
    extra: dict | None = None,
) -> int:
    """Atomically replace the state file at `path`; returns the bytes of tensor data written.

    `hidden` is streamed to the file in pieces (a GPU buffer is never copied whole to the host, a
    disk buffer never mapped whole into RSS); None stores an empty tensor.
    """
    meta = {
        "format": STATE_FORMAT,
        "next_block": next_block,
        "num_blocks": num_blocks,
        "blocks": [b.to_json() for b in blocks],
        "fingerprint": fp.to_dict(),
        "extra": extra or {},
    }
    if hidden is None:
        hidden = HiddenBuffer(torch.empty(0), Placement.HOST, torch.device("cpu"))
    specs = [TensorSpec("hidden", hidden.dtype, tuple(hidden.shape), hidden.host_pieces)]
    return write_safetensors(path, specs, {_META_KEY: json.dumps(meta, sort_keys=True)})


def _read_into(path: Path, info: TensorInfo, out: torch.Tensor) -> None:
    """Copy one tensor's bytes from the file into the contiguous tensor `out` (any device), in chunks."""
    flat = out.reshape(-1).view(torch.uint8)
    nbytes = info.end - info.start
    if flat.numel() != nbytes:
        raise StateError(f"{path}: tensor size mismatch")
    direct = flat.device.type == "cpu"
    staging = None if direct else torch.empty(min(nbytes, _CHUNK), dtype=torch.uint8)
    with open(path, "rb") as f:
        f.seek(info.start)
        done = 0
        while done < nbytes:
            size = min(_CHUNK, nbytes - done)
            target = flat[done : done + size] if direct else staging[:size]
            got = f.readinto(memoryview(target.numpy()))
            if not got:
                raise StateError(f"{path}: truncated")
            if not direct:
                flat[done : done + got].copy_(staging[:got])
            done += got


def load_state(path: Path) -> SavedState:
    """Read and validate a state file: everything but the hidden states (see `load_hidden`).

    Raises:
        StateError: the file is unreadable, not a state file, of another format, or inconsistent.
    """
    try:
        header = read_header(path)
    except CheckpointError as exc:
        raise StateError(str(exc)) from None
    infos = header.tensors
    try:
        meta = json.loads(header.metadata[_META_KEY])
        if meta["format"] != STATE_FORMAT:
            raise StateError(f"{path}: state format {meta['format']}, this barber reads {STATE_FORMAT}")
        next_block, num_blocks, blocks = int(meta["next_block"]), int(meta["num_blocks"]), list(meta["blocks"])
        blocks = [BlockReport.from_json(b) for b in blocks]
        fp = Fingerprint.from_dict(meta["fingerprint"])
        extra = dict(meta.get("extra") or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"{path}: not a barber state file ({type(exc).__name__})") from None
    if not (0 < next_block <= num_blocks and len(blocks) == next_block and "hidden" in infos):
        raise StateError(f"{path}: inconsistent state (next block {next_block} of {num_blocks})")
    return SavedState(path, next_block, num_blocks, blocks, fp, extra, infos)


def load_hidden(saved: SavedState, device: str | torch.device | None) -> HiddenBuffer:
    """The saved hidden states, bit-exact: read onto `device`, or (None) a copy-on-write file mapping.

    The mapping reads nothing up front: pages come in as the pruner copies the states into its
    own buffer, one micro-batch at a time, and are dropped again after each.
    """
    info = saved.infos["hidden"]
    if device is None:
        try:
            return HiddenBuffer.map_file(saved.path, info.start, info.shape, info.dtype)
        except (OSError, ValueError) as exc:
            raise StateError(f"{saved.path}: cannot map: {exc}") from None
    hidden = torch.empty(info.shape, dtype=info.dtype, device=device)
    _read(saved.path, info, hidden)
    return HiddenBuffer(hidden, Placement.DEVICE, torch.device(device))


def _read(path: Path, info: TensorInfo, out: torch.Tensor) -> None:
    try:
        _read_into(path, info, out)
    except OSError as exc:
        raise StateError(f"{path}: cannot read: {exc.strerror or exc}") from None


__all__ = [
    "Fingerprint",
    "SavedState",
    "fingerprint",
    "load_hidden",
    "load_state",
    "save_state",
]
