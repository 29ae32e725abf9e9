"""Zero-shot last-word accuracy (LAMBADA-style) on held-out text, streaming the checkpoint block by block.

Items (`last_word_items`): each paragraph of the text (blank-line separated, headings ``= ... =`` and
paragraphs under `MIN_WORDS` words skipped) whose last word is alphabetic gives one item: the context
is the paragraph up to that word (at most `max_context` tokens, its end kept), the target is the
word with its leading space, tokenized on its own as lm-evaluation-harness does for LAMBADA. An item
is correct when the model's greedy prediction reproduces every target token: teacher-forced argmax
at each target position equals the target (which is what greedy decoding would produce). The text
ships with barber's assets (Wikipedia), so nothing is downloaded.

Sequences are right-padded to one length: causal attention never lets a position see the padding
after it, so each item's logits are those of the item alone.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from barber.checkpoint import Checkpoint
from barber.errors import DataError
from barber.evaluate import advance_hidden
from barber.model import Arch

__all__ = ["LastWordResult", "MIN_WORDS", "last_word_accuracy", "last_word_items", "last_word_predictions"]

#: Paragraphs shorter than this many words give no item.
MIN_WORDS = 20
_LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]+)[.!?]?[\"')\]]*$", re.DOTALL)


@dataclass(frozen=True)
class LastWordResult:
    """Outcome of `last_word_accuracy`: the fraction of items whose last word the model predicts exactly."""

    accuracy: float
    correct: int
    items: int
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def last_word_items(
    text: str, encode: Callable[[str], list[int]], n: int, max_context: int = 256
) -> list[tuple[list[int], list[int]]]:
    """The first `n` (context ids, target ids) items of `text` (module doc); DataError when there are none."""
    items = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        if paragraph.startswith("=") or len(paragraph.split()) < MIN_WORDS:
            continue
        match = _LAST_WORD.match(paragraph)
        if match is None:
            continue
        context, target = encode(match.group(1)), encode(" " + match.group(2))
        if not context or not target:
            continue
        items.append((context[-max_context:], target))
        if len(items) == n:
            break
    if not items:
        raise DataError(f"the text has no paragraph of at least {MIN_WORDS} words ending in a word")
    return items


@torch.no_grad()
def last_word_predictions(
    ckpt: Checkpoint, items: list[tuple[list[int], list[int]]], *, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32, batch_size: int = 8, progress: bool = False,
) -> list[list[int]]:
    """For each item, the model's argmax token at every target position (teacher-forced)."""
    device = torch.device(device)
    arch = Arch.from_checkpoint(ckpt)
    seqs = [ctx + tgt[:-1] for ctx, tgt in items]
    length = max(len(s) for s in seqs)
    if int(max(max(s) for s in seqs)) >= ckpt.config.vocab_size:
        raise DataError(f"a token id is outside the model's vocabulary of {ckpt.config.vocab_size}")
    ids = torch.zeros(len(seqs), length, dtype=torch.int64)
    for k, s in enumerate(seqs):
        ids[k, : len(s)] = torch.tensor(s)
    ew = ckpt.embedding_weights(dtype, device)
    hidden = torch.empty(len(seqs), length, ckpt.config.hidden_size, dtype=dtype, device=device)
    for s in range(0, len(seqs), batch_size):
        hidden[s : s + batch_size] = arch.embed(ids[s : s + batch_size].to(device), ew)
    del ew
    pos = arch.positions(length, device)
    for i in tqdm(range(ckpt.num_layers), desc="blocks", unit="block", disable=not progress, leave=False):
        advance_hidden(arch, hidden, ckpt.block_weights(i, dtype, device), pos, chunk_size=batch_size)
    fw = ckpt.final_weights(dtype, device)
    out = []
    for k, (ctx, tgt) in enumerate(items):
        at = hidden[k : k + 1, len(ctx) - 1 : len(ctx) - 1 + len(tgt)]
        out.append(arch.final_logits(at, fw)[0].float().argmax(-1).tolist())
    return out


def last_word_accuracy(
    ckpt: Checkpoint, items: list[tuple[list[int], list[int]]], *, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32, batch_size: int = 8, progress: bool = False,
) -> LastWordResult:
    """The fraction of `items` (from `last_word_items`) whose target the model predicts exactly."""
    started = time.perf_counter()
    predictions = last_word_predictions(ckpt, items, device=device, dtype=dtype, batch_size=batch_size,
                                        progress=progress)
    correct = sum(p == tgt for p, (_, tgt) in zip(predictions, items))
    settings = {"checkpoint": str(ckpt.path), "items": len(items), "device": str(device),
                "dtype": str(dtype).removeprefix("torch."), "seconds": round(time.perf_counter() - started, 3)}
    return LastWordResult(correct / len(items), correct, len(items), settings)
