"""tools/experiments/quality.py: the configurations it runs and the tables it writes (no pruning here).

The script is loaded from its file (tools/ is not on the path and is not a package): its table code
is pure, but it lives in the script that produces the README's table.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest

from barber.prune import Granularity, InitMethod, Metric
from barber.settings import PruneSettings

QUALITY = Path(__file__).resolve().parents[1] / "tools" / "experiments" / "quality.py"


def _load_script(path: Path):
    """Import a script by file path, as module `tool_<stem>`."""
    spec = importlib.util.spec_from_file_location(f"tool_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


quality = _load_script(QUALITY)

META = {"nsamples": 32, "seed": 0, "seqlen": 256, "calib_name": "c.txt", "eval_windows": 4, "eval_seqlen": 512,
        "eval_name": "e.txt", "dtype": "float32", "device": "cpu"}


def _result(ppl: float, *, nsamples: int | None = None, seed: int | None = None, **settings) -> dict:
    r = {"ppl": ppl, "settings": PruneSettings(**settings).describe()}
    if nsamples is not None:
        r["nsamples"] = nsamples
    if seed is not None:
        r["seed"] = seed
    return r


def _rows(text: str, caption_start: str) -> dict[str, list[str]]:
    """The body rows of the table whose caption starts with `caption_start`, by first cell."""
    block = text[text.index(caption_start):].split("\n\n")[1]
    lines = block.splitlines()[2:]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def test_every_sweep_configuration_is_distinct_and_named_after_its_settings():
    runs = quality.sweep()
    keys = {(r.settings, r.nsamples, r.seed) for r in runs.values()}
    assert len(keys) == len(runs)
    for name, run in runs.items():
        s = run.settings
        assert name.startswith("wanda 50%") and s.init is InitMethod.WANDA
        if s.rebuild:
            assert f"({s.granularity.value}, a={s.ratio:g}" in name
        assert (f"{run.nsamples} calibration windows" in name) == (run.nsamples is not None)
        assert (f"seed {run.seed}" in name) == (run.seed is not None)
    assert sum(r.nsamples is not None for r in runs.values()) == 3 * len(quality.CALIB_SIZES)
    main = quality.main_table()
    assert main["dense"].settings is None and len(main) == 22
    assert sum(r.settings.retain_reconstruction for r in main.values() if r.settings) == 3


def test_grids_place_each_run_in_its_ratio_and_granularity_cell():
    results = {
        "base": _result(50.0, rebuild=False),
        "a": _result(51.0, ratio=0.01, granularity=Granularity.ROW),
        "b": _result(52.0, ratio=0.1, granularity=Granularity.ROW),
        "c": _result(53.0, ratio=0.1, granularity=Granularity.COLUMN),
        "d": _result(54.0, ratio=0.01, granularity=Granularity.BLOCK),
        "other seed": _result(99.0, ratio=0.01, granularity=Granularity.COLUMN, seed=3),  # not in the grid
        "w": _result(40.0, ratio=0.1, granularity=Granularity.ROW, metric=Metric.W),  # one cell: no grid
        "batch 16": _result(98.0, ratio=0.1, granularity=Granularity.ROW, batch_size=16),  # not in the grid
    }
    text = quality.grids(results, META)
    assert "wanda 50% + rebuild, metric wg" in text and "without the rebuild 50.00" in text
    assert "metric w:" not in text
    assert re.search(r"\| a \| (.*) \|", text).group(1).split(" | ") == ["row", "block", "column"]  # those run
    rows = _rows(text, "wanda 50% + rebuild, metric wg")
    assert rows == {"0.01": ["51.00", "54.00", ""], "0.1": ["52.00", "", "53.00"]}


def test_axis_tables_compare_at_the_default_of_the_other_axis():
    results = {
        "base": _result(50.0, rebuild=False),
        "base 16": _result(51.0, rebuild=False, nsamples=16),
        "rb": _result(49.0, ratio=0.1),
        "rb 16": _result(48.0, ratio=0.1, nsamples=16),
        "base seed 1": _result(52.0, rebuild=False, seed=1),
        "rb 16 seed 1": _result(1.0, ratio=0.1, nsamples=16, seed=1),  # varies both: in neither table
        "rb batch 16": _result(2.0, ratio=0.1, batch_size=16),  # another micro-batch: in neither table
        "rb 16 batch 16": _result(3.0, ratio=0.1, nsamples=16, batch_size=16),
    }
    text = quality.axis_tables(results, META)
    by_size = _rows(text, "Perplexity by calibration windows")
    assert by_size == {"16": ["51.00", "48.00"], "32": ["50.00", "49.00"]}
    by_seed = _rows(text, "Perplexity by calibration seed")
    assert by_seed == {"0": ["50.00"], "1": ["52.00"]}


def test_reconstruction_ratio_is_the_geometric_mean_over_sub_blocks():
    def sb(before: float, after: float) -> dict:
        return {"loss_before": before, "loss_after": after}

    report = {"blocks": [{"subblocks": [sb(1.0, 0.5), sb(2.0, 4.0)]}, {"subblocks": [sb(0.0, 0.0), sb(3.0, 3.0)]}]}
    assert quality.reconstruction_ratio(report) == pytest.approx(math.exp((math.log(0.5) + math.log(2.0) + 0) / 3))
    assert quality.reconstruction_ratio({"blocks": [{"subblocks": [sb(0.0, 0.0)]}]}) is None
