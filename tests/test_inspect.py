"""barber-inspect on good and damaged outputs, and the report for people (report.md, report.png)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers_models import make_tiny_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

from barber.checkpoint import Checkpoint
from barber.cli import inspect_main, stream_main
from barber.layout import REPORT_MD, REPORT_PNG
from barber.packed import SaveFormat
from barber.prune import Pattern
from barber.report_view import PNG_SIZE
from barber.run import prune_checkpoint
from barber.settings import PruneSettings

pytestmark = pytest.mark.usefixtures("one_thread")

DIMS = dict(intermediate_size=128)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """A tiny llama pruned 2:4 into a dense and a packed output (bfloat16)."""
    root = tmp_path_factory.mktemp("inspect")
    src = make_tiny_checkpoint(root, "llama", **DIMS)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    for fmt in ("dense", "packed"):
        prune_checkpoint(Checkpoint.open(src), root / fmt, PruneSettings(pattern=Pattern(2, 4)), ids, progress=False,
                         save=SaveFormat(fmt, torch.bfloat16))
    return root


def inspect_json(path, capsys) -> tuple[int, dict]:
    code = inspect_main([str(path), "--json", "--no-progress"])
    return code, json.loads(capsys.readouterr().out)


def test_good_outputs_are_valid_and_agree(outputs, capsys):
    code_d, dense = inspect_json(outputs / "dense", capsys)
    code_p, packed = inspect_json(outputs / "packed", capsys)
    assert code_d == code_p == 0 and dense["valid"] and packed["valid"]
    assert dense["weights_sha256"] == packed["weights_sha256"]
    assert len(dense["layers"]) == 2 * 7 and all(layer["bad_groups"] == 0 for layer in dense["layers"])
    assert {layer["stored_as"] for layer in packed["layers"]} == {"cutlass-2:4"}
    assert packed["sparsity"] == pytest.approx(0.5) and packed["save"] == {"format": "packed", "dtype": "bfloat16"}
    assert packed["disk_bytes"] < 0.8 * dense["disk_bytes"] and packed["dense_bytes"] == dense["dense_bytes"]
    assert packed["report"]["settings"]["pattern"] == "2:4"
    assert inspect_main([str(outputs / "packed"), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "of dense" in text and "every group valid" in text and "cutlass-2:4" in text


def _rewrite(shard, change) -> None:
    with safe_open(str(shard), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    change(tensors)
    save_file(tensors, str(shard), metadata=metadata)


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_broken_pattern_is_found_and_exits_1(outputs, tmp_path, capsys):
    out = _copy(outputs / "dense", tmp_path / "broken")
    name = "model.layers.1.mlp.up_proj.weight"

    def break_group(tensors):
        row = tensors[name][3].view(-1, 4)
        row[5] = torch.tensor([1.0, 2.0, 3.0, 0.0])

    _rewrite(out / "model.safetensors", break_group)
    code, found = inspect_json(out, capsys)
    assert code == 1 and not found["valid"]
    assert [(layer["name"], layer["bad_groups"]) for layer in found["layers"] if not layer["valid"]] == [(name, 1)]


@pytest.mark.parametrize("damage", ["truncated shard", "bad header", "missing tensor", "missing packed part",
                                    "bad report"])
def test_damaged_outputs_get_one_line_and_a_nonzero_exit(outputs, tmp_path, capsys, damage):
    out = _copy(outputs / ("packed" if "packed" in damage else "dense"), tmp_path / "damaged")
    shard = out / "model.safetensors"
    if damage == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:-1000])
    elif damage == "bad header":
        raw = bytearray(shard.read_bytes())
        raw[8:24] = b"\x00garbage{{{{{{{{"
        shard.write_bytes(bytes(raw))
    elif damage == "missing tensor":
        _rewrite(shard, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    elif damage == "missing packed part":
        _rewrite(shard, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight.meta"))
    else:
        (out / "barber_report.json").write_text("{not json")
    code = inspect_main([str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 3 and captured.out == "" and captured.err.startswith("error: ")
    assert captured.err.count("\n") == 1, captured.err


def _png_size(path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def test_inspect_plot_draws_any_output(outputs, tmp_path, capsys):
    png = tmp_path / "from-report.png"
    assert inspect_main([str(outputs / "packed"), "--plot", str(png), "--summary", "--no-progress"]) == 0
    assert _png_size(png) == PNG_SIZE
    plain = make_tiny_checkpoint(tmp_path, "opt")  # not a barber output: sparsity only
    assert inspect_main([str(plain), "--plot", "--summary", "--no-progress"]) == 0
    assert _png_size(plain / REPORT_PNG) == PNG_SIZE
    assert "not a finished barber run" in capsys.readouterr().out


def test_every_cli_run_leaves_report_md_and_png_unless_no_report(tmp_path, capsys):
    src = make_tiny_checkpoint(tmp_path, "llama")
    common = ["--ckpt", str(src), "--nsamples", "2", "--seqlen", "16", "--no-progress", "--recipe", "paper"]
    assert stream_main([*common, "--out", str(tmp_path / "a")]) == 0
    assert _png_size(tmp_path / "a" / REPORT_PNG) == PNG_SIZE
    md = (tmp_path / "a" / REPORT_MD).read_text()
    assert f"]({REPORT_PNG})" in md and "| 1 | mlp |" in md and "swaps" in md
    assert stream_main([*common, "--out", str(tmp_path / "b"), "--no-report"]) == 0
    assert not (tmp_path / "b" / REPORT_MD).exists() and not (tmp_path / "b" / REPORT_PNG).exists()
    # a barber output as input: its report files are not copied into the new output
    assert stream_main([*common, "--ckpt", str(tmp_path / "a"), "--out", str(tmp_path / "c"), "--no-report"]) == 0
    assert not (tmp_path / "c" / REPORT_MD).exists()
    capsys.readouterr()
