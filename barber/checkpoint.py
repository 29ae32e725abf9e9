"""Lazy, validated reading of Hugging Face safetensors checkpoints, one tensor or one block at a time.

`Checkpoint.open(dir)` reads only `config.json`, the optional `model.safetensors.index.json` and the
safetensors headers (with the bounded, validating reader of `barber.safetensors_format`, so a corrupt
or hostile file gives a one-line `CheckpointError`). Every tensor a block or the model needs is then
checked against the shape config.json implies.

Reads are lazy: `tensor(name)` maps the shard file and copies exactly that tensor's bytes out of the
mapping into fresh memory, then tells the kernel to drop those mapped pages (`madvise(DONTNEED)`), so
nothing of a finished block stays resident. Reads are serialised by a per-checkpoint lock, so a
prefetch thread (`BlockPrefetcher`) may read the next block while the caller computes. Returned
tensors own their memory and may be modified. This module does I/O only; the math is in `barber.model`.

A packed barber output (`--save-format packed`, `barber.packed`) reads like its dense output: config.json's
``barber.tensors`` names the packed linears, which `tensor` unpacks (bit for bit the dense output's).

Example::

    ckpt = Checkpoint.open("SmolLM2-135M")
    w = ckpt.block_weights(0, dtype=torch.float32)   # {"self_attn.q_proj.weight": ..., ...}
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from barber import packed as packed_format
from barber.config import ModelConfig, read_config_json
from barber.errors import CheckpointError
from barber.families import EMBED_KEYS, FINAL_KEYS, FamilySpec, family_for
from barber.layout import INDEX_FILE, REPORT_FILE, SINGLE_FILE, WORK_DIR
from barber.packed import Packed
from barber.safetensors_format import TensorInfo, read_safetensors_header
from barber.sysmem import drop_pages

log = logging.getLogger(__name__)

#: Bytes copied out of a mapped shard at a time by `Checkpoint.tensor`.
READ_CHUNK = 16 * 2**20

class Checkpoint:
    """A validated, lazily read Hugging Face checkpoint directory.

    Attributes:
        path: the directory.
        config: the parsed `ModelConfig`.
        family: the `FamilySpec` of `config.model_type`.
        num_layers: number of transformer blocks.
        tensor_names: every tensor name in the checkpoint, sorted.
        weight_map: tensor name -> shard file name.
        shard_files: shard file names, sorted.
    """

    def __init__(
        self, path: Path, config: ModelConfig, family: FamilySpec, infos: dict[str, TensorInfo],
        packed: dict[str, tuple[Packed, dict[str, TensorInfo]]] | None = None,
    ):
        """Use `Checkpoint.open`; this constructor does no validation."""
        self.path = path
        self.config = config
        self.family = family.for_config(config)
        self._infos = infos
        self.packed = packed or {}  # name -> (how it is stored, suffix -> its stored tensors)
        self._maps: dict[str, tuple[object, mmap.mmap]] = {}
        self._lock = threading.RLock()  # a prefetch thread may read the next block while this one computes
        self._block_shapes = family.block_shapes(config)
        self._globals = family.global_tensors(config)

    # ---- opening and validation -------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Checkpoint":
        """Open and validate a checkpoint directory (headers and shapes only; no tensor data is read).

        Raises:
            CheckpointError: a missing or empty directory, missing config.json or shards, corrupt or
                truncated files, an unsupported model_type, or a tensor missing or shaped unlike config.json.
        """
        root = Path(path)
        if not root.exists():
            raise CheckpointError(f"{root}: no such checkpoint directory")
        if not root.is_dir():
            raise CheckpointError(f"{root}: not a directory")
        try:
            empty = not any(root.iterdir())
        except OSError as exc:
            raise CheckpointError(f"{root}: cannot list: {exc.strerror or exc}") from None
        if empty:
            raise CheckpointError(f"{root}: empty checkpoint directory")
        if (root / WORK_DIR).exists() and not (root / REPORT_FILE).exists():
            raise CheckpointError(
                f"{root}: an unfinished barber-stream output, not a checkpoint "
                "(run the same barber-stream command again to finish it)"
            )
        raw = read_config_json(root / "config.json")
        model_type = raw.get("model_type")
        if not isinstance(model_type, str):
            raise CheckpointError(f"{root / 'config.json'}: no model_type")
        family = family_for(model_type)
        try:
            config = ModelConfig.from_dict(raw)
        except CheckpointError as exc:
            raise CheckpointError(f"{root / 'config.json'}: {exc}") from None
        family = family.for_config(config)
        infos, packed = _dense_view(root, _read_all_headers(root), raw.get("barber"))
        ckpt = cls(root, config, family, infos, packed)
        ckpt._validate_shapes()
        log.info("opened %s: %s, %d blocks, %d shard(s)", root, family.name, config.num_layers, len(ckpt.shard_files))
        return ckpt

    def _validate_shapes(self) -> None:
        """Every tensor the model needs exists with the shape config.json implies."""
        for i in range(self.num_layers):
            for local, shape in self._block_shapes.items():
                self._check(self.block_tensor_name(i, local), shape)
        for name, shape in self._globals.values():
            self._check(name, shape)

    def _check(self, name: str, shape: tuple[int, ...]) -> None:
        info = self._infos.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        if info.shape != shape:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has shape {list(info.shape)} but config.json implies {list(shape)}"
            )
        if not info.dtype.is_floating_point:
            raise CheckpointError(f"{self.path}: tensor {name!r} has non-float dtype {info.dtype}")

    # ---- description ---------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def tensor_names(self) -> list[str]:
        return sorted(self._infos)

    @property
    def weight_map(self) -> dict[str, str]:
        return {name: info.shard for name, info in self._infos.items()}

    @property
    def shard_files(self) -> list[str]:
        return sorted({info.shard for info in self._infos.values()})

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape and location of tensor `name` (no data is read)."""
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def block_tensor_name(self, i: int, local: str) -> str:
        """Full name of block-local tensor `local` (e.g. "self_attn.q_proj.weight") in block `i`."""
        if not 0 <= i < self.num_layers:
            raise IndexError(f"block {i} out of range [0, {self.num_layers})")
        return self.family.block_tensor_name(i, local)

    def block_tensor_names(self) -> list[str]:
        """Block-local names of the tensors every block has (weights, biases, norms)."""
        return list(self._block_shapes)

    # ---- reading -------------------------------------------------------------------------------

    def tensor(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one tensor: only its bytes are touched, copied out of the mapping into fresh memory.

        Args:
            name: full tensor name.
            dtype: convert to this dtype (default: the stored dtype).
            device: where the result lives.
        """
        if name in self.packed:
            how, parts = self.packed[name]
            try:
                dense = packed_format.unpack(how, {suffix: self._read(info) for suffix, info in parts.items()})
            except RuntimeError as exc:  # a damaged meta word or bitmask
                raise CheckpointError(f"{self.path}: packed tensor {name!r} cannot be unpacked: {exc}") from None
            return dense.to(device=device, dtype=dtype or how.dtype)
        return self._read(self.info(name)).to(device=device, dtype=dtype or self.info(name).dtype)

    def _read(self, info: TensorInfo) -> torch.Tensor:
        """One stored tensor's bytes, copied out of the mapping, as a CPU tensor of its stored dtype and shape."""
        nbytes = info.end - info.start
        raw = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            with self._lock:
                mm = self._map(info.shard)
                if info.end > len(mm):
                    raise CheckpointError(f"{self.path / info.shard}: file shrank since it was opened")
                dst = raw.numpy()
                # Copy in pieces, dropping each piece's pages at once: the mapped file never holds
                # more than READ_CHUNK bytes of this tensor in our RSS beside the copy.
                for lo in range(0, nbytes, READ_CHUNK):
                    hi = min(lo + READ_CHUNK, nbytes)
                    dst[lo:hi] = np.frombuffer(mm, dtype=np.uint8, count=hi - lo, offset=info.start + lo)
                    drop_pages(mm, info.start + lo, info.start + hi)
        return raw.view(info.dtype).reshape(info.shape)

    def block_weights(
        self, i: int, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """All tensors of block `i`, keyed by block-local name, read in file order."""
        names = {local: self.block_tensor_name(i, local) for local in self._block_shapes}
        order = sorted(names, key=lambda local: (self._infos[names[local]].shard, self._infos[names[local]].start))
        out = {local: self.tensor(names[local], dtype, device) for local in order}
        self.release()
        return {local: out[local] for local in names}

    def global_weights(
        self, keys: tuple[str, ...], dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Model-level tensors by `GLOBAL_KEYS` key; keys this model lacks are left out.

        A tied `lm_head` is returned as the token embedding.
        """
        out = {}
        for key in keys:
            if key == "lm_head" and self.config.tie_word_embeddings:
                key_name = self._globals["embed_tokens"][0]
            elif key in self._globals:
                key_name = self._globals[key][0]
            else:
                continue
            out[key] = self.tensor(key_name, dtype, device)
        self.release()
        return out

    def embedding_weights(self, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> dict:
        """Tensors `barber.model.Arch.embed` needs: embed_tokens (+ embed_positions, project_in)."""
        return self.global_weights(EMBED_KEYS, dtype, device)

    def final_weights(self, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> dict:
        """Tensors `barber.model.Arch.final_logits` needs: final norm, project_out, lm_head (tied or not)."""
        return self.global_weights(FINAL_KEYS, dtype, device)

    def _map(self, shard: str) -> mmap.mmap:
        if shard not in self._maps:
            try:
                f = open(self.path / shard, "rb")
            except OSError as exc:
                raise CheckpointError(f"{self.path / shard}: cannot open: {exc.strerror or exc}") from None
            try:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                f.close()
                raise CheckpointError(f"{self.path / shard}: cannot map: {exc}") from None
            self._maps[shard] = (f, mm)
        return self._maps[shard][1]

    def release(self) -> None:
        """Unmap all shard files (they are remapped on the next read)."""
        with self._lock:
            for f, mm in self._maps.values():
                mm.close()
                f.close()  # type: ignore[attr-defined]
            self._maps.clear()

    close = release

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {self.family.name}, {self.num_layers} blocks)"


class BlockPrefetcher:
    """Reads blocks in a background thread, one ahead, in their stored dtype on the CPU.

    `take(i)` returns block i's tensors (waiting for a read in flight, or reading now); `ahead(i)`
    starts reading block i. At most one block is read ahead. Conversion to the compute dtype and
    device happens in the caller, so values are the same as a direct read.
    """

    def __init__(self, ckpt: Checkpoint, enabled: bool = True):
        self.ckpt = ckpt
        self.enabled = enabled
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()

    def ahead(self, i: int) -> None:
        """Start reading block i in the background (no-op when disabled, out of range or in flight)."""
        if not self.enabled or not 0 <= i < self.ckpt.num_layers:
            return
        with self._lock:
            if i in self._pending:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="barber-prefetch")
            self._pending[i] = self._pool.submit(self.ckpt.block_weights, i)

    def take(self, i: int) -> dict[str, torch.Tensor]:
        """Block i's tensors in their stored dtype on the CPU."""
        with self._lock:
            future = self._pending.pop(i, None)
        if future is not None:
            return future.result()
        return self.ckpt.block_weights(i)

    def close(self) -> None:
        """Drop any block read ahead and stop the thread."""
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
            pool, self._pool = self._pool, None
        for future in pending:
            future.cancel()
        if pool is not None:
            pool.shutdown(wait=True)


def _read_all_headers(root: Path) -> dict[str, TensorInfo]:
    """Headers of the single file or of every shard of the index, cross-checked against the weight_map."""
    index = root / INDEX_FILE
    if index.exists():
        weight_map = _read_index(index)
        infos: dict[str, TensorInfo] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = root / shard
            if not shard_path.is_file():
                raise CheckpointError(f"{root}: missing shard {shard} (listed in {INDEX_FILE})")
            for name, info in read_safetensors_header(shard_path, shard).items():
                if weight_map.get(name) == shard:
                    infos[name] = info
        for name, shard in weight_map.items():
            if name not in infos:
                raise CheckpointError(f"{root / shard}: tensor {name!r} listed in {INDEX_FILE} is not in the shard")
        return infos
    single = root / SINGLE_FILE
    if single.is_file():
        return read_safetensors_header(single)
    raise CheckpointError(f"{root}: no {SINGLE_FILE} or {INDEX_FILE}")


def _dense_view(
    root: Path, infos: dict[str, TensorInfo], section: object
) -> tuple[dict[str, TensorInfo], dict[str, tuple[Packed, dict[str, TensorInfo]]]]:
    """The tensors as the model sees them: each packed linear (config.json barber.tensors) in place of its parts.

    A packed linear's `TensorInfo` is its dense dtype and shape in the shard of its values (offsets 0 to
    its dense size: it is never read directly); its two stored tensors must exist with the shapes and
    dtypes its entry implies (CheckpointError otherwise).
    """
    if not isinstance(section, dict) or section.get("save_format") != "packed":
        return infos, {}
    entries = section.get("tensors")
    if not isinstance(entries, dict):
        raise CheckpointError(f"{root / 'config.json'}: barber.save_format is packed but barber.tensors is missing")
    dense, packed = dict(infos), {}
    for name, entry in entries.items():
        how = packed_format.Packed.from_json(name, entry)
        parts = {}
        for suffix, (dtype, shape) in how.component_shapes().items():
            info = dense.pop(name + suffix, None)
            if info is None:
                raise CheckpointError(f"{root}: tensor {name + suffix!r} of packed {name!r} is missing")
            if info.dtype != dtype or info.shape != shape:
                raise CheckpointError(
                    f"{root}: tensor {name + suffix!r} is {info.dtype} {list(info.shape)}, "
                    f"its packed entry implies {dtype} {list(shape)}"
                )
            parts[suffix] = info
        shard = parts[packed_format.ENCODINGS[how.encoding][0]].shard
        dense[name] = TensorInfo(shard, how.dtype, how.shape, 0, how.dtype.itemsize * how.shape[0] * how.shape[1])
        packed[name] = (how, parts)
    return dense, packed


def _read_index(index: Path) -> dict[str, str]:
    """The weight_map of a sharded checkpoint; shard names must be plain file names."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{index}: unreadable index ({type(exc).__name__})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard:
            raise CheckpointError(f"{index}: invalid shard name {shard!r} for {name!r}")
    return weight_map
