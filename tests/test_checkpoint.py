"""Checkpoint reader: lazy reads, sharding, header validation and shape checks against config.json."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from helpers_models import make_tiny_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from barber.checkpoint import Checkpoint
from barber.errors import CheckpointError
from barber.safetensors_format import MAX_HEADER_BYTES, read_safetensors_header


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {s: make_tiny_checkpoint(root, "llama", layers=3, shards=s) for s in (1, 3)}


@pytest.mark.parametrize("shards", [1, 3])
def test_open_describes_checkpoint(llama_dirs, shards):
    ckpt = Checkpoint.open(llama_dirs[shards])
    assert ckpt.path == llama_dirs[shards]
    assert ckpt.family.name == "llama" and ckpt.num_layers == 3
    assert len(ckpt.shard_files) == shards
    assert set(ckpt.weight_map) == set(ckpt.tensor_names)
    assert set(ckpt.weight_map.values()) == set(ckpt.shard_files)
    assert ckpt.block_tensor_name(2, "mlp.up_proj.weight") == "model.layers.2.mlp.up_proj.weight"
    with pytest.raises(IndexError):
        ckpt.block_tensor_name(3, "mlp.up_proj.weight")


@pytest.mark.parametrize("shards", [1, 3])
def test_tensors_equal_safetensors(llama_dirs, shards):
    root = llama_dirs[shards]
    expected = {}
    for f in sorted(root.glob("*.safetensors")):
        expected.update(load_file(f))
    ckpt = Checkpoint.open(root)
    for name in ckpt.tensor_names:
        assert torch.equal(ckpt.tensor(name), expected[name]), name
    w = ckpt.block_weights(1)
    assert set(w) == set(ckpt.block_tensor_names())
    for local, t in w.items():
        assert torch.equal(t, expected[ckpt.block_tensor_name(1, local)])
    half = ckpt.tensor("model.norm.weight", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, expected["model.norm.weight"].bfloat16())


def test_tensors_do_not_alias_the_mapping(llama_dirs):
    ckpt = Checkpoint.open(llama_dirs[1])
    t = ckpt.tensor("model.norm.weight")
    ckpt.release()
    t.add_(1.0)  # would crash (read-only map) or corrupt the file if it aliased the mapping
    assert torch.equal(Checkpoint.open(llama_dirs[1]).tensor("model.norm.weight") + 1.0, t)


def test_global_weights_tied_and_untied(tmp_path):
    tied = Checkpoint.open(make_tiny_checkpoint(tmp_path, "opt"))
    assert tied.config.tie_word_embeddings and "lm_head.weight" not in tied.tensor_names
    fw = tied.final_weights()
    assert torch.equal(fw["lm_head"], tied.tensor("model.decoder.embed_tokens.weight"))
    assert set(tied.embedding_weights()) == {"embed_tokens", "embed_positions"}
    untied = Checkpoint.open(make_tiny_checkpoint(tmp_path, "qwen2"))
    assert torch.equal(untied.final_weights()["lm_head"], untied.tensor("lm_head.weight"))
    assert "self_attn.q_proj.bias" in untied.block_tensor_names()
    assert "self_attn.o_proj.bias" not in untied.block_tensor_names()


# ---- header validation ------------------------------------------------------------------------


def _write(path, header: bytes, data: bytes = b"", length: int | None = None):
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def test_header_errors(tmp_path):
    f = tmp_path / "x.safetensors"
    cases = [
        (dict(header=b""), None, "not valid JSON"),
        (dict(header=b"{}", length=MAX_HEADER_BYTES + 1), None, "corrupt safetensors header"),
        (dict(header=b"{}", length=1000), None, "truncated"),
        (dict(header=b"\xff\xfe garbage"), None, "not valid JSON"),
        (dict(header=b"[1, 2]"), None, "not a JSON object"),
        (dict(header=json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode(),
              data=b"\0" * 8), None, "do not match shape"),
        (dict(header=json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode(),
              data=b"\0" * 8), None, "truncated"),
        (dict(header=json.dumps({"a": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}).encode(),
              data=b"\0" * 4), None, "unsupported dtype"),
        (dict(header=json.dumps({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}).encode(),
              data=b"\0" * 4), None, "invalid shape"),
        (dict(header=json.dumps({"a": 3}).encode()), None, "not an object"),
        (dict(header=b"[" * 100000 + b"]" * 100000), None, "not valid JSON"),
        (dict(header=b'{"a": ' + b"9" * 5000 + b"}"), None, "not valid JSON"),
    ]
    for kwargs, _, message in cases:
        _write(f, **kwargs)
        with pytest.raises(CheckpointError, match=message):
            read_safetensors_header(f)
    f.write_bytes(b"\1\2\3")
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors_header(f)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200), length=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_header_fuzz_only_raises_checkpoint_error(tmp_path, data, length):
    f = tmp_path / "fuzz.safetensors"
    if length is None:
        f.write_bytes(data)
    else:
        f.write_bytes(struct.pack("<Q", length) + data)
    try:
        read_safetensors_header(f)
    except CheckpointError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.dictionaries(st.text(max_size=5), st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**70) | st.text(max_size=4),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets", "x"]), c,
                                                         max_size=3),
    max_leaves=8), max_size=3))
def test_header_fuzz_structured(tmp_path, header):
    f = _write(tmp_path / "fuzz.safetensors", json.dumps(header).encode(), b"\0" * 64)
    try:
        read_safetensors_header(f)
    except CheckpointError:
        pass


# ---- directory-level errors --------------------------------------------------------------------


def test_directory_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        Checkpoint.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty checkpoint directory"):
        Checkpoint.open(tmp_path / "empty")
    (tmp_path / "noconfig").mkdir()
    (tmp_path / "noconfig" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint.open(tmp_path / "noconfig")


def test_missing_shard(tmp_path):
    root = make_tiny_checkpoint(tmp_path, "llama", shards=2)
    (root / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing shard model-00002-of-00002.safetensors"):
        Checkpoint.open(root)


def test_index_lists_tensor_absent_from_shard(tmp_path):
    root = make_tiny_checkpoint(tmp_path, "llama", shards=2)
    index = json.loads((root / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.extra.weight"] = "model-00001-of-00002.safetensors"
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'model.layers.0.extra.weight' listed in"):
        Checkpoint.open(root)


def test_no_weights_file(tmp_path):
    root = make_tiny_checkpoint(tmp_path, "llama")
    (root / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        Checkpoint.open(root)


def test_truncated_file(tmp_path):
    root = make_tiny_checkpoint(tmp_path, "llama")
    f = root / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        Checkpoint.open(root)


def test_shape_disagreeing_with_config(tmp_path):
    root = make_tiny_checkpoint(tmp_path, "llama")
    cfg = json.loads((root / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \[96, 64\] but "
                                              r"config.json implies \[128, 64\]"):
        Checkpoint.open(root)


def test_missing_tensor_and_too_few_layers(tmp_path):
    root = make_tiny_checkpoint(tmp_path, "llama")
    cfg = json.loads((root / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'model.layers.2.self_attn.q_proj.weight' is missing"):
        Checkpoint.open(root)


def test_unsupported_model_type(tmp_path):
    root = make_tiny_checkpoint(tmp_path, "llama")
    cfg = json.loads((root / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported model_type 'gpt_neox' .supported: gemma2, "):
        Checkpoint.open(root)


def test_reads_only_requested_tensors(tmp_path):
    """Corrupting the bytes of one block's tensors must not affect reading another block."""
    root = make_tiny_checkpoint(tmp_path, "llama", shards=1)
    ckpt = Checkpoint.open(root)
    good = ckpt.block_weights(0)
    info = ckpt.info(ckpt.block_tensor_name(1, "mlp.up_proj.weight"))
    with open(root / "model.safetensors", "r+b") as f:
        f.seek(info.start)
        f.write(b"\xff" * (info.end - info.start))
    again = Checkpoint.open(root).block_weights(0)
    assert all(torch.equal(good[k], again[k]) for k in good)
    assert torch.isnan(Checkpoint.open(root).block_weights(1)["mlp.up_proj.weight"]).all()


def test_save_file_roundtrip_of_every_dtype(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "f16": torch.randn(2, 3).half(),
        "i64": torch.arange(5), "u8": torch.arange(3, dtype=torch.uint8), "empty": torch.zeros(0, 4),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    infos = read_safetensors_header(tmp_path / "model.safetensors")
    assert {n: (i.dtype, i.shape) for n, i in infos.items()} == {
        n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()
    }


def test_file_shrinking_after_open_is_an_error(tmp_path):
    root = make_tiny_checkpoint(tmp_path, "llama")
    ckpt = Checkpoint.open(root)
    f = root / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="shrank since it was opened"):
        for i in range(ckpt.num_layers):
            ckpt.block_weights(i)
