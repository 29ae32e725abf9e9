"""Calibration data: formats, reproducible sampling, clear errors."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from barber.calib import load_calibration, sample_windows
from barber.errors import DataError


def encode(text: str) -> list[int]:
    """A toy tokenizer: one id per character (ids < 256)."""
    return [ord(c) % 256 for c in text]


TEXT = "".join(chr(97 + (i * 7) % 26) for i in range(5000))


def test_plain_text_windows_are_reproducible_and_in_text(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    a = load_calibration(path, encode, nsamples=8, seqlen=64, seed=0, vocab_size=256)
    b = load_calibration(path, encode, nsamples=8, seqlen=64, seed=0, vocab_size=256)
    c = load_calibration(path, encode, nsamples=8, seqlen=64, seed=1, vocab_size=256)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    ids = encode(TEXT)
    for row in a.tolist():
        starts = [i for i in range(len(ids) - 63) if ids[i : i + 64] == row]
        assert starts, "every window is a contiguous slice of the text"


def test_gzip_and_jsonl_documents(tmp_path):
    docs = [{"text": "short"}, {"text": TEXT[:300]}, {"text": TEXT[1000:1400]}]
    path = tmp_path / "c4.json.gz"
    path.write_bytes(gzip.compress("\n".join(json.dumps(d) for d in docs).encode()))
    ids = load_calibration(path, encode, nsamples=5, seqlen=100, seed=3, vocab_size=256)
    assert ids.shape == (5, 100)
    sources = [encode(d["text"]) for d in docs[1:]]
    for row in ids.tolist():
        assert any(any(s[i : i + 100] == row for i in range(len(s) - 99)) for s in sources)


def test_sampling_matches_reference_rule():
    """The reference pruners: random.seed(seed); doc = randint(0, D-1) until long enough;
    start = randint(0, L-seqlen-1)."""
    import random

    docs = [TEXT[:50], TEXT[:500], TEXT[100:900]]
    ids = sample_windows(docs, encode, 4, 40, seed=7)
    rng = random.Random(7)
    expected = []
    for _ in range(4):
        while True:
            doc = encode(docs[rng.randint(0, len(docs) - 1)])
            if len(doc) > 40:
                break
        start = rng.randint(0, len(doc) - 40 - 1)
        expected.append(doc[start : start + 40])
    assert ids.tolist() == expected


@pytest.mark.parametrize("suffix", [".safetensors", ".npy", ".pt"])
def test_token_id_files_used_exactly(tmp_path, suffix):
    ids = torch.randint(0, 200, (3, 17))
    path = tmp_path / f"ids{suffix}"
    if suffix == ".safetensors":
        save_file({"input_ids": ids.to(torch.int32)}, str(path))
    elif suffix == ".npy":
        np.save(path, ids.numpy())
    else:
        torch.save(ids, path)
    got = load_calibration(path, encode, nsamples=128, seqlen=2048, seed=0, vocab_size=256)
    assert torch.equal(got, ids)


@pytest.mark.parametrize(
    "content, message",
    [
        ("abc", "too short"),
        ('{"txt": 1}\n', "string field 'text'"),
        ("{not json\n", "invalid JSON"),
    ],
)
def test_bad_text_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / ("c.jsonl" if content.startswith("{") else "c.txt")
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_calibration(path, encode, nsamples=2, seqlen=10, seed=0, vocab_size=256)


def test_bad_token_ids_are_clear_errors(tmp_path):
    path = tmp_path / "f.pt"
    torch.save(torch.rand(2, 5), path)
    with pytest.raises(DataError, match="integer token ids"):
        load_calibration(path, encode, nsamples=2, seqlen=5, seed=0, vocab_size=256)
    torch.save(torch.tensor([[1, 2, 300]]), path)
    with pytest.raises(DataError, match="outside the vocabulary"):
        load_calibration(path, encode, nsamples=2, seqlen=5, seed=0, vocab_size=256)
    (tmp_path / "g.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read token ids"):
        load_calibration(tmp_path / "g.npy", encode, nsamples=2, seqlen=5, seed=0, vocab_size=256)
    with pytest.raises(DataError, match="not found"):
        load_calibration(tmp_path / "missing.txt", encode, nsamples=2, seqlen=5, seed=0, vocab_size=256)
