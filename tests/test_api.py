"""The public API: the README's "Python API" example runs as written (on a tiny model), and the exports exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_models import make_tiny_checkpoint

import barber
from barber.report import RunReport

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_example() -> str:
    section = README.read_text(encoding="utf-8").split("### Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    ckpt = make_tiny_checkpoint(tmp_path, "llama")
    text = "the quick brown fox jumps over the lazy dog; " * 400
    (tmp_path / "calib.txt").write_text(text)
    (tmp_path / "held-out.txt").write_text(text[::-1])
    code = _readme_example().replace('"ckpt"', repr(str(ckpt)))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # the example prints sparsity and perplexity
    report = namespace["report"]
    assert report.sparsity == pytest.approx(0.5)
    assert report.settings["reconstruct"] == "subblock" and report.settings["pattern"] == "2:4"
    assert report.eval["pruned"]["ppl"] > 1
    assert RunReport.from_json(report.to_json()).to_json() == report.to_json()
    assert (tmp_path / "out" / "barber_report.json").exists()


def test_public_names_resolve():
    for name in barber.__all__:
        assert getattr(barber, name) is not None, name
    with pytest.raises(AttributeError):
        getattr(barber, "no_such_name")


def test_import_barber_is_cheap():
    """`import barber` imports neither torch nor any submodule (the API loads on first use)."""
    code = "import sys, barber; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('barber.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_settings_errors_reach_library_users_with_the_cli_wording():
    with pytest.raises(barber.SettingsError, match=r"^sparsity must be in \[0, 1\), got 1.5$"):
        barber.PruneSettings(sparsity=1.5)
    with pytest.raises(barber.SettingsError, match="granularity must be row for pattern 2:4"):
        barber.PruneSettings(pattern=barber.Pattern(2, 4), granularity=barber.Granularity.LAYER)
