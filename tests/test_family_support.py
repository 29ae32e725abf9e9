"""The families of issue #14 beyond the parity of `test_families.py`: config.json forms, refusals,
per-layer positions, fused projections pruned as stored, outputs transformers loads, resume after a kill.

Covered families: qwen3 (q/k norms), phi3 (fused qkv_proj / gate_up_proj), gemma2 and gemma3_text
(sandwich and (1 + w) norms, scaled embeddings, soft-capping, alternating sliding and full layers).
Exact per-row sparsity and 2:4 in every linear are checked for every family by
`test_stream_prune.test_every_method_gives_exact_sparsity` (parametrized by `FAMILY_NAMES`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers_models import (
    FAMILY_NAMES,
    make_tiny_checkpoint,
    make_tiny_model,
    read_shards,
    save_checkpoint,
    tiny_config,
)

from barber.checkpoint import Checkpoint
from barber.config import FULL, SLIDING, ModelConfig
from barber.errors import CheckpointError
from barber.evaluate import perplexity
from barber.families import FAMILIES, family_for
from barber.layout import REPORT_MD, REPORT_PNG
from barber.model import Arch, rotary_inv_freq
from barber.output import KILL_ENV, REPORT_FILE, WORK_DIR
from barber.prune import Granularity, Pattern
from barber.run import prune_checkpoint
from barber.settings import PruneSettings, Reconstruct

pytest.importorskip("transformers")

NEW = ("qwen3", "phi3", "gemma2", "gemma3_text")
NSAMPLES, SEQLEN = 4, 32

pytestmark = pytest.mark.usefixtures("one_thread")


def calib_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(seed))



def hf_dict(family: str, layers: int = 3, **overrides) -> dict:
    """config.json as transformers 5 writes it for a tiny `family` model."""
    return tiny_config(family, layers, **overrides).to_dict()


# ---- config.json: transformers 4 and 5 forms ----------------------------------------------------


def test_gemma2_layer_pattern_from_a_transformers_4_config():
    v5 = hf_dict("gemma2", layers=4)
    v4 = {k: v for k, v in v5.items() if k not in ("layer_types", "rope_parameters")} | {
        "rope_theta": 10000.0, "hidden_act": "gelu_pytorch_tanh"}
    c4, c5 = ModelConfig.from_dict(v4), ModelConfig.from_dict(v5)
    assert c4 == c5
    assert c5.layer_types == (SLIDING, FULL, SLIDING, FULL)
    assert (c5.hidden_act, c5.query_pre_attn_scalar) == ("gelu_pytorch_tanh", 24.0)
    assert (c5.attn_logit_softcapping, c5.final_logit_softcapping) == (2.0, 3.0)
    assert not c5.uniform_layers


def test_gemma3_local_rope_from_a_transformers_4_config():
    v5 = hf_dict("gemma3_text", layers=7, sliding_window_pattern=6, rope_scaling={"rope_type": "linear", "factor": 8.0})
    v4 = {k: v for k, v in v5.items() if k not in ("layer_types", "rope_parameters")} | {
        "rope_theta": 1_000_000.0, "rope_local_base_freq": 100.0, "sliding_window_pattern": 6,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    c4, c5 = ModelConfig.from_dict(v4), ModelConfig.from_dict(v5)
    assert c4 == c5
    assert c5.layer_types == (SLIDING,) * 5 + (FULL, SLIDING)
    assert (c5.rope_theta, c5.local_rope_theta, c5.local_rope_scaling) == (1_000_000.0, 100.0, None)
    assert c5.rope_scaling.rope_type == "linear"


def test_gemma3_rotary_tables_match_transformers():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    hf_cfg = tiny_config("gemma3_text", 2, rope_scaling={"rope_type": "linear", "factor": 4.0})
    hf = Gemma3RotaryEmbedding(hf_cfg)
    ours = ModelConfig.from_dict(hf_cfg.to_dict())
    torch.testing.assert_close(rotary_inv_freq(ours), hf.full_attention_inv_freq, rtol=0, atol=0)
    torch.testing.assert_close(rotary_inv_freq(ours, sliding=True), hf.sliding_attention_inv_freq, rtol=0, atol=0)


def test_phi3_partial_rotary_from_either_form():
    v5 = hf_dict("phi3", partial_rotary_factor=0.5)
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"} | {"rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    assert ModelConfig.from_dict(v4) == ModelConfig.from_dict(v5)
    assert ModelConfig.from_dict(v5).partial_rotary_factor == 0.5


def test_qwen3_config():
    cfg = ModelConfig.from_dict(hf_dict("qwen3"))
    assert (cfg.head_dim, cfg.sliding_window, cfg.uniform_layers) == (24, None, True)
    shapes = FAMILIES["qwen3"].block_shapes(cfg)
    assert shapes["self_attn.q_norm.weight"] == shapes["self_attn.k_norm.weight"] == (24,)
    assert shapes["self_attn.q_proj.weight"] == (96, 64)


# ---- refusals: one line naming the model_type -----------------------------------------------------


@pytest.mark.parametrize("model_type, reason", [
    ("deepseek_v3", "multi-head latent attention"), ("gemma3", "vision tower"), ("bloom", ""),
])
def test_unsupported_model_types_are_refused_in_one_line(tmp_path, model_type, reason):
    with pytest.raises(CheckpointError) as err:
        family_for(model_type)
    msg = str(err.value)
    assert msg.startswith(f"unsupported model_type {model_type!r}") and "\n" not in msg and reason in msg
    root = make_tiny_checkpoint(tmp_path, "llama", layers=1)
    cfg = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps(cfg | {"model_type": model_type}))
    with pytest.raises(CheckpointError, match=f"unsupported model_type '{model_type}'"):
        Checkpoint.open(root)


@pytest.mark.parametrize("family, extra, message", [
    ("llama", {"vision_config": {"hidden_size": 32}}, "a vision tower (vision_config)"),
    ("qwen3", {"num_experts": 8}, "mixture-of-experts blocks (num_experts)"),
    ("llama", {"kv_lora_rank": 16}, "multi-head latent attention (kv_lora_rank)"),
    ("gemma3_text", {"use_bidirectional_attention": True}, "bidirectional attention"),
    ("gemma2", {"layer_types": ["chunked_attention"] * 3}, "layer type 'chunked_attention' is not supported"),
    ("phi3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "unsupported rope type 'yarn'"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8}},
     "longrope rope scaling needs 'long_factor' as a list of positive numbers"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 7,
                                  "long_factor": [2.0] * 7}}, "longrope factors should have 8 entries"),
])
def test_unsupported_structures_are_refused_naming_the_model_type(family, extra, message):
    d = hf_dict(family) | extra
    with pytest.raises(CheckpointError, match=re.escape(message)) as err:
        ModelConfig.from_dict(d)
    assert "\n" not in str(err.value)
    if "rope" not in message:
        assert repr(family) in str(err.value)


# ---- Qwen's use_sliding_window ------------------------------------------------------------------------


def _logits(ckpt: Checkpoint, ids: torch.Tensor) -> torch.Tensor:
    arch = Arch.from_checkpoint(ckpt)
    with torch.no_grad():
        h = arch.embed(ids, ckpt.embedding_weights())
        for i in range(ckpt.num_layers):
            h = arch.block_forward(h, ckpt.block_weights(i), arch.positions(ids.shape[1], layer=i))
        return arch.final_logits(h, ckpt.final_weights())


@pytest.mark.parametrize("family, types", [
    ("qwen2", (FULL, SLIDING, SLIDING)), ("qwen3", (FULL, SLIDING, SLIDING)),
    ("qwen2_moe", (SLIDING, FULL, FULL)), ("qwen3_moe", None),
])
def test_qwen_sliding_window_layers_match_transformers(tmp_path, family, types):
    """transformers' per-type rule (max_window_layers = 1 here), from `layer_types` (5.x) or without it (4.x)."""
    model = make_tiny_model(family, layers=3, seed=1, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    root = save_checkpoint(model, tmp_path / family)
    ckpt = Checkpoint.open(root)
    assert (ckpt.config.layer_types, ckpt.config.sliding_window) == (types, 16)
    raw = json.loads((root / "config.json").read_text())
    assert ModelConfig.from_dict({k: v for k, v in raw.items() if k != "layer_types"}).layer_types == types
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    got = _logits(ckpt, ids)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
    (root / "config.json").write_text(json.dumps(raw | {"use_sliding_window": False}))
    assert not torch.allclose(_logits(Checkpoint.open(root), ids), got, rtol=1e-3)  # the window mattered


# ---- longrope (Phi-3 128k, Phi-3.5, Phi-4-mini) -----------------------------------------------------

SHORT, LONG = [1.0 + 0.1 * i for i in range(8)], [1.0 + 0.7 * i for i in range(8)]


def test_longrope_config_forms():
    """4.x (`rope_scaling` + top-level original length) and 5.x (`rope_parameters`) read alike."""
    v5 = hf_dict("phi3", max_position_embeddings=256) | {"rope_parameters": {
        "rope_type": "longrope", "rope_theta": 1e4, "short_factor": SHORT, "long_factor": LONG,
        "original_max_position_embeddings": 16}}
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"} | {
        "rope_theta": 1e4, "original_max_position_embeddings": 16,
        "rope_scaling": {"type": "longrope", "short_factor": SHORT, "long_factor": LONG}}
    cfg = ModelConfig.from_dict(v5)
    assert cfg == ModelConfig.from_dict(v4)
    scaling = cfg.rope_scaling
    assert (scaling.factor, scaling.original_max_position_embeddings) == (16.0, 16)
    assert scaling.attention_factor == pytest.approx(math.sqrt(1 + math.log(16) / math.log(16)))
    explicit = v5 | {"rope_parameters": v5["rope_parameters"] | {"attention_factor": 1.25}}
    assert ModelConfig.from_dict(explicit).rope_scaling.attention_factor == 1.25


@pytest.mark.parametrize("seq", [12, 40], ids=["short", "long"])
def test_longrope_matches_transformers_below_and_above_the_original_length(tmp_path, seq):
    model = make_tiny_model("phi3", layers=2, seed=2, original_max_position_embeddings=16,
                            rope_scaling={"type": "longrope", "short_factor": SHORT, "long_factor": LONG})
    ckpt = Checkpoint.open(save_checkpoint(model, tmp_path / "phi3-longrope"))
    assert ckpt.config.rope_scaling.rope_type == "longrope"
    ids = torch.randint(0, 300, (2, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    got = _logits(ckpt, ids)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
    short = rotary_inv_freq(ckpt.config, seqlen=12)
    assert not torch.equal(short, rotary_inv_freq(ckpt.config, seqlen=40))  # the factors switch at 16


# ---- per-layer positions and fused names -------------------------------------------------------------


def test_positions_differ_per_layer_and_need_the_layer():
    arch = Arch(FAMILIES["gemma3_text"], ModelConfig.from_dict(hf_dict("gemma3_text")))
    with pytest.raises(ValueError, match="pass layer="):
        arch.positions(40)
    local, full = arch.positions(40, layer=0), arch.positions(40, layer=1)
    assert local.mask is not None and full.mask is None  # sliding window 16 < 40; full: plain causal
    assert bool(local.mask[30, 14]) is False and bool(local.mask[30, 15]) is True  # itself and 15 before it
    assert not torch.equal(local.cos, full.cos)  # Gemma 3: another rotary base on the local layers
    uniform = Arch(FAMILIES["llama"], ModelConfig.from_dict(hf_dict("llama")))
    assert torch.equal(uniform.positions(8).cos, uniform.positions(8, layer=1).cos)


def test_phi3_fused_linears_and_their_parts():
    fam, cfg = FAMILIES["phi3"], ModelConfig.from_dict(hf_dict("phi3"))
    assert fam.attn_linears == ("self_attn.qkv_proj", "self_attn.o_proj")
    assert fam.mlp_linears == ("mlp.gate_up_proj", "mlp.down_proj")
    shapes = fam.block_shapes(cfg)
    assert shapes["self_attn.qkv_proj.weight"] == (64 + 2 * 32, 64) and shapes["mlp.gate_up_proj.weight"] == (192, 64)
    assert "self_attn.q_proj.weight" not in shapes
    qkv = {"self_attn.q_proj": (0, 64), "self_attn.k_proj": (64, 96), "self_attn.v_proj": (96, 128)}
    gate_up = {"mlp.gate_proj": (0, 96), "mlp.up_proj": (96, 192)}
    assert fam.fused_parts(cfg) == {"self_attn.qkv_proj": qkv, "mlp.gate_up_proj": gate_up}
    assert FAMILIES["llama"].fused_parts(cfg) == {}


# ---- fused projections are pruned as stored, row by row as their parts ---------------------------------


def _phi3_as_llama(model, root):
    """The same network as a LLaMA checkpoint: qkv_proj and gate_up_proj split into their parts."""
    from transformers import AutoModelForCausalLM

    c = model.config
    llama_cfg = tiny_config(
        "llama", c.num_hidden_layers, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=False,
    )
    llama = AutoModelForCausalLM.from_config(llama_cfg, attn_implementation="sdpa", dtype=torch.float32).eval()
    q, kv, f = c.num_attention_heads * 16, c.num_key_value_heads * 16, c.intermediate_size
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith("qkv_proj.weight"):
            for part, piece in zip("qkv", t.split([q, kv, kv])):
                state[name.replace("qkv_proj", f"{part}_proj")] = piece
        elif name.endswith("gate_up_proj.weight"):
            for part, piece in zip(("gate", "up"), t.split([f, f])):
                state[name.replace("gate_up_proj", f"{part}_proj")] = piece
        else:
            state[name] = t
    llama.load_state_dict(state)
    return save_checkpoint(llama, root)


@pytest.mark.parametrize("pattern, refit", [("unstructured", False), ("2:4", True)], ids=["unstructured", "2:4-refit"])
def test_fused_matrices_are_pruned_row_by_row_like_their_parts(tmp_path, pattern, refit):
    """Phi-3 and the same network stored as LLaMA (q/k/v, gate/up apart) give the same pruned rows:
    Wanda statistics, the gradient pass, the row rebuild and the re-fit see each fused row as its part's."""
    phi3 = make_tiny_model("phi3", layers=2, seed=4)
    fused_dir = save_checkpoint(phi3, tmp_path / "phi3")
    split_dir = _phi3_as_llama(phi3, tmp_path / "llama")
    settings = dict(pattern=Pattern.parse(pattern), ratio=0.2, granularity=Granularity.ROW,
                    reconstruct=Reconstruct.SUBBLOCK if refit else Reconstruct.NONE)
    reports = {}
    for name, src in (("fused", fused_dir), ("split", split_dir)):
        reports[name] = prune_checkpoint(Checkpoint.open(src), tmp_path / f"out-{name}", PruneSettings(**settings),
                                         calib_ids(), progress=False).to_json()
    fused, split = read_shards(tmp_path / "out-fused"), read_shards(tmp_path / "out-split")
    for i in range(2):
        p = f"model.layers.{i}."
        for stored, parts in (("self_attn.qkv_proj", ("q", "k", "v")), ("mlp.gate_up_proj", ("gate", "up"))):
            prefix = stored.split(".")[0]
            joined = torch.cat([split[f"{p}{prefix}.{part}_proj.weight"] for part in parts])
            got = fused[f"{p}{stored}.weight"]
            assert torch.equal(got != 0, joined != 0), (i, stored)  # the same kept set, row by row
            torch.testing.assert_close(got, joined, rtol=1e-4, atol=1e-6)
    assert reports["fused"]["fused_linears"]["self_attn.qkv_proj"]["self_attn.k_proj"] == [64, 96]
    assert "fused_linears" not in reports["split"]
    for block in reports["fused"]["blocks"]:
        assert set(block["layers"]) == {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}


# ---- dense and pruned outputs: barber's perplexity is transformers' -----------------------------------


def hf_ppl(path, ids: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        losses = [float(model(w[None], labels=w[None]).loss) for w in ids]
    return math.exp(sum(losses) / len(losses))


@pytest.mark.parametrize("family", [f for f in FAMILY_NAMES if f not in ("llama", "opt")])  # those: test_stream_prune
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_pruned_output_loads_in_transformers_with_the_same_perplexity(tmp_path, family, pattern):
    src = make_tiny_checkpoint(tmp_path, family, layers=3, shards=2)
    ids = calib_ids(seed=5)
    dense = perplexity(Checkpoint.open(src), ids.flatten(), seqlen=SEQLEN, progress=False).ppl
    assert dense == pytest.approx(hf_ppl(src, ids), rel=1e-4)
    out = tmp_path / "out"
    prune_checkpoint(Checkpoint.open(src), out, PruneSettings(pattern=Pattern.parse(pattern), ratio=0.2),
                     calib_ids(), progress=False)
    ours = perplexity(Checkpoint.open(out), ids.flatten(), seqlen=SEQLEN, progress=False).ppl
    assert ours == pytest.approx(hf_ppl(out, ids), rel=1e-4)
    assert ours != pytest.approx(dense, rel=1e-3)  # pruning did something
    assert (out / REPORT_FILE).is_file()


# ---- resume after a kill --------------------------------------------------------------------------------

_MAIN = "import sys; from barber.cli import stream_main; sys.exit(stream_main())"


def _argv(src, out, ids) -> list[str]:
    return ["--ckpt", str(src), "--out", str(out), "--calib", str(ids), "--rebuild-ratio", "0.2", "--no-progress"]


def _digests(out) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name not in (REPORT_FILE, REPORT_MD, REPORT_PNG)}


def test_sigkill_then_same_command_is_byte_identical(tmp_path, capsys):
    """Every family but llama (whose kill points `test_resume` covers), killed (SIGKILL) right after
    block 1's state is committed, then run again: byte-identical to an uninterrupted run."""
    from barber.cli import stream_main

    ids = tmp_path / "ids.pt"
    torch.save(calib_ids()[:2, :16].clone(), ids)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **{KILL_ENV: "state:2"})
    runs = {}
    for family in FAMILY_NAMES:
        if family == "llama":
            continue
        src = make_tiny_checkpoint(tmp_path, family, layers=3)
        out = tmp_path / f"killed-{family}"
        runs[family] = (src, out, subprocess.Popen([sys.executable, "-c", _MAIN, *_argv(src, out, ids)], env=env,
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for family, (src, out, proc) in runs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == -9, err
        assert (out / WORK_DIR).is_dir() and not (out / REPORT_FILE).exists()
        assert stream_main(_argv(src, out, ids)) == 0
        assert "(resumed at block 2)" in capsys.readouterr().out
        assert stream_main(_argv(src, tmp_path / f"reference-{family}", ids)) == 0
        assert _digests(out) == _digests(tmp_path / f"reference-{family}"), family
        Checkpoint.open(out)


def test_memory_plan_counts_the_scores_of_soft_capped_attention(tmp_path):
    """Gemma 2's soft-capped attention materialises [heads, T, T] scores; the plan's per-sample bytes say so."""
    import dataclasses

    from barber.budget import _per_sample_activation_bytes, model_shapes

    sh = model_shapes(Checkpoint.open(make_tiny_checkpoint(tmp_path, "gemma2", layers=1)))
    assert sh.score_heads == 4
    plain = dataclasses.replace(sh, score_heads=0)
    extra = _per_sample_activation_bytes(sh, 2048, 4) - _per_sample_activation_bytes(plain, 2048, 4)
    assert extra >= 16 * 4 * 2048 * 2048
    assert model_shapes(Checkpoint.open(make_tiny_checkpoint(tmp_path, "gemma3_text", layers=1))).score_heads == 0
