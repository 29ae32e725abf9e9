"""config.json parsing: transformers 4 and 5 forms, rope scaling, OPT fields, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from barber.config import ModelConfig, RopeScaling, token_id
from barber.errors import CheckpointError
from barber.families import FAMILIES, family_for
from barber.model import rotary_inv_freq

LLAMA3_SCALING = {
    "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
}

V4 = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3_SCALING},
    "torch_dtype": "bfloat16", "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008],
}
V5 = {k: v for k, v in V4.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")} | {
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3_SCALING},
    "dtype": "bfloat16",
}


def test_transformers_4_and_5_forms_agree():
    c4, c5 = ModelConfig.from_dict(V4), ModelConfig.from_dict(V5)
    assert c4 == c5
    assert c4.rope_theta == 500000.0
    assert c4.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert (c4.num_heads, c4.num_kv_heads, c4.head_dim) == (32, 8, 128)
    assert token_id(V4, "bos_token_id") == 128000 and token_id(V4, "eos_token_id") == 128001  # a list: the first


def test_head_dim_explicit_or_derived():
    assert ModelConfig.from_dict(V4).head_dim == 128
    assert ModelConfig.from_dict(V4 | {"head_dim": 64}).head_dim == 64
    with pytest.raises(CheckpointError, match="multiple"):
        ModelConfig.from_dict(V4 | {"hidden_size": 4097})


@pytest.mark.parametrize("key", ["rope_type", "type"])
def test_linear_scaling_and_legacy_type_key(key):
    cfg = ModelConfig.from_dict(V4 | {"rope_scaling": {key: "linear", "factor": 4.0}})
    assert cfg.rope_scaling == RopeScaling("linear", factor=4.0)
    assert ModelConfig.from_dict(V4 | {"rope_scaling": None}).rope_scaling is None
    assert ModelConfig.from_dict(V4 | {"rope_scaling": {key: "default"}}).rope_scaling is None


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "su"])
def test_unsupported_rope_type_is_a_clear_error(rope_type):
    supported = r"\(supported: default, linear, llama3, longrope\)"
    with pytest.raises(CheckpointError, match=r"unsupported rope type .* " + supported):
        ModelConfig.from_dict(V4 | {"rope_scaling": {"rope_type": rope_type, "factor": 2.0}})
    with pytest.raises(CheckpointError, match="unsupported rope type"):
        ModelConfig.from_dict(V5 | {"rope_parameters": {"rope_type": rope_type, "rope_theta": 1e4, "factor": 2.0}})


def test_missing_and_mistyped_fields():
    with pytest.raises(CheckpointError, match="missing 'hidden_size'"):
        ModelConfig.from_dict({k: v for k, v in V4.items() if k != "hidden_size"})
    with pytest.raises(CheckpointError, match="'num_hidden_layers' should be int"):
        ModelConfig.from_dict(V4 | {"num_hidden_layers": "32"})
    with pytest.raises(CheckpointError, match="positive"):
        ModelConfig.from_dict(V4 | {"vocab_size": 0})
    with pytest.raises(CheckpointError, match="no model_type"):
        ModelConfig.from_dict({"hidden_size": 3})


def test_opt_fields():
    d = {
        "model_type": "opt", "hidden_size": 1024, "ffn_dim": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
        "vocab_size": 50272, "max_position_embeddings": 2048, "word_embed_proj_dim": 512,
        "do_layer_norm_before": False, "activation_function": "relu", "torch_dtype": "float16",
    }
    cfg = ModelConfig.from_dict(d)
    assert (cfg.intermediate_size, cfg.word_embed_proj_dim, cfg.head_dim) == (4096, 512, 64)
    assert not cfg.do_layer_norm_before and not cfg.final_layer_norm
    assert cfg.tie_word_embeddings and cfg.attention_bias and cfg.rope_theta is None
    pre = ModelConfig.from_dict(d | {"do_layer_norm_before": True})
    assert pre.final_layer_norm
    assert not ModelConfig.from_dict(
        d | {"do_layer_norm_before": True, "_remove_final_layer_norm": True}
    ).final_layer_norm


def test_from_file_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        ModelConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps(V5))
    assert ModelConfig.from_file(tmp_path / "config.json") == ModelConfig.from_dict(V4)


def test_unsupported_model_type_lists_supported():
    supported = (r"\(supported: gemma2, gemma3_text, llama, mistral, mixtral, opt, phi3, qwen2, qwen2_moe, qwen3, "
                 r"qwen3_moe\)")
    with pytest.raises(CheckpointError, match=r"unsupported model_type 'gpt2' " + supported):
        family_for("gpt2")
    assert set(FAMILIES) == {"llama", "mistral", "qwen2", "opt", "qwen3", "phi3", "gemma2", "gemma3_text",
                             "mixtral", "qwen2_moe", "qwen3_moe"}


@pytest.mark.parametrize(
    "scaling",
    [None, {"rope_type": "linear", "factor": 4.0}, {"rope_type": "llama3", **LLAMA3_SCALING}],
    ids=["default", "linear", "llama3"],
)
def test_inv_freq_matches_transformers(scaling):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = V4 | {"rope_scaling": scaling, "num_hidden_layers": 1}
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in d.items() if k != "model_type"})
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        expected = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_cfg)[0]
    else:
        expected = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg, "cpu")[0]
    ours = rotary_inv_freq(ModelConfig.from_dict(d))
    torch.testing.assert_close(ours, expected.to(torch.float32), rtol=0, atol=0)
    if scaling:
        assert not torch.equal(ours, rotary_inv_freq(ModelConfig.from_dict(d | {"rope_scaling": None})))
