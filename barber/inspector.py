"""`barber-inspect`: what a barber output holds, checked: per-layer sparsity and N:M validity, bytes, run facts.

`inspect_output_dir(path)` opens the directory with `barber.checkpoint.Checkpoint` (which validates every
header, shape and offset, so a truncated shard, a bad header or a missing tensor is a one-line
`CheckpointError`), reads every tensor once (packed linears unpacked) and returns an `Inspection`:

- per pruned linear (the shards' ``__metadata__["barber"]`` names them; in a checkpoint that is not a
  barber output, every block linear): shape, how it is stored, sparsity, and for an N:M pattern the
  number of groups of M consecutive columns holding more than N stored entries (every group is checked);
- bytes on disk (every safetensors file, headers included) against the same tensors stored dense;
- `weights_sha256`: a digest of every tensor's name, dtype, shape and dense bytes, the same for the dense
  and the packed output of one run in one dtype;
- from ``barber_report.json`` (when there): the settings, calibration, totals, and quality numbers.

`format_text` renders it for people; `Inspection.to_json` for scripts.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from barber.checkpoint import Checkpoint
from barber.errors import CheckpointError
from barber.layout import REPORT_FILE
from barber.prune import Pattern
from barber.safetensors_format import DTYPE_NAMES, read_header

__all__ = ["Inspection", "LayerCheck", "format_text", "inspect_output_dir"]


@dataclass(frozen=True)
class LayerCheck:
    """One pruned linear: where it is, how it is stored, its sparsity and (N:M) the groups breaking the pattern."""

    name: str
    block: int | None
    shape: tuple[int, ...]
    stored_as: str  # "dense", or a barber.packed encoding
    pattern: str | None  # the run's pattern (None: not a barber output)
    sparsity: float
    bad_groups: int | None  # N:M: groups with more than N stored entries; None: unstructured or unknown

    @property
    def valid(self) -> bool:
        return not self.bad_groups


@dataclass
class Inspection:
    """What `inspect_output_dir` found (see the module doc)."""

    path: str
    family: str
    num_layers: int
    finished: bool  # barber_report.json is there
    save: dict
    disk_bytes: int
    dense_bytes: int
    weights_sha256: str
    layers: list[LayerCheck] = field(default_factory=list)
    report: dict | None = None

    @property
    def valid(self) -> bool:
        return all(layer.valid for layer in self.layers)

    @property
    def sparsity(self) -> float:
        numel = sum(math.prod(layer.shape) for layer in self.layers)
        return sum(layer.sparsity * math.prod(layer.shape) for layer in self.layers) / numel if numel else 0.0

    def to_json(self) -> dict:
        out = asdict(self)
        out["layers"] = [{**asdict(layer), "shape": list(layer.shape), "valid": layer.valid} for layer in self.layers]
        out.update(valid=self.valid, sparsity=self.sparsity, bytes_ratio=self.disk_bytes / max(self.dense_bytes, 1))
        return out


def _pruned_entries(ckpt: Checkpoint) -> dict[str, dict]:
    """name -> its shard metadata entry ({"pattern", "sparsity", ...}) of every linear a barber run pruned."""
    entries: dict[str, dict] = {}
    for shard in ckpt.shard_files:
        raw = read_header(ckpt.path / shard).metadata.get("barber")
        if raw is None:
            continue
        try:
            entries.update(json.loads(raw)["tensors"])
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{ckpt.path / shard}: corrupt barber metadata") from None
    return entries


def _stored_mask(w: torch.Tensor) -> torch.Tensor:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[w.dtype.itemsize]
    return w.contiguous().view(ints) != 0


def _bad_groups(stored: torch.Tensor, pattern: Pattern) -> int | None:
    if not pattern.structured or stored.dim() != 2 or stored.shape[1] % pattern.m:
        return None
    return int((stored.view(stored.shape[0], -1, pattern.m).sum(-1) > pattern.n).sum())


def _read_report(path: Path) -> dict | None:
    if not (path / REPORT_FILE).is_file():
        return None
    try:
        report = json.loads((path / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / REPORT_FILE}: unreadable ({type(exc).__name__})") from None
    if not isinstance(report, dict):
        raise CheckpointError(f"{path / REPORT_FILE}: not a JSON object")
    return report


def _block_of(ckpt: Checkpoint) -> dict[str, tuple[int, str]]:
    """full name -> (block, local name) of every block linear weight."""
    return {ckpt.block_tensor_name(i, local + ".weight"): (i, local)
            for i in range(ckpt.num_layers) for local in ckpt.family.linears}


def inspect_output_dir(path: str | Path, progress: bool = False) -> Inspection:
    """Inspect a barber output (or any checkpoint barber reads); reads every tensor once.

    Raises:
        CheckpointError: a damaged directory (truncated shard, bad header, missing tensor, unreadable report).
    """
    ckpt = Checkpoint.open(path)
    report = _read_report(ckpt.path)
    entries = _pruned_entries(ckpt)
    linears = _block_of(ckpt)
    targets = entries.keys() if entries else linears.keys()
    digest = hashlib.sha256()
    layers, dense_bytes = [], 0
    for name in tqdm(ckpt.tensor_names, desc="reading", unit="tensor", disable=not progress, leave=False):
        w = ckpt.tensor(name)
        dense_bytes += w.numel() * w.element_size()
        digest.update(f"{name}|{DTYPE_NAMES[w.dtype]}|{list(w.shape)}|".encode())
        digest.update(memoryview(w.contiguous().view(torch.uint8).reshape(-1).numpy()))
        if name in targets:
            stored = _stored_mask(w)
            pattern = entries.get(name, {}).get("pattern")
            bad = _bad_groups(stored, Pattern.parse(pattern)) if pattern else None
            how = ckpt.packed[name][0].encoding if name in ckpt.packed else "dense"
            sparsity = 1 - int(stored.sum()) / max(stored.numel(), 1)
            layers.append(LayerCheck(name, linears.get(name, (None,))[0], tuple(w.shape), how, pattern, sparsity, bad))
        del w
    ckpt.release()
    disk = sum((ckpt.path / shard).stat().st_size for shard in ckpt.shard_files)
    section = _config_section(ckpt.path)
    save = {"format": section.get("save_format", "dense"), "dtype": section.get("save_dtype")}
    layers.sort(key=lambda layer: (layer.block if layer.block is not None else -1, layer.name))
    return Inspection(str(ckpt.path), ckpt.family.name, ckpt.num_layers, report is not None, save, disk, dense_bytes,
                      digest.hexdigest(), layers, report)


def _config_section(path: Path) -> dict:
    try:
        section = json.loads((path / "config.json").read_text(encoding="utf-8")).get("barber", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return section if isinstance(section, dict) else {}


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def format_text(ins: Inspection, layers: bool = True) -> str:
    """A human-readable account of `ins`: facts, settings, quality, then one line per pruned linear."""
    lines = [f"{ins.path}: {ins.family}, {ins.num_layers} blocks, "
             + ("a finished barber output" if ins.finished else "no barber_report.json (not a finished barber run)")]
    dtype = ins.save["dtype"] or "input dtypes"
    lines.append(f"stored {ins.save['format']} ({dtype}): {_mb(ins.disk_bytes)} on disk, "
                 f"{ins.disk_bytes / max(ins.dense_bytes, 1):.3f} of dense ({_mb(ins.dense_bytes)})")
    lines.append(f"weights sha256 {ins.weights_sha256}")
    bad = [layer for layer in ins.layers if not layer.valid]
    patterns = sorted({layer.pattern for layer in ins.layers if layer.pattern})
    lines.append(f"{len(ins.layers)} pruned linears, sparsity {ins.sparsity:.4f}"
                 + (f", pattern {', '.join(patterns)}" if patterns else "")
                 + (f": {len(bad)} break their pattern" if bad else ", every group valid" if patterns else ""))
    if ins.report:
        r = ins.report
        s = r.get("settings", {})
        lines.append(f"run: {s.get('pattern')} {s.get('init')}, rebuild {s.get('rebuild')}, re-fit "
                     f"{s.get('reconstruct')}; {r.get('swaps', 0)} swaps; calibration "
                     f"{r.get('calibration', {}).get('nsamples')} x {r.get('calibration', {}).get('seqlen')} tokens; "
                     f"{r.get('seconds', {}).get('total', 0):.1f} s; barber {r.get('barber_version')}")
        for kind, result in (r.get("eval") or {}).items():
            if result:
                lines.append(f"{kind} perplexity {result['ppl']:.4f} ({result['n_windows']} windows)")
    if layers:
        lines.append(f"{'tensor':<48} {'shape':>12} {'stored as':>12} {'sparsity':>9}  pattern")
        for layer in ins.layers:
            check = "" if layer.bad_groups is None else ("ok" if layer.valid else f"{layer.bad_groups} bad groups")
            lines.append(f"{layer.name:<48} {'x'.join(map(str, layer.shape)):>12} {layer.stored_as:>12} "
                         f"{layer.sparsity:>9.4f}  {layer.pattern or '-'} {check}".rstrip())
    return "\n".join(lines)
