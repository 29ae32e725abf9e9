"""What a run produces, as typed records: `LayerStats`, `SubblockReport`, `BlockReport`, `RunReport`.

One place defines the report. The pruner builds a `BlockReport` per block; the resume state
stores them (`to_json`) and reads them back (`from_json`, which also reads states written before
a field existed); `barber.run` combines them into the `RunReport` written as
`barber_report.json`. The JSON keeps the layout of earlier versions, plus `report_version`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["REPORT_VERSION", "BlockReport", "LayerStats", "RunReport", "SubblockReport"]

#: Version of the report's JSON layout (1: before this field existed).
REPORT_VERSION = 2


@dataclass(frozen=True)
class LayerStats:
    """One pruned linear: shape [out, in], kept count, sparsity, and the least and most sparse row's sparsity."""

    shape: tuple[int, int]
    kept: int
    sparsity: float
    row_sparsity: tuple[float, float]

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "kept": self.kept, "sparsity": self.sparsity,
                "row_sparsity": list(self.row_sparsity)}

    @classmethod
    def from_json(cls, d: dict) -> LayerStats:
        rows = d.get("row_sparsity", [d["sparsity"]] * 2)  # states from before row_sparsity
        return cls(tuple(d["shape"]), int(d["kept"]), float(d["sparsity"]), (float(rows[0]), float(rows[1])))


@dataclass(frozen=True)
class SubblockReport:
    """One sub-block ("attn" or "mlp"): output error against the dense sub-block, swaps, re-fit errors.

    `loss_before` (the initial masks) and `swaps` exist with the rebuild, `reconstruct` with the re-fit;
    `loss_after` is the error of the final weights (docs/algorithm.md §2.4).
    """

    subblock: str
    loss_after: float
    loss_before: float | None = None
    swaps: dict[str, int] = field(default_factory=dict)
    reconstruct: dict | None = None

    def to_json(self) -> dict:
        out: dict = {"subblock": self.subblock}
        if self.loss_before is not None:
            out["loss_before"] = self.loss_before
        out["loss_after"] = self.loss_after
        if self.loss_before is not None or self.swaps:
            out["swaps"] = dict(self.swaps)
        if self.reconstruct is not None:
            out["reconstruct"] = self.reconstruct
        return out

    @classmethod
    def from_json(cls, d: dict) -> SubblockReport:
        return cls(d["subblock"], d["loss_after"], d.get("loss_before"), dict(d.get("swaps", {})), d.get("reconstruct"))


@dataclass(frozen=True)
class BlockReport:
    """One block: its linears, its sub-blocks, the seconds of each phase, and the peaks when it ended."""

    block: int
    layers: dict[str, LayerStats]
    subblocks: list[SubblockReport]
    seconds: dict[str, float]
    peak_rss: int
    peak_gpu: int | None = None
    exchanged: int | None = None  # bytes rank 0 sent and received in the block (a data-parallel run)
    unreached: tuple[str, ...] = ()  # linears no calibration token reached (unchosen experts): pruned by magnitude

    def to_json(self) -> dict:
        out = {
            "block": self.block,
            "layers": {n: s.to_json() for n, s in self.layers.items()},
            "subblocks": [s.to_json() for s in self.subblocks],
            "seconds": dict(self.seconds),
            "peak_rss": self.peak_rss,
        }
        if self.peak_gpu is not None:
            out["peak_gpu"] = self.peak_gpu
        if self.exchanged is not None:
            out["exchanged_bytes"] = self.exchanged
        if self.unreached:
            out["unreached"] = list(self.unreached)
        return out

    @classmethod
    def from_json(cls, d: dict) -> BlockReport:
        return cls(
            int(d["block"]), {n: LayerStats.from_json(s) for n, s in d["layers"].items()},
            [SubblockReport.from_json(s) for s in d["subblocks"]], dict(d["seconds"]), int(d["peak_rss"]),
            d.get("peak_gpu"), d.get("exchanged_bytes"), tuple(d.get("unreached", ())),
        )

    @property
    def swaps(self) -> int:
        return sum(sum(s.swaps.values()) for s in self.subblocks)


@dataclass
class RunReport:
    """The whole run: inputs, settings, totals over blocks, time, memory, and (with an evaluation) perplexity.

    `extra` holds what a caller added (`prune_checkpoint(extra_report=...)`), merged at the top level.
    """

    input: str
    family: str
    settings: dict
    calibration: dict
    blocks: list[BlockReport]
    barber_version: str
    seconds: dict[str, float] = field(default_factory=dict)
    output_bytes: int = 0
    memory: dict | None = None
    resumed_at_block: int = 0
    peak_gpu_memory: int | None = None
    eval: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        layers = [s for b in self.blocks for s in b.layers.values()]
        numel = sum(s.shape[0] * s.shape[1] for s in layers)
        return 1 - sum(s.kept for s in layers) / numel if numel else 0.0

    @property
    def row_sparsity(self) -> tuple[float, float]:
        rows = [s.row_sparsity for b in self.blocks for s in b.layers.values()]
        return (min(r[0] for r in rows), max(r[1] for r in rows)) if rows else (0.0, 0.0)

    @property
    def swaps(self) -> int:
        return sum(b.swaps for b in self.blocks)

    @property
    def peak_rss(self) -> int:
        return max((b.peak_rss for b in self.blocks), default=0)

    def phase_seconds(self) -> dict[str, float]:
        """Seconds per phase summed over blocks."""
        out: dict[str, float] = {}
        for b in self.blocks:
            for phase, value in b.seconds.items():
                out[phase] = out.get(phase, 0.0) + value
        return out

    def to_json(self) -> dict:
        out = {
            "report_version": REPORT_VERSION,
            "barber_version": self.barber_version,
            "input": self.input,
            "family": self.family,
            "settings": self.settings,
            "calibration": self.calibration,
            "sparsity": self.sparsity,
            "row_sparsity": list(self.row_sparsity),
            "swaps": self.swaps,
            "blocks": [b.to_json() for b in self.blocks],
            "seconds": {**self.phase_seconds(), **self.seconds},
            "peak_rss": self.peak_rss,
            **self.extra,
            "output_bytes": self.output_bytes,
            "memory": self.memory,
        }
        if self.resumed_at_block:
            out["resumed_at_block"] = self.resumed_at_block
        unreached = sum(len(b.unreached) for b in self.blocks)
        if unreached:  # expert linears no calibration token reached, over all blocks (pruned by magnitude)
            out["unreached_linears"] = unreached
        if self.peak_gpu_memory is not None:
            out["peak_gpu_memory"] = self.peak_gpu_memory
        if self.eval is not None:
            out["eval"] = self.eval
        return out

    @classmethod
    def from_json(cls, d: dict) -> RunReport:
        """A report read back from `barber_report.json` (any version)."""
        known = {"report_version", "barber_version", "input", "family", "settings", "calibration", "sparsity",
                 "row_sparsity", "swaps", "blocks", "seconds", "peak_rss", "output_bytes", "memory",
                 "resumed_at_block", "peak_gpu_memory", "eval", "unreached_linears"}
        blocks = [BlockReport.from_json(b) for b in d["blocks"]]
        phases = {}
        for b in blocks:
            phases.update(b.seconds)
        seconds = {k: v for k, v in d.get("seconds", {}).items() if k not in phases}
        return cls(
            d["input"], d["family"], d["settings"], d["calibration"], blocks, d.get("barber_version", ""),
            seconds, d.get("output_bytes", 0), d.get("memory"), d.get("resumed_at_block", 0),
            d.get("peak_gpu_memory"), d.get("eval"), {k: v for k, v in d.items() if k not in known},
        )
