"""The re-fit of the kept weights: the solvers against torch.linalg.lstsq, and the pruner's guarantees
(masks and zeros unchanged, lower calibration error than no re-fit)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers_models import make_tiny_checkpoint

from barber.checkpoint import Checkpoint
from barber.pipeline import Pruner
from barber.prune import Pattern
from barber.reconstruct import damped, exact_masked_lstsq, masked_pcg
from barber.settings import RECIPES, PruneSettings, Reconstruct, SettingsError

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(rows: int, cols: int, tokens: int, seed: int, ragged: bool):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g) * (torch.rand(cols, generator=g) * 3 + 0.1)
    y = torch.randn(tokens, rows, generator=g)
    if ragged:  # rows keep different numbers of weights (column, layer or block rebuilds)
        mask = torch.rand(rows, cols, generator=g) > torch.rand(rows, 1, generator=g) * 0.8
    else:
        mask = torch.rand(rows, cols, generator=g).argsort(1) < cols // 2
    return x.double(), y.double(), mask


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_solvers_match_lstsq_row_by_row(ragged, damp):
    """Each row's kept weights minimise ||X_K w - y||^2 + lam ||w - w_d||^2 (lstsq on the augmented system)."""
    x, y, mask = _problem(6, 12, 40, 0, ragged)
    w_dense = torch.randn(6, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    hessian = x.T @ x
    hd, lam = damped(hessian, damp)
    rhs = y.T @ x + lam * w_dense
    exact = exact_masked_lstsq(hd, rhs, mask)
    pcg = masked_pcg(hd.float(), rhs.float(), torch.zeros(6, 12), mask, iters=200, tol=1e-7)
    for r in range(6):
        k = mask[r].nonzero().squeeze(1)
        a = torch.cat([x[:, k], math.sqrt(lam) * torch.eye(len(k), dtype=torch.float64)])
        b = torch.cat([y[:, r], math.sqrt(lam) * w_dense[r, k]])
        want = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(exact[r, k], want, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(pcg[r, k].double(), want, rtol=2e-3, atol=2e-4)
    assert (exact[~mask] == 0).all() and (pcg[~mask] == 0).all()


def _prune(tmp_path, family: str, **kw):
    ckpt = Checkpoint.open(make_tiny_checkpoint(tmp_path / family, family, layers=2))
    ids = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0))
    pruner = Pruner(ckpt, PruneSettings(batch_size=2, **kw), progress=False)
    state, written = pruner.start(ids), {}
    while state.next_block < ckpt.num_layers:
        state = pruner.run_block(state, lambda i, w: written.update({(i, k): v.clone() for k, v in w.items()}))
    return written, state.blocks


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("mode", [Reconstruct.LAYER, Reconstruct.SUBBLOCK])
@pytest.mark.parametrize("pattern", [Pattern(), Pattern(2, 4)])
def test_refit_keeps_masks_and_zeros_and_lowers_the_error(tmp_path, family, mode, pattern):
    sparsity = 0.5
    plain, plain_blocks = _prune(tmp_path / "a", family, pattern=pattern, sparsity=sparsity, rebuild=False)
    refit, blocks = _prune(tmp_path / "b", family, pattern=pattern, sparsity=sparsity, rebuild=False, reconstruct=mode)
    # block 0 sees the same inputs, so the same masks; later blocks follow another trajectory
    for (i, name), w in refit.items():
        if i == 0:
            assert torch.equal(w != 0, plain[i, name] != 0), name
        zeros = w == 0
        assert (w[zeros].view(torch.int32) == 0).all()  # +0.0, never -0.0
        if pattern.structured:
            assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()
    for sub in blocks[0].subblocks:
        for name, (before, after) in sub.reconstruct["relative_error"].items():
            assert after <= before * (1 + 1e-4), (sub.subblock, name, before, after)
    if mode is Reconstruct.SUBBLOCK:  # the sub-block output error, as the pruner reports it
        loss_plain = _subblock_losses(tmp_path / "c", family, pattern, sparsity)
        assert blocks[0].subblocks[0].loss_after < loss_plain[0]


def _subblock_losses(tmp_path, family, pattern, sparsity) -> list[float]:
    """loss_after of block 0's sub-blocks without a re-fit (a run that reports sub-blocks: rebuild at ratio 0)."""
    _, blocks = _prune(tmp_path, family, pattern=pattern, sparsity=sparsity, ratio=0.0)
    return [sb.loss_after for sb in blocks[0].subblocks]


def test_recipe_paper_is_todays_defaults():
    assert RECIPES["paper"].settings() == PruneSettings()
    assert RECIPES["paper"].settings(Pattern(2, 4)) == PruneSettings(sparsity=0.5, pattern=Pattern(2, 4))
    assert RECIPES["refit"].settings().reconstruct is Reconstruct.SUBBLOCK


@pytest.mark.parametrize(
    "kw, field",
    [({"sparsity": 1.0}, "sparsity"), ({"ratio": -0.1}, "ratio"), ({"batch_size": -1}, "batch_size"),
     ({"pattern": Pattern(2, 4), "sparsity": 0.6}, "sparsity"), ({"reconstruct_iters": 0}, "reconstruct_iters"),
     ({"reconstruct_damp": float("nan")}, "reconstruct_damp")],
)
def test_settings_validate_themselves(kw, field):
    with pytest.raises(SettingsError) as info:
        PruneSettings(**kw)
    assert info.value.field == field and info.value.exit_code == 2
    assert dataclasses.replace(PruneSettings()) == PruneSettings()


def _stream(tmp_path, name: str, *flags: str) -> tuple[dict, bytes]:
    import json

    from barber.cli import stream_main

    src = tmp_path / "src"
    if not src.exists():
        make_tiny_checkpoint(tmp_path, "qwen2", name="src")
        (tmp_path / "calib.txt").write_text("pack my box with five dozen liquor jugs. " * 300)
    out = tmp_path / name
    args = ["--ckpt", str(src), "--out", str(out), "--calib", str(tmp_path / "calib.txt"), "--nsamples", "4",
            "--seqlen", "16", "--batch-size", "2", "--no-progress", *flags]
    assert stream_main(args) == 0
    return json.loads((out / "barber_report.json").read_text()), (out / "model.safetensors").read_bytes()


def test_cli_refit_alone_and_recipes(tmp_path):
    """--recipe paper writes the bytes of today's explicit flags; a re-fit runs with and without the rebuild."""
    _, paper = _stream(tmp_path, "paper", "--recipe", "paper")
    _, explicit = _stream(tmp_path, "explicit", "--init", "wanda", "--rebuild-ratio", "0.01", "--granularity", "row",
                          "--metric", "wg", "--reconstruct", "none")
    assert paper == explicit
    report, alone = _stream(tmp_path, "alone", "--no-rebuild", "--reconstruct", "layer")
    assert report["swaps"] == 0 and report["settings"]["reconstruct"] == "layer"
    report, refit = _stream(tmp_path, "refit", "--recipe", "refit")
    assert report["settings"]["reconstruct"] == "subblock" and not report["settings"]["rebuild"]
    assert len({paper, alone, refit}) == 3  # (0.01 of a tiny row is no swap at all)


def test_cli_rebuild_flag_turns_the_rebuild_on_in_the_refit_recipe(tmp_path):
    report, _ = _stream(tmp_path, "both", "--recipe", "refit", "--rebuild")
    assert report["settings"]["rebuild"] and report["settings"]["reconstruct"] == "subblock"
    assert all("loss_before" in sb for b in report["blocks"] for sb in b["subblocks"])
