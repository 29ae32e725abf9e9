"""The order-fixed sums of barber.fold: groups, chunks, and the same bits for any number of ranks.

Ranks are simulated with threads joined by queues (the `Link` protocol), so every order of
arrival is exercised without torch.distributed; tests/test_distributed.py runs real ranks.
"""

from __future__ import annotations

import queue
import threading

import pytest
import torch

from barber.fold import Fold, SampleGroups


def _values(n: int, shape=(6, 5), seed=0) -> list[torch.Tensor]:
    """Per-sample values whose columns span 12 orders of magnitude: sums of them depend on their order."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-6, 6, shape[-1])
    return [torch.randn(shape, generator=g) * scale for _ in range(n)]


def _two_level(values: list[torch.Tensor], lay: SampleGroups) -> torch.Tensor:
    """The definition, written out: fold each group left to right, then the groups left to right."""
    total = None
    for g in range(lay.groups):
        part = None
        for s in range(lay.start(g), lay.start(g + 1)):
            part = values[s].clone() if part is None else part + values[s]
        total = part if total is None else total + part
    return total


class _QueueLink:
    """A `Link` between threads: one queue per (source, destination)."""

    def __init__(self, rank: int, size: int, queues: dict):
        self.rank, self.size, self._q = rank, size, queues

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._q[(self.rank, dst)].put(tensor.clone())

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        tensor.copy_(self._q[(src, self.rank)].get(timeout=30))


def _run_ranks(values, nsamples, groups, world, feed="add") -> list:
    queues = {(a, b): queue.Queue() for a in range(world) for b in range(world)}
    results, errors = [None] * world, []

    def rank_main(r: int) -> None:
        try:
            lay = SampleGroups(nsamples, groups, world, r)
            fold = Fold(lay, _QueueLink(r, world, queues))
            for s in lay.samples():
                if feed == "add":
                    fold.add(s, values[s].clone())
                else:
                    fold.addmm(s, values[s].T, values[s])
            results[r] = fold.result()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def test_groups_cover_samples_once_and_chunks_stay_inside_groups():
    lay = SampleGroups(10, 4)
    assert [lay.start(g) for g in range(5)] == [0, 2, 5, 7, 10]
    assert [lay.group_of(s) for s in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    for world in (1, 2, 3, 4):
        seen = []
        for r in range(world):
            rank = SampleGroups(10, 4, world, r)
            samples = rank.samples()
            assert rank.owned() == list(range(r, 4, world))
            for g in rank.owned():  # rows(g) is where group g sits in its owner's buffer
                assert samples[rank.rows(g)] == list(range(rank.start(g), rank.start(g + 1)))
            for mb in (1, 2, 3, 16):
                chunks = rank.chunks(mb)
                assert [s for c in chunks for s in c.samples] == samples
                assert all(len({rank.group_of(s) for s in c.samples}) == 1 for c in chunks)
                assert all(c.rows.stop - c.rows.start <= mb for c in chunks)
            seen += samples
        assert sorted(seen) == list(range(10))


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="3 ranks but only 2 sample groups"):
        SampleGroups(8, 2, world=3)
    with pytest.raises(ValueError, match="sample groups for 4 samples"):
        SampleGroups(4, 5)
    with pytest.raises(ValueError, match="sample groups for 4 samples"):
        SampleGroups(4, 0)


@pytest.mark.parametrize("nsamples,groups", [(12, 4), (13, 5), (7, 7), (9, 1)])
def test_one_process_is_the_definition(nsamples, groups):
    values = _values(nsamples)
    lay = SampleGroups(nsamples, groups)
    fold = Fold(lay)
    for s in range(nsamples):
        fold.add(s, values[s].clone())
    assert torch.equal(fold.result(), _two_level(values, lay))


@pytest.mark.parametrize("world", [2, 3, 4, 5])
@pytest.mark.parametrize("feed", ["add", "addmm"])
def test_every_world_size_gives_the_same_bits(world, feed):
    nsamples, groups = 23, 5
    values = _values(nsamples, shape=(7, 6), seed=world)
    expected = _run_ranks(values, nsamples, groups, 1, feed)[0]
    results = _run_ranks(values, nsamples, groups, world, feed)
    assert torch.equal(results[0], expected)
    assert all(r is None for r in results[1:])
    # the order matters for these values: adding per-rank sums, as an all_reduce would, differs
    per_rank = [sum(values[s] for s in SampleGroups(nsamples, groups, 2, r).samples()) for r in range(2)]
    if feed == "add":
        assert not torch.equal(per_rank[0] + per_rank[1], expected)


def test_feeding_out_of_order_or_incomplete_is_an_error():
    lay = SampleGroups(6, 3)
    fold = Fold(lay)
    with pytest.raises(RuntimeError, match="does not start"):
        fold.add(1, torch.ones(2))
    fold = Fold(lay)
    fold.add(0, torch.ones(2))
    fold.add(1, torch.ones(2))
    with pytest.raises(RuntimeError, match="were not fed"):
        fold.result()
    with pytest.raises(ValueError, match="needs a link"):
        Fold(SampleGroups(6, 3, 2, 0))
