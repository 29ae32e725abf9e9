"""Mixture-of-experts families (mixtral, qwen2_moe, qwen3_moe): parity with transformers, config forms
and refusals, experts no calibration token reaches, one window per call, and the re-fit per expert.

Exact sparsity, outputs transformers loads with the same perplexity, resume after SIGKILL and the
packed format are covered for these families with every other one (`FAMILY_NAMES` includes them).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers_models import MOE_NAMES, make_tiny_checkpoint, make_tiny_model, read_shards, save_checkpoint, tiny_config

from barber import moe
from barber.budget import model_shapes
from barber.checkpoint import Checkpoint
from barber.config import ModelConfig
from barber.errors import CheckpointError
from barber.families import FAMILIES
from barber.fold import Chunk
from barber.initial import Stats
from barber.model import Arch
from barber.prune import Granularity, InitMethod, Pattern
from barber.run import prune_checkpoint
from barber.settings import PruneSettings, Reconstruct

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 24


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family", MOE_NAMES)
def test_parity_with_transformers(tmp_path, family):
    """Every block's MLP output and the logits, against transformers' own mixture-of-experts code."""
    model = make_tiny_model(family, layers=2, seed=1)
    ckpt = Checkpoint.open(save_checkpoint(model, tmp_path / "ck", shards=2))
    arch = Arch.from_checkpoint(ckpt)
    ids = torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(0))
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [
        layer.mlp.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, (args[0], out)))
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        logits = model(ids).logits
        h = arch.embed(ids, ckpt.embedding_weights())
        for i in range(ckpt.num_layers):
            w, pos = ckpt.block_weights(i), arch.positions(SEQ, layer=i)
            assert rel_err(arch.mlp_core(seen[i][0], w), seen[i][1]) <= 1e-5, (family, i)
            h = arch.block_forward(h, w, pos)
        assert rel_err(arch.final_logits(h, ckpt.final_weights()), logits) <= 1e-5
    for handle in handles:
        handle.remove()


def test_names_shapes_and_stages():
    cfg = ModelConfig.from_dict(tiny_config("qwen2_moe", 2).to_dict())
    fam = FAMILIES["qwen2_moe"].for_config(cfg)
    assert (cfg.num_experts, cfg.experts_per_token, cfg.moe_intermediate_size) == (4, 2, 32)
    assert cfg.shared_expert_intermediate_size == 48 and cfg.qkv_bias
    assert fam.mlp_linears[:4] == ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                                   "mlp.shared_expert.down_proj", "mlp.experts.0.gate_proj")
    assert len(fam.mlp_linears) == 3 * 5
    shapes = fam.block_shapes(cfg)
    assert shapes["mlp.gate.weight"] == (4, 64) and shapes["mlp.shared_expert_gate.weight"] == (1, 64)
    assert shapes["mlp.experts.3.down_proj.weight"] == (64, 32)
    assert shapes["mlp.shared_expert.up_proj.weight"] == (48, 64)
    assert "mlp.gate" not in fam.linears and fam.fixed == ("mlp.gate.weight", "mlp.shared_expert_gate.weight")
    first, second = fam.mlp_stages
    assert first[1] == ("mlp.experts.0.gate_proj", "mlp.experts.0.up_proj")
    assert second[1] == ("mlp.experts.0.down_proj",)
    assert fam.attn_stages == ((fam.attn_linears[:3],), (fam.attn_linears[3:],))
    mixtral = ModelConfig.from_dict(tiny_config("mixtral", 2).to_dict())
    assert mixtral.norm_topk_prob and mixtral.moe_intermediate_size == 48 and not mixtral.qkv_bias


def test_unresolved_spec_is_refused():
    with pytest.raises(ValueError, match="for_config"):
        FAMILIES["mixtral"].linears


@pytest.mark.parametrize("family, extra, message", [
    ("qwen2_moe", {"mlp_only_layers": [0]}, "dense MLP blocks between mixture-of-experts blocks"),
    ("qwen3_moe", {"decoder_sparse_step": 2}, "dense MLP blocks between mixture-of-experts blocks"),
    ("mixtral", {"num_experts_per_tok": 5}, "num_experts_per_tok=5 is more than the 4 experts"),
    ("mixtral", {"num_local_experts": 0}, "'num_local_experts' should be positive"),
])
def test_moe_configs_barber_cannot_model_are_refused(family, extra, message):
    d = tiny_config(family, 2).to_dict() | extra
    with pytest.raises(CheckpointError, match=re.escape(message)) as err:
        ModelConfig.from_dict(d)
    assert "\n" not in str(err.value)


def test_routing_matches_a_direct_computation():
    cfg = ModelConfig.from_dict(tiny_config("mixtral", 2).to_dict())
    x, router = torch.randn(10, 64), torch.randn(4, 64)
    chosen, weights = moe.route(x, router, cfg)
    probs = torch.softmax(x @ router.T, -1)
    for t in range(10):
        top = probs[t].argsort(descending=True)[:2]
        assert set(chosen[t].tolist()) == set(top.tolist())
        torch.testing.assert_close(weights[t].sum(), torch.tensor(1.0))  # Mixtral renormalises
    tokens = moe.expert_tokens(chosen, 4)
    assert sum(len(t) for t, _ in tokens) == 20
    for e, (token, slot) in enumerate(tokens):
        assert torch.equal(chosen[token, slot], torch.full_like(token, e))


def test_experts_see_one_window_per_call_and_the_stats_are_per_expert(tmp_path):
    """The plan runs one window per call whatever was asked; each expert's statistic is the sum over
    the tokens routed to it."""
    src = make_tiny_checkpoint(tmp_path, "mixtral", layers=1)
    ckpt = Checkpoint.open(src)
    assert model_shapes(ckpt).one_window
    arch = Arch.from_checkpoint(ckpt)
    w = ckpt.block_weights(0)
    x = torch.randn(1, SEQ, 64)
    stats = Stats(False, _Plain)
    arch.mlp_core(x, w, None, stats.linear(w, Chunk(range(0, 1), 0)))
    stats.finish(1)
    chosen, _ = moe.route(x[0], w["block_sparse_moe.gate.weight"], arch.config)
    for e, (token, _slot) in enumerate(moe.expert_tokens(chosen, 4)):
        want = (x[0][token].double() ** 2).sum(0)
        torch.testing.assert_close(stats.sq[f"block_sparse_moe.experts.{e}.w1"], want)
        assert stats.sq[f"block_sparse_moe.experts.{e}.w3"] is stats.sq[f"block_sparse_moe.experts.{e}.w1"]


class _Plain:
    """A single-process sum in call order (enough for one window)."""

    def __init__(self):
        self.total = None

    def add(self, s, term):
        self.total = term.clone() if self.total is None else self.total + term

    def result(self):
        return self.total


def _starved(tmp_path):
    """A qwen3_moe checkpoint (6 experts, top-2) whose routers are zero: every token's probabilities tie,
    so every token chooses the same two experts and the other four see no calibration token."""
    src = make_tiny_checkpoint(tmp_path, "qwen3_moe", layers=2)
    state = read_shards(src)
    for name, t in state.items():
        if name.endswith("mlp.gate.weight"):
            t.zero_()
    for f in src.glob("*.safetensors"):
        f.unlink()
    from safetensors.torch import save_file

    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src


@pytest.mark.parametrize("init", [InitMethod.WANDA, InitMethod.SPARSEGPT])
def test_experts_no_token_reaches_are_pruned_by_magnitude(tmp_path, init):
    src = _starved(tmp_path)
    ckpt = Checkpoint.open(src)
    cfg = ckpt.config
    chosen, _ = moe.route(torch.zeros(1, cfg.hidden_size), torch.zeros(cfg.num_experts, cfg.hidden_size), cfg)
    idle = [e for e in range(cfg.num_experts) if e not in chosen[0].tolist()]
    assert len(idle) == 4
    settings = PruneSettings(init=init, ratio=0.2, granularity=Granularity.ROW, reconstruct=Reconstruct.SUBBLOCK)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    report = prune_checkpoint(ckpt, tmp_path / "out", settings, ids, progress=False).to_json()
    before, after = read_shards(src), read_shards(tmp_path / "out")
    assert report["unreached_linears"] == 2 * 4 * 3  # 2 blocks, 4 idle experts of 3 linears
    for block in report["blocks"]:
        names = [f"mlp.experts.{e}.{p}" for e in idle for p in ("gate_proj", "up_proj", "down_proj")]
        assert block["unreached"] == names
        for local in names:
            name = f"model.layers.{block['block']}.{local}.weight"
            w, dense = after[name], before[name]
            kept = w != 0
            # the row-wise magnitude mask of the dense values; neither rebuilt nor re-fitted
            threshold = dense.abs().sort(dim=1).values[:, dense.shape[1] // 2 - 1 : dense.shape[1] // 2]
            assert torch.equal(kept, dense.abs() > threshold), name
            assert torch.equal(w[kept], dense[kept]), name
        errors = block["subblocks"][1]["reconstruct"]["relative_error"]
        assert not set(names) & set(errors)
        assert {f"mlp.experts.{e}.{p}" for e in chosen[0].tolist() for p in ("gate_proj", "down_proj")} <= set(errors)
    for name in before:
        if name.endswith("mlp.gate.weight"):
            assert torch.equal(after[name], before[name])  # routers stay dense


@pytest.mark.parametrize("family", MOE_NAMES)
def test_micro_batch_wish_and_refit_keep_the_bytes(tmp_path, family):
    """Any --batch-size gives the same bytes (one window per call), with the rebuild and the re-fit per expert."""
    src = make_tiny_checkpoint(tmp_path, family, layers=2)
    ids = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(1))
    outs = []
    for batch in (1, 4):
        settings = PruneSettings(pattern=Pattern.parse("2:4"), ratio=0.2, batch_size=batch,
                                 reconstruct=Reconstruct.SUBBLOCK, sample_groups=3)
        report = prune_checkpoint(Checkpoint.open(src), tmp_path / f"b{batch}", settings, ids, progress=False)
        assert report.memory["plan"]["micro_batch"] == 1
        outs.append(read_shards(tmp_path / f"b{batch}"))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    config = json.loads((src / "config.json").read_text())
    assert json.loads((tmp_path / "b1" / "config.json").read_text())["model_type"] == config["model_type"]


def test_report_picture_averages_the_experts_per_kind():
    from barber.report_view import _by_kind

    rows = {"mlp.experts.0.w1": [(0, 0.5), (1, 0.4)], "mlp.experts.1.w1": [(0, 0.7), (1, 0.6)],
            "self_attn.q_proj": [(0, 0.5)]}
    assert _by_kind(rows) == {"mlp.experts.*.w1 (mean)": [(0, pytest.approx(0.6)), (1, pytest.approx(0.5))],
                              "self_attn.q_proj": [(0, 0.5)]}
