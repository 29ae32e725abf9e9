"""Zero-shot last-word accuracy: the items, parity with transformers, barber-eval --last-word."""

from __future__ import annotations

import json

import pytest
import torch
from helpers_models import make_tiny_checkpoint

from barber import load_pruned
from barber.checkpoint import Checkpoint
from barber.cli import eval_main
from barber.tokenizer import load_tokenizer
from barber.zeroshot import MIN_WORDS, last_word_accuracy, last_word_items, last_word_predictions

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the river ran past an old mill where children played until evening came and lamps were lit".split()


def paragraph(k: int, last: str) -> str:
    words = [WORDS[(k + j) % len(WORDS)] for j in range(MIN_WORDS + k)]
    return " ".join(words) + f" {last}."


TEXT = "\n\n".join(["= Heading =", "too short to count.", paragraph(0, "harbour"), paragraph(3, "lantern"),
                    paragraph(5, "x1"), paragraph(7, "meadow"), paragraph(2, "orchard")])


def byte_encode(text: str) -> list[int]:
    return list(text.encode())


def test_items_are_paragraph_endings():
    items = last_word_items(TEXT, byte_encode, n=10, max_context=40)
    assert [bytes(t).decode() for _, t in items] == [" harbour", " lantern", " meadow", " orchard"]
    assert all(len(ctx) == 40 for ctx, _ in items)
    assert bytes(items[0][0]).decode() == paragraph(0, "harbour")[: -len(" harbour.")][-40:]  # up to the word
    assert len(last_word_items(TEXT, byte_encode, n=2)) == 2


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_predictions_match_transformers(tmp_path, family):
    src = make_tiny_checkpoint(tmp_path, family)
    items = last_word_items(TEXT, byte_encode, n=10, max_context=60)
    ours = last_word_predictions(Checkpoint.open(src), items, batch_size=3)
    model = load_pruned(src)
    with torch.no_grad():
        for (ctx, tgt), pred in zip(items, ours):
            logits = model(torch.tensor([ctx + tgt[:-1]])).logits[0, len(ctx) - 1 :]
            assert logits.argmax(-1).tolist() == pred
    result = last_word_accuracy(Checkpoint.open(src), items)
    assert result.items == 4 and result.correct == sum(p == t for p, (_, t) in zip(ours, items))


def test_eval_reports_last_word_accuracy_next_to_perplexity(tmp_path, capsys):
    src = make_tiny_checkpoint(tmp_path, "qwen2")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    assert load_tokenizer(src).encode("ab") == [97, 98]
    out = tmp_path / "eval.json"
    code = eval_main(["--ckpt", str(src), "--text", str(text), "--seqlen", "64", "--last-word", "3", "--json",
                      str(out), "--no-progress"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and lines[0].startswith("perplexity ") and lines[1].startswith("last-word accuracy ")
    assert json.loads(out.read_text())["last_word"]["items"] == 3


def test_a_text_without_items_is_a_data_error(tmp_path, capsys):
    src = make_tiny_checkpoint(tmp_path, "llama")
    text = tmp_path / "text.txt"
    text.write_text("a short line.\n\n" * 200)
    code = eval_main(["--ckpt", str(src), "--text", str(text), "--seqlen", "64", "--last-word", "3", "--no-progress"])
    assert code == 4 and "no paragraph" in capsys.readouterr().err
