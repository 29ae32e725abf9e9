"""A whole pruning run on files: output directory checks, the block loop, shard assembly, report.

Output layout (`--out`): the input's non-weight files (config.json, tokenizer files, ...), the
safetensors shards with the input's names, tensor names and index, pruned entries exactly +0.0,
and `barber_report.json`, written last: a directory without it is not a finished result.
While running, pruned blocks are kept in `--out/.barber-work/` (one file per block), which
is removed at the end.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from barber import __version__
from barber.checkpoint import INDEX_FILE, Checkpoint
from barber.errors import UsageError
from barber.pipeline import BlockState, Pruner, PruneSettings
from barber.writer import TensorSpec, copy_side_files, fsync_dir, write_json_atomic, write_safetensors

log = logging.getLogger(__name__)

REPORT_NAME = "barber_report.json"
WORK_DIR = ".barber-work"


def check_output_dir(ckpt_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Refuse an output inside the input, and an existing non-empty output unless `overwrite`.

    With `overwrite`, only a directory that holds a barber result (or its work directory) is
    cleared; anything else is refused, so a mistyped path never deletes unrelated files.
    """
    src, dst = ckpt_dir.resolve(), out_dir.resolve()
    if dst == src or src in dst.parents:
        raise UsageError(f"--out {out_dir} is the input checkpoint or inside it; choose another directory")
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()):
        if not overwrite:
            raise UsageError(f"--out {out_dir} is not empty (use --overwrite to replace a previous result)")
        if not ((dst / REPORT_NAME).exists() or (dst / WORK_DIR).exists()):
            raise UsageError(f"--out {out_dir} is not empty and holds no barber result; refusing to overwrite it")
        shutil.rmtree(dst)


def _shard_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


class BlockStore:
    """The pruned linears of finished blocks, one safetensors file per block in the work directory."""

    def __init__(self, work: Path, ckpt: Checkpoint):
        self.work = work
        self.ckpt = ckpt
        self.location: dict[str, Path] = {}  # full tensor name -> block file

    def path(self, i: int) -> Path:
        return self.work / f"block-{i:05d}.safetensors"

    def write(self, i: int, linears: dict[str, torch.Tensor]) -> None:
        """Store block i's pruned linear weights under their full names, in the input's dtypes."""
        specs = []
        for local, tensor in linears.items():
            name = self.ckpt.block_tensor_name(i, local + ".weight")
            stored = tensor.detach().to("cpu", self.ckpt.info(name).dtype).contiguous()
            specs.append(TensorSpec(name, stored.dtype, tuple(stored.shape), lambda t=stored: t))
            self.location[name] = self.path(i)
        write_safetensors(self.path(i), specs)

    def read(self, name: str) -> torch.Tensor:
        with safe_open(str(self.location[name]), framework="pt") as f:
            return f.get_tensor(name)


def assemble(ckpt: Checkpoint, store: BlockStore, out_dir: Path, layer_info: dict[str, dict]) -> int:
    """Write the output shards (same names, tensors and index as the input); returns total bytes."""
    total = 0
    by_shard: dict[str, list[str]] = {}
    for name, shard in ckpt.weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    for shard in tqdm(sorted(by_shard), desc="writing shards", unit="shard", leave=False):
        specs = []
        for name in by_shard[shard]:
            info = ckpt.info(name)
            produce = (lambda n=name: store.read(n)) if name in store.location else (lambda n=name: ckpt.tensor(n))
            specs.append(TensorSpec(name, info.dtype, tuple(info.shape), produce))
        metadata = _shard_metadata(ckpt.path / shard)
        metadata.setdefault("format", "pt")
        pruned_here = {n: layer_info[n] for n in by_shard[shard] if n in layer_info}
        if pruned_here:
            metadata["barber"] = json.dumps({"version": __version__, "tensors": pruned_here}, sort_keys=True)
        total += write_safetensors(out_dir / shard, specs, metadata)
        ckpt.release()
    if (ckpt.path / INDEX_FILE).exists():
        index = json.loads((ckpt.path / INDEX_FILE).read_text())
        index.setdefault("metadata", {})["total_size"] = total
        index["weight_map"] = dict(sorted(ckpt.weight_map.items()))
        write_json_atomic(out_dir / INDEX_FILE, index)
    return total


def prune_checkpoint(
    ckpt: Checkpoint,
    out_dir: Path,
    settings: PruneSettings,
    calib_ids: torch.Tensor,
    *,
    overwrite: bool = False,
    progress: bool = True,
    extra_report: dict | None = None,
) -> dict:
    """Prune `ckpt` into `out_dir`, block by block, and return the report (also written there)."""
    started = time.perf_counter()
    check_output_dir(ckpt.path, out_dir, overwrite)
    work = out_dir / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    if settings.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    pruner = Pruner(ckpt, settings, progress=progress)
    store = BlockStore(work, ckpt)
    t0 = time.perf_counter()
    state: BlockState = pruner.start(calib_ids)
    embed_seconds = time.perf_counter() - t0
    blocks = tqdm(range(ckpt.num_layers), desc="pruning", unit="block", disable=not progress)
    for _ in blocks:
        state = pruner.run_block(state, store.write)
    blocks.close()
    del state.hidden

    layer_info = {}
    for block in state.blocks:
        for local, info in block["layers"].items():
            layer_info[ckpt.block_tensor_name(block["block"], local + ".weight")] = {
                "pattern": str(settings.pattern),
                "sparsity": info["sparsity"],
            }
    t0 = time.perf_counter()
    copy_side_files(ckpt.path, out_dir)
    total_bytes = assemble(ckpt, store, out_dir, layer_info)
    assemble_seconds = time.perf_counter() - t0
    shutil.rmtree(work)

    report = build_report(ckpt, settings, state.blocks, calib_ids, extra_report or {})
    report["seconds"]["embed"] = embed_seconds
    report["seconds"]["assemble"] = assemble_seconds
    report["seconds"]["total"] = time.perf_counter() - started
    report["output_bytes"] = total_bytes
    if settings.device.startswith("cuda"):
        report["peak_gpu_memory"] = torch.cuda.max_memory_allocated()
    write_json_atomic(out_dir / REPORT_NAME, report)
    fsync_dir(out_dir)
    return report


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
    return {
        "barber_version": __version__,
        "input": str(ckpt.path),
        "family": ckpt.family.name,
        "settings": settings.describe(),
        "calibration": {"nsamples": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1]), **extra.pop("calibration", {})},
        "sparsity": 1 - kept / numel if numel else 0.0,
        "swaps": swaps,
        "blocks": blocks,
        "seconds": seconds,
        "peak_rss": max((b["peak_rss"] for b in blocks), default=0),
        **extra,
    }
