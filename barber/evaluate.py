"""Streaming perplexity: every window's hidden state advances one block at a time.

Protocol (docs/algorithm.md §7): the token stream is cut into non-overlapping windows of
`seqlen` tokens (the tail remainder is dropped); each window is scored on its own (batch-1 semantics:
windows never attend to each other); the loss of a window is the mean cross-entropy over its seqlen-1
shifted targets; perplexity is exp of the mean of the window losses. No BOS token is prepended unless
asked (`bos=True` puts one BOS at the start of the whole stream, as a tokenizer that adds BOS would).

Memory: only one block's weights plus the hidden states [n_windows, seqlen, d] are resident, whatever
the depth. `advance_hidden` (one block over all windows, in chunks) serves `perplexity`; the pruner has its own
schedule (`barber.pipeline`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from barber.checkpoint import Checkpoint
from barber.errors import DataError
from barber.model import Arch, Positions, Weights

log = logging.getLogger(__name__)

#: Positions per call of the output head in `perplexity` (bounds the [tokens, vocab] logits).
LOGIT_CHUNK = 128


@dataclass(frozen=True)
class PerplexityResult:
    """Outcome of `perplexity`.

    Attributes:
        ppl: exp(nll).
        nll: mean over windows of the mean per-token cross-entropy (nats).
        n_windows: windows scored.
        tokens: predicted tokens, n_windows * (seqlen - 1).
        settings: how it was computed (checkpoint, seqlen, dtype, device, bos, ...), JSON-serialisable.
    """

    ppl: float
    nll: float
    n_windows: int
    tokens: int
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def make_windows(
    token_ids: Sequence[int] | torch.Tensor, seqlen: int, max_windows: int | None = None, bos_id: int | None = None
) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen] (int64) of the stream, tail dropped, optionally after one BOS.

    Raises:
        DataError: seqlen < 2, or a stream shorter than one window.
    """
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2, got {seqlen}")
    ids = torch.as_tensor(token_ids, dtype=torch.int64).flatten()
    if bos_id is not None:
        ids = torch.cat([torch.tensor([bos_id], dtype=torch.int64), ids])
    n = ids.numel() // seqlen
    if max_windows is not None:
        if max_windows < 1:
            raise DataError(f"max_windows must be at least 1, got {max_windows}")
        n = min(n, max_windows)
    if n == 0:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def advance_hidden(
    arch: Arch,
    hidden: torch.Tensor,
    weights: Weights,
    pos: Positions,
    *,
    chunk_size: int = 1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run one block over all windows, `chunk_size` windows at a time (bounds activation memory).

    Args:
        arch: the model math.
        hidden: [n, T, d] block inputs, on the weights' device and dtype.
        weights: the block's weights (block-local names).
        pos: `arch.positions(T, layer=i)` of this block, on the same device.
        chunk_size: windows per forward call.
        out: where to write [n, T, d]; default `hidden` itself (in place, chunk by chunk; safe because
            windows are independent).

    Returns:
        `out` (or `hidden`), now holding the block outputs.
    """
    out = hidden if out is None else out
    for s in range(0, hidden.shape[0], chunk_size):
        out[s : s + chunk_size] = arch.block_forward(hidden[s : s + chunk_size], weights, pos)
    return out


@torch.no_grad()
def _window_losses(arch: Arch, hidden: torch.Tensor, windows: torch.Tensor, fw, device: torch.device) -> torch.Tensor:
    """Each window's mean cross-entropy of its shifted targets, from the last block's hidden states [n]."""
    seqlen, losses = windows.shape[1], []
    for w in range(windows.shape[0]):
        targets = windows[w, 1:].to(device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        # The head runs on LOGIT_CHUNK positions at a time: logits of a whole window ([T, vocab] in
        # float32, 100 MB for 512 tokens of a 49k vocabulary) would dominate the evaluation's memory.
        for t in range(0, seqlen - 1, LOGIT_CHUNK):
            logits = arch.final_logits(hidden[w : w + 1, t : min(t + LOGIT_CHUNK, seqlen - 1)], fw)[0]
            # Rows of [tokens, vocab], as transformers computes it: on this layout torch's CPU log-softmax
            # is accurate, while the [B, vocab, T] layout was measured 1e-4 off for a 49k vocabulary.
            ce = F.cross_entropy(logits.float(), targets[t : t + logits.shape[0]], reduction="none")
            total += ce.double().sum()
        losses.append((total / (seqlen - 1)).cpu().reshape(1))
    return torch.cat(losses)


def perplexity(
    ckpt: Checkpoint,
    token_ids: Sequence[int] | torch.Tensor,
    *,
    seqlen: int = 2048,
    max_windows: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 1,
    bos_id: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `ckpt` on a token stream, streaming the checkpoint block by block (long: its arguments).

    Args:
        ckpt: an opened checkpoint.
        token_ids: the tokenized evaluation text.
        seqlen: window length.
        max_windows: score at most this many windows (the first ones).
        device / dtype: where and in which precision weights and hidden states live.
        batch_size: windows per forward call (a speed/memory knob; results are per window regardless).
        bos_id: prepend this BOS id once at the start of the stream; None = no BOS.
        progress: show a tqdm bar over blocks.
    """
    device = torch.device(device)
    started = time.perf_counter()
    windows = make_windows(token_ids, seqlen, max_windows, bos_id)
    n = windows.shape[0]
    arch = Arch.from_checkpoint(ckpt)
    cfg = ckpt.config
    if seqlen > cfg.max_position_embeddings and ckpt.family.positions == "learned":
        raise DataError(f"seqlen {seqlen} exceeds the model's {cfg.max_position_embeddings} learned positions")
    if seqlen > cfg.max_position_embeddings:
        log.warning("seqlen %d is longer than the model's context (%d)", seqlen, cfg.max_position_embeddings)
    if int(windows.max()) >= cfg.vocab_size:
        raise DataError(f"token id {int(windows.max())} is outside the model's vocabulary of {cfg.vocab_size}")

    ew = ckpt.embedding_weights(dtype, device)
    hidden = torch.empty(n, seqlen, cfg.hidden_size, dtype=dtype, device=device)
    for s in range(0, n, batch_size):
        hidden[s : s + batch_size] = arch.embed(windows[s : s + batch_size].to(device), ew)
    del ew

    bar = tqdm(range(ckpt.num_layers), desc="blocks", unit="block", disable=not progress, leave=False)
    for i in bar:
        w = ckpt.block_weights(i, dtype, device)
        pos = arch.positions(seqlen, device, layer=i)  # per block: Gemma's blocks alternate sliding and full
        advance_hidden(arch, hidden, w, pos, chunk_size=batch_size)
        del w
    bar.close()

    fw = ckpt.final_weights(dtype, device)
    losses = _window_losses(arch, hidden, windows, fw, device)
    del fw, hidden
    nll = float(losses.mean())
    settings = {
        "checkpoint": str(ckpt.path),
        "family": ckpt.family.name,
        "seqlen": seqlen,
        "max_windows": max_windows,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "bos": bos_id is not None,
        "stream_tokens": int(torch.as_tensor(token_ids).numel()),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return PerplexityResult(math.exp(nll), nll, n, n * (seqlen - 1), settings)
