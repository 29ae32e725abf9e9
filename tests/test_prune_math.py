"""The pruning math of barber.prune: exact counts, SparseGPT quality, rebuild groups."""

from __future__ import annotations

import pytest
import torch

from barber import prune
from barber.prune import Granularity, Metric, Pattern


def test_pruned_count_is_exact_in_decimal():
    assert prune.pruned_count(100, 0.29) == 29  # 0.29 * 100 == 28.999999999999996 in binary
    assert prune.pruned_count(576, 0.5) == 288
    assert prune.pruned_count(7, 0.0) == 0


def test_pattern_parse():
    assert Pattern.parse("2:4") == Pattern(2, 4)
    assert Pattern.parse("unstructured") == Pattern()
    for bad in ["4:2", "2:", "a:b", "0:4", "2:4:8"]:
        with pytest.raises(ValueError):
            Pattern.parse(bad)


@pytest.mark.parametrize("per_matrix", [False, True])
def test_magnitude_counts(per_matrix):
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-3, 4, (16, 40), generator=g).float()  # heavy ties
    mask = prune.magnitude_mask(w, 0.3, Pattern(), per_matrix)
    if per_matrix:
        assert int(mask.sum()) == w.numel() - prune.pruned_count(w.numel(), 0.3)
        kept, pruned = w.abs()[mask], w.abs()[~mask]
        assert kept.min() >= pruned.max()
    else:
        assert (mask.sum(1) == 40 - 12).all()


def test_nm_select_keeps_n_of_m():
    w = torch.randn(8, 32)
    mask = prune.select(w.abs(), 0.5, Pattern(2, 4))
    assert (mask.reshape(8, 8, 4).sum(-1) == 2).all()


def _hessian(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).float()
    return flat.T @ flat


@pytest.mark.parametrize("pattern", [Pattern(), Pattern(2, 4)])
def test_sparsegpt_exact_sparsity_and_lower_error(pattern):
    g = torch.Generator().manual_seed(1)
    cols, rows = 256, 48
    x = torch.randn(4, 64, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.1  # correlated inputs
    w = torch.randn(rows, cols, generator=g)
    new_w, keep = prune.sparsegpt_prune(w, _hessian(x), nsamples=4, sparsity=0.5, pattern=pattern)
    if pattern.structured:
        assert (keep.reshape(rows, -1, 4).sum(-1) == 2).all()
    else:
        assert (keep.sum(1) == cols // 2).all()
    assert torch.equal(new_w == 0, ~keep | (new_w == 0))
    assert not torch.signbit(new_w[~keep]).any(), "pruned entries are +0.0"
    ref = x @ w.T
    err_sgpt = ((x @ new_w.T - ref) ** 2).mean()
    wanda_keep = prune.select(prune.wanda_scores(w, (x.reshape(-1, cols) ** 2).sum(0)), 0.5, pattern)
    err_wanda = ((x @ prune.apply_mask(w, wanda_keep).T - ref) ** 2).mean()
    assert err_sgpt < 0.8 * err_wanda


def test_rebuild_scores_metrics():
    w = torch.tensor([[-2.0, 1.0]])
    a = torch.tensor([[4.0, 9.0]])
    assert torch.equal(prune.rebuild_scores(w, a, Metric.WG), torch.tensor([[4.0, 3.0]]))
    assert torch.equal(prune.rebuild_scores(w, a, Metric.W), torch.tensor([[2.0, 1.0]]))
    assert torch.equal(prune.rebuild_scores(w, a, Metric.G), torch.tensor([[2.0, 3.0]]))


@pytest.mark.parametrize("granularity", list(Granularity))
def test_rebuild_preserves_group_counts(granularity):
    g = torch.Generator().manual_seed(2)
    shapes = {"a": (12, 40), "b": (20, 12)}
    scores = {n: torch.rand(s, generator=g) for n, s in shapes.items()}
    masks = {n: prune.select(torch.rand(s, generator=g), 0.5, Pattern()) for n, s in shapes.items()}
    new = prune.rebuild(scores, masks, 0.5, granularity, Pattern())
    assert sum(int((new[n] != masks[n]).sum()) for n in shapes) > 0, "swaps happen"
    for n in shapes:
        if granularity is Granularity.ROW:
            assert torch.equal(new[n].sum(1), masks[n].sum(1))
        elif granularity is Granularity.COLUMN:
            assert torch.equal(new[n].sum(0), masks[n].sum(0))
        elif granularity is Granularity.LAYER:
            assert int(new[n].sum()) == int(masks[n].sum())
    assert sum(int(new[n].sum()) for n in shapes) == sum(int(masks[n].sum()) for n in shapes)
    same = prune.rebuild(scores, masks, 0.0, granularity, Pattern())
    assert all(torch.equal(same[n], masks[n]) for n in shapes)


def test_rebuild_nm_needs_row_granularity():
    s = {"a": torch.rand(4, 8)}
    m = {"a": prune.select(s["a"], 0.5, Pattern(2, 4))}
    out = prune.rebuild(s, m, 1.0, Granularity.ROW, Pattern(2, 4))
    assert (out["a"].reshape(4, 2, 4).sum(-1) == 2).all()
    with pytest.raises(ValueError, match="row granularity"):
        prune.rebuild(s, m, 1.0, Granularity.BLOCK, Pattern(2, 4))
