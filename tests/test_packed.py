"""Packed outputs (--save-format packed, --save-dtype): the encodings, bit-identical loads, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers_models import FAMILY_NAMES, make_tiny_checkpoint, read_shards
from safetensors import safe_open

from barber import load_pruned
from barber.checkpoint import Checkpoint
from barber.cli import eval_main, stream_main
from barber.errors import CheckpointError
from barber.evaluate import perplexity
from barber.load import to_model_layout
from barber.packed import BITMASK, CUTLASS_24, SaveFormat, pack, plan, unpack
from barber.prune import Pattern
from barber.run import prune_checkpoint
from barber.settings import PruneSettings

pytestmark = pytest.mark.usefixtures("one_thread")

#: Shapes CUTLASS 2:4 takes in every family (rows a multiple of 32, cols of 64).
CUTLASS_DIMS = {"llama": dict(intermediate_size=128), "qwen2": dict(intermediate_size=128),
                "mistral": dict(intermediate_size=128, num_key_value_heads=2), "opt": dict(ffn_dim=128),
                "qwen3": dict(intermediate_size=128, head_dim=16), "phi3": dict(intermediate_size=128),
                "gemma2": dict(intermediate_size=128), "gemma3_text": dict(intermediate_size=128),
                "mixtral": dict(intermediate_size=128),
                "qwen2_moe": dict(moe_intermediate_size=128, shared_expert_intermediate_size=128),
                "qwen3_moe": dict(moe_intermediate_size=128, head_dim=16)}


def calib_ids() -> torch.Tensor:
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def prune(src, out, pattern: str, save: SaveFormat):
    settings = PruneSettings(pattern=Pattern.parse(pattern), sparsity=0.5)
    return prune_checkpoint(Checkpoint.open(src), out, settings, calib_ids(), progress=False, save=save)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)



def assert_same_bits(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(bits(a[name]), bits(b[name])), name


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "unstructured"])
def test_packed_loads_bit_for_bit_as_the_dense_output(tmp_path, family, pattern):
    src = make_tiny_checkpoint(tmp_path, family, shards=2 if family == "llama" else 1, **CUTLASS_DIMS[family])
    save = torch.bfloat16
    prune(src, tmp_path / "dense", pattern, SaveFormat("dense", save))
    prune(src, tmp_path / "packed", pattern, SaveFormat("packed", save))
    dense = read_shards(tmp_path / "dense")
    packed = Checkpoint.open(tmp_path / "packed")
    assert_same_bits(dense, {n: packed.tensor(n) for n in packed.tensor_names})

    section = json.loads((tmp_path / "packed" / "config.json").read_text())["barber"]
    encoding = CUTLASS_24 if pattern == "2:4" else BITMASK
    assert section["save_format"] == "packed" and section["save_dtype"] == "bfloat16"
    assert {e["encoding"] for e in section["tensors"].values()} == {encoding}
    assert set(section["tensors"]) == set(packed.packed)
    raw = read_shards(tmp_path / "packed")
    for name in section["tensors"]:
        assert name not in raw and {name + ".values"} <= raw.keys()
    dense_config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert dense_config.get("torch_dtype", dense_config.get("dtype")) == "bfloat16"

    size = {d: sum(f.stat().st_size for f in (tmp_path / d).glob("*.safetensors")) for d in ("dense", "packed")}
    assert size["packed"] < 0.8 * size["dense"]
    if family == "llama":
        index = json.loads((tmp_path / "packed" / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(raw) and index["metadata"]["total_size"] < size["packed"]

    model_dense, model_packed = load_pruned(tmp_path / "dense"), load_pruned(tmp_path / "packed")
    assert_same_bits(model_dense.state_dict(), model_packed.state_dict())
    loaded = model_packed.state_dict()
    stored = to_model_layout(dict(dense), set(loaded), Checkpoint.open(tmp_path / "dense"))  # MoE: experts stacked
    for name, tensor in stored.items():
        assert torch.equal(bits(loaded[name]), bits(tensor)), name


def test_default_dense_output_is_unchanged_and_has_no_barber_section(tmp_path):
    src = make_tiny_checkpoint(tmp_path, "llama", shards=2)
    prune(src, tmp_path / "a", "2:4", SaveFormat())
    prune(src, tmp_path / "b", "2:4", None)
    for f in sorted(p.name for p in (tmp_path / "b").iterdir() if p.is_file() and p.suffix != ".json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "config.json").read_bytes() == (src / "config.json").read_bytes()


def test_shapes_cutlass_cannot_hold_fall_back_to_the_bitmask(tmp_path):
    src = make_tiny_checkpoint(tmp_path, "mistral")  # k/v_proj [16, 64], down_proj [64, 96]
    prune(src, tmp_path / "dense", "2:4", SaveFormat("dense", torch.float16))
    prune(src, tmp_path / "packed", "2:4", SaveFormat("packed", torch.float16))
    packed = Checkpoint.open(tmp_path / "packed")
    encodings = {n.split(".", 3)[3]: how.encoding for n, (how, _) in packed.packed.items() if ".0." in n}
    assert encodings["self_attn.q_proj.weight"] == CUTLASS_24
    assert encodings["self_attn.k_proj.weight"] == encodings["mlp.down_proj.weight"] == BITMASK
    assert_same_bits(read_shards(tmp_path / "dense"), {n: packed.tensor(n) for n in packed.tensor_names})


def test_plan_falls_back_where_cutlass_would_lose_bits():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g).to(torch.bfloat16)
    w.view(32, 16, 4)[:, :, 2:] = 0  # a valid 2:4 weight
    assert plan(w, Pattern(2, 4)).encoding == CUTLASS_24
    for damage in ("three", "negative zero"):
        bad = w.clone()
        if damage == "three":
            bad[5, 2] = 1.0
        else:
            bad[5, 0] = -0.0
        how = plan(bad, Pattern(2, 4))
        assert how.encoding == BITMASK
        assert torch.equal(bits(unpack(how, pack(bad, how))), bits(bad)), damage
    assert plan(w.float(), Pattern(2, 4)).encoding == BITMASK  # no float32 CUTLASS layout


def test_eval_reads_packed_outputs(tmp_path, capsys):
    src = make_tiny_checkpoint(tmp_path, "qwen2", **CUTLASS_DIMS["qwen2"])
    prune(src, tmp_path / "dense", "2:4", SaveFormat("dense", torch.bfloat16))
    prune(src, tmp_path / "packed", "2:4", SaveFormat("packed", torch.bfloat16))
    ids = torch.randint(0, 256, (4 * 16,), generator=torch.Generator().manual_seed(1))
    ppl = {d: perplexity(Checkpoint.open(tmp_path / d), ids, seqlen=16, progress=False).ppl
           for d in ("dense", "packed")}
    assert ppl["dense"] == ppl["packed"]
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 8)
    lines = {}
    for d in ("dense", "packed"):
        assert eval_main(["--ckpt", str(tmp_path / d), "--text", str(text), "--seqlen", "32", "--no-progress"]) == 0
        lines[d] = capsys.readouterr().out.split("(")[0]
    assert lines["dense"] == lines["packed"] and lines["dense"].startswith("perplexity ")


def test_a_damaged_packed_output_is_one_checkpoint_error(tmp_path):
    src = make_tiny_checkpoint(tmp_path, "llama", **CUTLASS_DIMS["llama"])
    prune(src, tmp_path / "packed", "4:8", SaveFormat("packed"))
    cfg_path = tmp_path / "packed" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    name = sorted(cfg["barber"]["tensors"])[0]
    cfg["barber"]["tensors"][name]["nnz"] += 1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="implies"):
        Checkpoint.open(tmp_path / "packed")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--save-format", "packed", "--pattern", "2:4"], "needs 16-bit weights, but the checkpoint's weights"),
        (["--save-format", "packed", "--pattern", "2:4", "--save-dtype", "float32"], "but --save-dtype float32"),
        (["--save-format", "zip"], "invalid choice"),
        (["--save-dtype", "int8"], "invalid choice"),
    ],
)
def test_bad_format_combinations_are_refused_in_one_line(tmp_path, capsys, extra, message):
    src = make_tiny_checkpoint(tmp_path, "llama")  # float32
    code = stream_main(["--ckpt", str(src), "--out", str(tmp_path / "out"), "--nsamples", "2", "--seqlen", "16",
                        "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_cli_packs_and_prints_the_size_against_dense(tmp_path, capsys):
    src = make_tiny_checkpoint(tmp_path, "llama", **CUTLASS_DIMS["llama"])
    code = stream_main(["--ckpt", str(src), "--out", str(tmp_path / "out"), "--nsamples", "2", "--seqlen", "16",
                        "--no-progress", "--pattern", "2:4", "--save-format", "packed", "--save-dtype", "bfloat16",
                        "--no-report"])
    out = capsys.readouterr().out
    assert code == 0 and "packed" in out and "of dense" in out, out
    report = json.loads((tmp_path / "out" / "barber_report.json").read_text())
    assert report["save"]["format"] == "packed" and report["output_bytes"] < 0.75 * report["save"]["dense_bytes"]


def test_a_resume_in_another_save_format_is_refused(tmp_path, capsys):
    """Killed after the first output shard was published: the rest must be written in the same format."""
    src = make_tiny_checkpoint(tmp_path, "llama", shards=2, **CUTLASS_DIMS["llama"])
    out = tmp_path / "out"
    args = ["--ckpt", str(src), "--out", str(out), "--nsamples", "2", "--seqlen", "16", "--no-progress",
            "--no-report", "--pattern", "2:4", "--save-dtype", "bfloat16"]
    main = "import sys; from barber.cli import stream_main; sys.exit(stream_main())"
    env = dict(os.environ, OMP_NUM_THREADS="1", BARBER_TEST_KILL_AT="publish:1")
    killed = subprocess.run([sys.executable, "-c", main, *args, "--save-format", "packed"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert stream_main([*args, "--save-format", "dense"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--save-format packed --save-dtype bfloat16" in err, err
    assert stream_main([*args, "--save-format", "packed"]) == 0
    capsys.readouterr()
    packed = Checkpoint.open(out)
    assert len(packed.packed) == 2 * 7


def test_a_packed_output_is_an_input_like_any_other(tmp_path):
    src = make_tiny_checkpoint(tmp_path, "llama", shards=2, **CUTLASS_DIMS["llama"])
    prune(src, tmp_path / "packed", "2:4", SaveFormat("packed", torch.bfloat16))
    prune(tmp_path / "packed", tmp_path / "again", "2:4", SaveFormat())  # dense, the packed input's dtype
    again = Checkpoint.open(tmp_path / "again")
    assert not again.packed and "barber" not in json.loads((tmp_path / "again" / "config.json").read_text())
    for shard in again.shard_files:
        with safe_open(str(tmp_path / "again" / shard), framework="pt") as f:
            barber = json.loads(f.metadata().get("barber", "{}"))
        assert all("packed" not in entry for entry in barber.get("tensors", {}).values())
    assert {again.info(n).dtype for n in again.tensor_names} == {torch.bfloat16}
