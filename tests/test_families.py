"""Parity with transformers for every family: sub-block tensors, block outputs and final logits.

Each case builds a tiny random model with transformers, saves it (single file and sharded) and
replays it with barber's streaming reader and functional block. The sub-block tensors (X = input of
the first attention linear, Y = o output, X2 = input of the first MLP linear, Y2 = down/fc2 output;
Y and Y2 after the sandwich norms where the family has them) are captured from transformers with
hooks on the modules that `FamilySpec` names, so the split itself is checked, not only the composition.
"""

from __future__ import annotations

import pytest
import torch
from helpers_models import make_tiny_model, save_checkpoint

from barber.checkpoint import Checkpoint
from barber.model import Arch

pytest.importorskip("transformers")

RTOL = 1e-4
SEQ = 40  # longer than Mistral's sliding window (16) and than llama3's original context (16)

CASES = {
    "llama-gqa-llama3": ("llama", dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "llama-linear-tied-bias": ("llama", dict(
        rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=True, attention_bias=True,
        mlp_bias=True, num_key_value_heads=4)),
    "mistral-sliding": ("mistral", {}),
    "qwen2-qkv-bias": ("qwen2", {}),
    "opt-pre-ln": ("opt", {}),
    "opt-post-ln-project": ("opt", dict(do_layer_norm_before=False, word_embed_proj_dim=32)),
    "qwen3-qk-norm": ("qwen3", {}),
    "qwen3-bias-tied": ("qwen3", dict(attention_bias=True, tie_word_embeddings=True)),
    "phi3-fused-sliding": ("phi3", dict(sliding_window=16)),
    "phi3-partial-rotary": ("phi3", dict(partial_rotary_factor=0.5, num_key_value_heads=4)),
    "gemma2-softcap-alternating": ("gemma2", {}),
    "gemma3-local-rope": ("gemma3_text", {}),
    "gemma3-linear-global-capped": ("gemma3_text", dict(
        rope_scaling={"rope_type": "linear", "factor": 4.0}, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0, tie_word_embeddings=False)),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def capture_hf(model, family, layers: int, ids: torch.Tensor):
    """Run transformers with hooks; returns (hidden_states, logits, per-block dict of X, Y, X2, Y2)."""
    captured = [dict() for _ in range(layers)]
    handles = []
    for i in range(layers):
        def hook_in(key, i=i):
            return lambda mod, args, out: captured[i].__setitem__(key, args[0].detach().clone())

        def hook_out(key, i=i):
            return lambda mod, args, out: captured[i].__setitem__(key, out.detach().clone())

        sub = lambda local, i=i: model.get_submodule(family.block_tensor_name(i, local))  # noqa: E731
        handles += [
            sub(family.attn_linears[0]).register_forward_hook(hook_in("X")),
            sub(family.attn_out_norm or family.o).register_forward_hook(hook_out("Y")),
            sub(family.mlp_linears[0]).register_forward_hook(hook_in("X2")),
            sub(family.mlp_out_norm or family.down).register_forward_hook(hook_out("Y2")),
        ]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    for h in handles:
        h.remove()
    return out.hidden_states, out.logits, captured


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request, tmp_path_factory):
    family_name, overrides = CASES[request.param]
    model = make_tiny_model(family_name, layers=3, seed=1, **overrides)
    root = tmp_path_factory.mktemp(request.param)
    dirs = {s: save_checkpoint(model, root / f"s{s}", shards=s) for s in (1, 3)}
    return model, dirs


@pytest.mark.parametrize("shards", [1, 3])
def test_parity_with_transformers(case, shards):
    model, dirs = case
    ckpt = Checkpoint.open(dirs[shards])
    arch = Arch.from_checkpoint(ckpt)
    ids = torch.randint(0, ckpt.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
    hidden, logits, cap = capture_hf(model, ckpt.family, ckpt.num_layers, ids)
    with torch.no_grad():
        h = arch.embed(ids, ckpt.embedding_weights())
        assert rel_err(h, hidden[0]) <= RTOL
        for i in range(ckpt.num_layers):
            pos = arch.positions(SEQ, layer=i)
            w = ckpt.block_weights(i)
            x = arch.attn_input(h, w)
            y = arch.attn_core(x, w, pos)
            h2 = arch.attn_residual(h, y, w)
            x2 = arch.mlp_input(h2, w)
            y2 = arch.mlp_core(x2, w)
            out = arch.mlp_residual(h2, y2, w)
            for name, ours in (("X", x), ("Y", y), ("X2", x2), ("Y2", y2)):
                assert rel_err(ours, cap[i][name].reshape(ours.shape)) <= RTOL, (i, name)
            assert torch.equal(out, arch.block_forward(h, w, pos))
            if i + 1 < ckpt.num_layers:  # transformers' last hidden state already has the final norm
                assert rel_err(out, hidden[i + 1]) <= RTOL, i
            h = out
        assert rel_err(arch.final_logits(h, ckpt.final_weights()), logits) <= RTOL


def test_scaling_and_window_are_exercised():
    """Guard against a vacuous parity test: the configs really use scaled rope and a sliding window."""
    llama = make_tiny_model("llama", layers=1, **CASES["llama-gqa-llama3"][1])
    assert llama.config.rope_parameters["rope_type"] == "llama3"
    assert make_tiny_model("mistral", layers=1).config.sliding_window < SEQ
    phi3 = make_tiny_model("phi3", layers=1, **CASES["phi3-partial-rotary"][1])
    assert phi3.config.rope_parameters["partial_rotary_factor"] == 0.5
    for family in ("gemma2", "gemma3_text"):
        cfg = make_tiny_model(family, layers=3).config
        assert cfg.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
        assert cfg.sliding_window < SEQ and cfg.query_pre_attn_scalar != cfg.head_dim
    gemma3 = make_tiny_model("gemma3_text", layers=2, **CASES["gemma3-linear-global-capped"][1]).config
    assert gemma3.rope_parameters["full_attention"]["rope_type"] == "linear"
    assert gemma3.rope_parameters["sliding_attention"]["rope_theta"] == 100.0


def test_capping_changes_the_logits(case):
    """Soft-capping is not a no-op at these weights (or the parity of Gemma's capping would be vacuous)."""
    model, dirs = case
    ckpt = Checkpoint.open(dirs[1])
    cfg = ckpt.config
    if cfg.final_logit_softcapping is None:
        pytest.skip("no soft-capping")
    ids = torch.randint(0, cfg.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert float(logits.abs().max()) > 0.5 * cfg.final_logit_softcapping


def test_custom_linear_sees_every_linear_in_order(case):
    model, dirs = case
    ckpt = Checkpoint.open(dirs[1])
    arch = Arch.from_checkpoint(ckpt)
    w = ckpt.block_weights(0)
    seen = []

    def linear(name, x):
        seen.append((name, tuple(x.shape)))
        return torch.nn.functional.linear(x, w[name + ".weight"], w.get(name + ".bias"))

    h = torch.randn(1, 8, ckpt.config.hidden_size)
    pos = arch.positions(8, layer=0)
    out = arch.block_forward(h, w, pos, linear=linear)
    assert [n for n, _ in seen] == list(ckpt.family.attn_linears + ckpt.family.mlp_linears)
    assert all(len(shape) == 3 and shape[0] == 1 for _, shape in seen)  # [batch, tokens, in]: the sample leads
    assert torch.equal(out, arch.block_forward(h, w, pos))


def test_autograd_through_sub_blocks(case):
    """Gradients w.r.t. inputs and weights are exact (float64 gradcheck); inputs are never modified.

    The weight gradient is checked through a few perturbed entries (a full-matrix gradcheck is slow).
    """
    model, dirs = case
    ckpt = Checkpoint.open(dirs[1])
    arch = Arch.from_checkpoint(ckpt)
    w = {k: v.double() for k, v in ckpt.block_weights(0).items()}
    pos = arch.positions(4, layer=0)
    fam = ckpt.family
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, ckpt.config.hidden_size, dtype=torch.float64, generator=gen, requires_grad=True)
    delta = torch.zeros(6, dtype=torch.float64, requires_grad=True)

    def perturbed(name, target):
        weight = w[name + ".weight"]
        if name != target:
            return weight
        rows = torch.randint(0, weight.shape[0], (6,), generator=torch.Generator().manual_seed(1))
        cols = torch.randint(0, weight.shape[1], (6,), generator=torch.Generator().manual_seed(2))
        return weight.index_put((rows, cols), delta, accumulate=True)

    def attn(x, d):
        lin = lambda n, t: torch.nn.functional.linear(t, perturbed(n, fam.attn_linears[0]), w.get(n + ".bias"))  # noqa: E731
        return arch.attn_residual(x, arch.attn_core(arch.attn_input(x, w), w, pos, lin), w)

    def mlp(x, d):
        lin = lambda n, t: torch.nn.functional.linear(t, perturbed(n, fam.down), w.get(n + ".bias"))  # noqa: E731
        return arch.mlp_residual(x, arch.mlp_core(arch.mlp_input(x, w), w, lin), w)

    before = x.detach().clone()
    assert torch.autograd.gradcheck(attn, (x, delta), fast_mode=True)
    assert torch.autograd.gradcheck(mlp, (x, delta), fast_mode=True)
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_close_to_float32(case, dtype):
    model, dirs = case
    ckpt = Checkpoint.open(dirs[1])
    arch = Arch.from_checkpoint(ckpt)
    ids = torch.randint(0, ckpt.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    results = {}
    for dt in (torch.float32, dtype):
        with torch.no_grad():
            h = arch.embed(ids, ckpt.embedding_weights(dt))
            for i in range(ckpt.num_layers):
                h = arch.block_forward(h, ckpt.block_weights(i, dt), arch.positions(16, layer=i))
            results[dt] = arch.final_logits(h, ckpt.final_weights(dt))
    assert results[dtype].dtype == dtype
    assert rel_err(results[dtype].float(), results[torch.float32]) < 0.05
