"""The streamed safetensors writer: tensors given whole or in pieces, and what it refuses."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from barber.writer import TensorSpec, temporary_path, write_safetensors


def _spec(name: str, t: torch.Tensor, produce) -> TensorSpec:
    return TensorSpec(name, t.dtype, tuple(t.shape), produce)


def test_pieces_and_whole_tensors_give_the_same_file(tmp_path):
    a = torch.randn(7, 3, 5)
    b = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    s = torch.tensor(2.5)
    whole = tmp_path / "whole.safetensors"
    pieces = tmp_path / "pieces.safetensors"
    write_safetensors(whole, [_spec("a", a, lambda: a), _spec("b", b, lambda: b), _spec("s", s, lambda: s)])
    nbytes = write_safetensors(pieces, [
        _spec("a", a, lambda: iter([a[:2], a[2:2], a[2:6], a[6:]])),  # an empty piece is fine
        _spec("b", b, lambda: [b.t().contiguous().t()]),  # non-contiguous pieces are written in C order
        _spec("s", s, lambda: [s]),
    ])
    assert whole.read_bytes() == pieces.read_bytes()
    assert nbytes == a.numel() * 4 + b.numel() * 8 + 4
    got = load_file(pieces)
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b) and torch.equal(got["s"], s)


@pytest.mark.parametrize("pieces, message", [
    (lambda a: [a[:3], a[3:].double()], "produced torch.float64"),  # wrong dtype
    (lambda a: [a[:3], a[3:, :2]], r"produced torch.float32 \[4, 2, 5\]"),  # wrong trailing shape
    (lambda a: [a[:3]], "produced 3 rows"),  # too few rows
    (lambda a: [a, a[:1]], "produced 8 rows"),  # too many rows
    (lambda a: [a.reshape(7, 15)], r"produced torch.float32 \[7, 15\]"),  # wrong rank
])
def test_bad_pieces_raise_and_leave_no_file(tmp_path, pieces, message):
    a = torch.randn(7, 3, 5)
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match=message):
        write_safetensors(path, [_spec("a", a, lambda: pieces(a))])
    assert not path.exists() and not temporary_path(path).exists()
