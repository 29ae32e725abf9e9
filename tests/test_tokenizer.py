"""Tokenizers: tokenizer.json via `tokenizers`, tokenizer.model via sentencepiece, clear errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from helpers_models import write_byte_tokenizer

from barber.errors import BarberError, CheckpointError
from barber.tokenizer import load_tokenizer


def real_asset(getter_name: str):
    """A fetched asset's path; skip when missing, except under CI (env CI set), where it fails."""
    from barber import assets

    try:
        return getattr(assets, getter_name)()
    except BarberError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"asset missing under CI: {exc}")
        pytest.skip(f"asset missing: {exc}")


def test_byte_tokenizer_json(tmp_path):
    write_byte_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 7, "eos_token_id": [9, 10]}))
    tok = load_tokenizer(tmp_path)
    text = "héllo, wörld\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert (tok.bos_id, tok.eos_id, tok.vocab_size, tok.kind) == (7, 9, 256, "tokenizers")
    assert load_tokenizer(tmp_path / "tokenizer.json").encode(text) == ids


def test_sentencepiece_fixture(tmp_path):
    model = real_asset("sp_test_model_path")
    import sentencepiece as spm

    reference = spm.SentencePieceProcessor(model_file=str(model))
    for target in (model, tmp_path):
        if target == tmp_path:
            shutil.copy(model, tmp_path / "tokenizer.model")
        tok = load_tokenizer(target)
        assert tok.kind == "sentencepiece" and tok.vocab_size == 1000
        assert (tok.bos_id, tok.eos_id) == (reference.bos_id(), reference.eos_id())
        text = "I am a cat. As yet I have no name."
        assert tok.encode(text) == reference.encode(text)
        assert tok.bos_id not in tok.encode(text)
        assert tok.decode(tok.encode(text)) == text


def test_json_preferred_over_model(tmp_path):
    write_byte_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    assert load_tokenizer(tmp_path).kind == "tokenizers"


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("tokenizer.json", b"{ not json", "unreadable tokenizer"),
        ("tokenizer.json", b'{"model": 3}', "unreadable tokenizer"),
        ("tokenizer.model", b"\x00garbage", "unreadable sentencepiece model"),
    ],
)
def test_unreadable_tokenizers(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as info:
        load_tokenizer(tmp_path)
    assert "\n" not in str(info.value)


def test_missing_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="no such tokenizer file"):
        load_tokenizer(tmp_path / "tokenizer.json")


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers():
    ckpt = real_asset("smollm2_dir")
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(ckpt)
    ref = transformers.AutoTokenizer.from_pretrained(str(ckpt))
    text = real_asset("wiki_text_path").read_text(encoding="utf-8")[:20000]
    assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"]
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 49152)


@pytest.mark.slow
def test_encode_prefix_equals_the_start_of_the_whole_encoding():
    from barber.tokenizer import load_tokenizer

    tok = load_tokenizer(real_asset("smollm2_dir"))
    text = real_asset("wiki_text_path").read_text(encoding="utf-8")[:400_000]
    whole = tok.encode(text)
    for n in (1, 500, 2048, 20_000):
        assert tok.encode_prefix(text, n) == whole[:n]
    assert tok.encode_prefix(text, None) == whole
    assert tok.encode_prefix(text, 10 * len(whole)) == whole
