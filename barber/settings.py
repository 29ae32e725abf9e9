"""What decides the pruned weights: `PruneSettings`, which validates itself, and the reference defaults.

A library user gets the command line's checks at construction: an impossible combination raises
`SettingsError` (a `UsageError`, exit code 2) whose `field` names the offending setting, and the
CLI turns the field into its option name. Files, progress and memory budgets are not settings:
they never change a value. Neither does `batch_size`, the micro-batch wish: every statistic is a
sum in a fixed order over `sample_groups` groups of samples (`barber.fold`), whatever the micro-batch
or the number of ranks; `fingerprinted()` leaves it out.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass

import torch

from barber.errors import SettingsError
from barber.prune import Granularity, InitMethod, Metric, Pattern

__all__ = ["PruneSettings", "Reconstruct", "SettingsError", "default_rebuild"]


class Reconstruct(enum.Enum):
    """How the kept weights are re-fitted on the final mask (docs/algorithm.md §9)."""

    NONE = "none"  # keep the values the mask was applied to (dense, or SparseGPT's updated ones)
    LAYER = "layer"  # each linear against the dense layer's output on its input from the statistics pass
    SUBBLOCK = "subblock"  # linear by linear through the sub-block, against the dense sub-block's output


def default_rebuild(init: InitMethod, pattern: Pattern) -> tuple[float, Granularity]:
    """The reference code's rebuild ratio and granularity for an initial method (docs/algorithm.md §4.8)."""
    if pattern.structured:
        return 0.01, Granularity.ROW
    return {
        InitMethod.WANDA: (0.01, Granularity.ROW),
        InitMethod.MAGNITUDE: (0.1, Granularity.BLOCK),
        InitMethod.SPARSEGPT: (0.1, Granularity.LAYER),
    }[init]


@dataclass(frozen=True)
class PruneSettings:
    """Everything that decides the pruned weights (and nothing about files or progress).

    Raises:
        SettingsError: at construction, for a value out of range or a contradiction.
    """

    sparsity: float = 0.5
    pattern: Pattern = Pattern()
    init: InitMethod = InitMethod.WANDA
    rebuild: bool = True
    ratio: float = 0.01
    granularity: Granularity = Granularity.ROW
    metric: Metric = Metric.WG
    retain_reconstruction: bool = False
    magnitude_per_matrix: bool = False
    sparsegpt_blocksize: int = 128
    sparsegpt_percdamp: float = 0.01
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    batch_size: int = 0  # samples per forward/backward call; 0 = automatic, within the memory budget
    # the calibration samples' groups of the order-fixed sums (barber.fold; at most the sample count)
    sample_groups: int = 8
    allow_tf32: bool = False  # let float32 matmuls on a GPU use TF32 (see barber.pipeline)
    reconstruct: Reconstruct = Reconstruct.NONE
    reconstruct_damp: float = 0.01  # ridge towards the dense weights, times the mean diagonal of X^T X
    reconstruct_shrink: float = 0.25  # X^T X (and X_d^T X_s) pulled this far towards its diagonal
    # conjugate-gradient iterations per linear (at most; see tools/experiments/refit_solvers.py)
    reconstruct_iters: int = 8

    def __post_init__(self) -> None:
        if not (0 <= self.sparsity < 1):  # also false for NaN
            raise SettingsError("sparsity", f"must be in [0, 1), got {self.sparsity}")
        if self.pattern.structured:
            implied = 1 - self.pattern.n / self.pattern.m
            if abs(self.sparsity - implied) > 1e-12:
                raise SettingsError(
                    "sparsity", f"{self.sparsity} contradicts pattern {self.pattern} (which prunes {implied:g})"
                )
            if self.granularity is not Granularity.ROW:
                raise SettingsError(
                    "granularity", f"must be row for pattern {self.pattern}, got {self.granularity.value}"
                )
        if not (0 <= self.ratio <= 1):
            raise SettingsError("ratio", f"must be in [0, 1], got {self.ratio}")
        if self.batch_size < 0:
            raise SettingsError("batch_size", f"is too small: {self.batch_size}")
        if self.sample_groups < 1:
            raise SettingsError("sample_groups", f"must be at least 1, got {self.sample_groups}")
        if self.sparsegpt_blocksize < 1:
            raise SettingsError("sparsegpt_blocksize", f"must be at least 1, got {self.sparsegpt_blocksize}")
        for name in ("sparsegpt_percdamp", "reconstruct_damp"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise SettingsError(name, f"must be a finite number >= 0, got {value}")
        if not (0 <= self.reconstruct_shrink <= 1):
            raise SettingsError("reconstruct_shrink", f"must be in [0, 1], got {self.reconstruct_shrink}")
        if self.reconstruct_iters < 1:
            raise SettingsError("reconstruct_iters", f"must be at least 1, got {self.reconstruct_iters}")

    def describe(self) -> dict:
        """A JSON-ready description of the settings."""
        out = asdict(self)
        out["pattern"] = str(self.pattern)
        out["init"] = self.init.value
        out["granularity"] = self.granularity.value
        out["metric"] = self.metric.value
        out["dtype"] = str(self.dtype).removeprefix("torch.")
        out["reconstruct"] = self.reconstruct.value
        return out

    def fingerprinted(self) -> dict:
        """`describe()` less what never changes a value (the micro-batch wish, the GPU index): what a resume
        must match."""
        out = self.describe()
        del out["batch_size"]
        out["device"] = torch.device(self.device).type  # which GPU of a node is no value
        return out

    def groups(self, nsamples: int) -> int:
        """The sample groups of a run on `nsamples` samples: `sample_groups`, at most one per sample."""
        return min(self.sample_groups, nsamples)


@dataclass(frozen=True)
class Recipe:
    """A named starting point for `PruneSettings`: the initial method and which steps run.

    The rebuild's ratio and granularity follow `default_rebuild` for the initial method and
    pattern; every explicit setting overrides the recipe's.
    """

    name: str
    summary: str
    init: InitMethod
    rebuild: bool
    reconstruct: Reconstruct
    retain_reconstruction: bool = False

    def settings(self, pattern: Pattern = Pattern(), sparsity: float | None = None, **overrides) -> PruneSettings:
        """PruneSettings of this recipe for `pattern` (sparsity None: 0.5, or what N:M implies)."""
        init = overrides.pop("init", self.init)
        ratio, granularity = default_rebuild(init, pattern)
        if sparsity is None:
            sparsity = 1 - pattern.n / pattern.m if pattern.structured else 0.5
        values = dict(
            sparsity=sparsity, pattern=pattern, init=init, rebuild=self.rebuild, ratio=ratio, granularity=granularity,
            reconstruct=self.reconstruct, retain_reconstruction=self.retain_reconstruction,
        )
        values.update(overrides)
        return PruneSettings(**values)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "paper", "LLM-Barber as published and as the reference code runs it: Wanda, the rebuild at the "
            "reference ratio and granularity, weights reset to their dense values, no re-fit",
            InitMethod.WANDA, True, Reconstruct.NONE,
        ),
        Recipe(
            "refit", "Wanda masks, no rebuild, and the kept weights re-fitted linear by linear through each "
            "sub-block against the dense sub-block's outputs (X^T X shrunk towards its diagonal)",
            InitMethod.WANDA, False, Reconstruct.SUBBLOCK,
        ),
    )
}
#: The recipe used when none is named: the best measured (README, "Beyond the paper").
DEFAULT_RECIPE = "refit"
