"""The streaming pruner end to end on tiny random models of every family."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from helpers_models import FAMILY_NAMES, make_tiny_checkpoint, read_shards

from barber.checkpoint import Checkpoint
from barber.evaluate import perplexity
from barber.output import REPORT_FILE
from barber.prune import Granularity, InitMethod, Pattern
from barber.run import prune_checkpoint
from barber.settings import PruneSettings

NSAMPLES, SEQLEN = 4, 32


def calib_ids(vocab: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (NSAMPLES, SEQLEN), generator=g)



def run(ckpt_dir, out_dir, **kw) -> dict:
    settings = PruneSettings(**kw)
    return prune_checkpoint(Checkpoint.open(ckpt_dir), out_dir, settings, calib_ids(), progress=False).to_json()


def pruned_names(ckpt: Checkpoint) -> set[str]:
    return {ckpt.block_tensor_name(i, n + ".weight") for i in range(ckpt.num_layers) for n in ckpt.family.linears}


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("init", list(InitMethod))
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_method_gives_exact_sparsity(tmp_path, family, init, pattern):
    src = make_tiny_checkpoint(tmp_path, family, shards=2 if family == "llama" else 1)
    pat = Pattern.parse(pattern)
    report = run(src, tmp_path / "out", init=init, pattern=pat, ratio=0.2, granularity=Granularity.ROW)
    ckpt = Checkpoint.open(src)
    before, after = read_shards(src), read_shards(tmp_path / "out")
    assert before.keys() == after.keys()
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == sorted(ckpt.shard_files)
    targets = pruned_names(ckpt)
    for name, w in after.items():
        if name not in targets:
            assert torch.equal(w, before[name]), f"{name} must be untouched"
            continue
        kept = w != 0
        if pat.structured:
            assert (kept.reshape(w.shape[0], -1, 4).sum(-1) <= 2).all(), name
        else:
            assert (kept.sum(1) <= w.shape[1] // 2).all(), name
        assert not torch.signbit(w[~kept]).any(), f"{name}: pruned entries must be +0.0"
        if init is not InitMethod.SPARSEGPT:
            assert torch.equal(w[kept], before[name][kept]), f"{name}: kept weights keep their dense values"
    for block in report["blocks"]:
        for local, info in block["layers"].items():
            rows, cols = info["shape"]
            assert info["kept"] == rows * (cols // 2), f"block {block['block']} {local}: exact per-row count"
    assert report["sparsity"] == pytest.approx(0.5)


def test_ratio_zero_reproduces_the_initial_mask(tmp_path):
    src = make_tiny_checkpoint(tmp_path, "llama")
    run(src, tmp_path / "a", rebuild=False)
    report = run(src, tmp_path / "b", ratio=0.0)
    assert report["swaps"] == 0
    a, b = read_shards(tmp_path / "a"), read_shards(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rebuild_swaps_and_lowers_reconstruction_loss(tmp_path):
    src = make_tiny_checkpoint(tmp_path, "llama", layers=3)
    report = run(src, tmp_path / "out", init=InitMethod.MAGNITUDE, ratio=0.1, granularity=Granularity.BLOCK)
    subblocks = [sb for b in report["blocks"] for sb in b["subblocks"]]
    assert report["swaps"] > 0
    assert len(subblocks) == 6
    mean_before = sum(sb["loss_before"] for sb in subblocks) / len(subblocks)
    mean_after = sum(sb["loss_after"] for sb in subblocks) / len(subblocks)
    assert mean_after < mean_before


@pytest.mark.parametrize("granularity", list(Granularity))
def test_granularity_keeps_its_group_counts(tmp_path, granularity):
    src = make_tiny_checkpoint(tmp_path, "qwen2")
    report = run(src, tmp_path / "out", ratio=0.5, granularity=granularity)
    assert report["swaps"] > 0
    assert report["sparsity"] == pytest.approx(0.5)
    out = read_shards(tmp_path / "out")
    ckpt = Checkpoint.open(src)
    lows, highs = [], []
    for block in report["blocks"]:  # the reported row range is that of the written weights
        for local, info in block["layers"].items():
            w = out[ckpt.block_tensor_name(block["block"], local + ".weight")]
            zeros = (w == 0).sum(1)  # the tiny model's dense weights have no exact zeros
            assert info["row_sparsity"] == pytest.approx([int(zeros.min()) / w.shape[1], int(zeros.max()) / w.shape[1]])
            lows.append(info["row_sparsity"][0])
            highs.append(info["row_sparsity"][1])
    assert report["row_sparsity"] == [min(lows), max(highs)]
    if granularity is Granularity.ROW:
        assert report["row_sparsity"] == [0.5, 0.5]
    else:  # these groups keep their own counts, not every row's
        assert report["row_sparsity"][0] < 0.5 < report["row_sparsity"][1]


def test_same_seed_gives_byte_identical_files(tmp_path):
    src = make_tiny_checkpoint(tmp_path, "mistral", shards=2)
    run(src, tmp_path / "a", ratio=0.3)
    run(src, tmp_path / "b", ratio=0.3)
    files = sorted(p.name for p in (tmp_path / "a").iterdir() if p.name != REPORT_FILE)
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir() if p.name != REPORT_FILE)
    assert "model.safetensors.index.json" in files and "tokenizer.json" in files
    for name in files:
        digest = [hashlib.sha256((tmp_path / d / name).read_bytes()).hexdigest() for d in "ab"]
        assert digest[0] == digest[1], name
    assert not (tmp_path / "a" / ".barber-work").exists()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_output_loads_in_transformers_with_the_same_perplexity(tmp_path, family):
    from transformers import AutoModelForCausalLM

    src = make_tiny_checkpoint(tmp_path, family)
    run(src, tmp_path / "out", ratio=0.2)
    ids = calib_ids(seed=5)
    ours = perplexity(Checkpoint.open(tmp_path / "out"), ids.flatten(), seqlen=SEQLEN, progress=False).ppl
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [float(model(w[None], labels=w[None]).loss) for w in ids]
    assert ours == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-4)
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert report["settings"]["init"] == "wanda"


@pytest.mark.parametrize("kind", ["attn", "mlp"])
def test_batched_per_sample_gradients_match_autograd(tmp_path, kind):
    """sum_n (dL_n/dW)^2 from the batched pass equals one autograd backward per sample."""
    from barber.fold import Fold, SampleGroups
    from barber.model import Arch
    from barber.rebuild import per_sample_grad_sq

    ckpt = Checkpoint.open(make_tiny_checkpoint(tmp_path, "qwen2"))
    arch = Arch.from_checkpoint(ckpt)
    w = ckpt.block_weights(0)
    pos = arch.positions(SEQLEN)
    names = ckpt.family.attn_linears if kind == "attn" else ckpt.family.mlp_linears
    core = arch.attn_core if kind == "attn" else arch.mlp_core
    x = torch.randn(3, SEQLEN, ckpt.config.hidden_size, generator=torch.Generator().manual_seed(0))
    sparse = {k: v * (torch.rand_like(v) > 0.5) for k, v in w.items()}
    target = core(x, sparse, pos).detach()
    folds = {n: Fold(SampleGroups(3, 2)) for n in names}
    per_sample_grad_sq(core, x, target, w, pos, names, folds, range(3))
    got = {n: f.result() for n, f in folds.items()}
    expected = {n: torch.zeros_like(w[n + ".weight"]) for n in names}
    for b in range(3):
        leaves = {
            k: v.detach().clone().requires_grad_(k.rsplit(".", 1)[0] in names and k.endswith("weight"))
            for k, v in w.items()
        }
        loss = torch.nn.functional.mse_loss(core(x[b : b + 1], leaves, pos), target[b : b + 1])
        grads = torch.autograd.grad(loss, [leaves[n + ".weight"] for n in names])
        for n, g in zip(names, grads):
            expected[n] += g * g
    for n in names:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-12)
