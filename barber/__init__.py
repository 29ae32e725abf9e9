"""barber: a low-memory, streaming one-shot pruner for large language models.

Implements LLM-Barber (block-aware rebuild of sparsity masks with a weight x gradient
metric) on top of magnitude, Wanda and SparseGPT initial masks, and a least-squares re-fit
of the kept weights, reading Hugging Face checkpoints one transformer block at a time.

The public API (imported on first use, so `import barber` stays cheap)::

    from barber import PruneSettings, Pattern, prune_and_evaluate, Evaluation
    report = prune_and_evaluate("ckpt", "out", PruneSettings(pattern=Pattern(2, 4)), calib="text.txt")
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it.
_EXPORTS = {
    "Checkpoint": "barber.checkpoint",
    "PruneSettings": "barber.settings",
    "Reconstruct": "barber.settings",
    "RECIPES": "barber.settings",
    "SettingsError": "barber.settings",
    "Pattern": "barber.prune",
    "InitMethod": "barber.prune",
    "Granularity": "barber.prune",
    "Metric": "barber.prune",
    "MemoryBudget": "barber.budget",
    "prune_checkpoint": "barber.run",
    "prune_and_evaluate": "barber.api",
    "Evaluation": "barber.api",
    "perplexity": "barber.evaluate",
    "load_calibration": "barber.calib",
    "load_tokenizer": "barber.tokenizer",
    "BarberError": "barber.errors",
    "load_pruned": "barber.load",
    "SaveFormat": "barber.packed",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'barber' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
