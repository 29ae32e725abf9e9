"""Calibration data: reproducible windows of token ids for the pruner.

Sources (`load_calibration`):
- plain text (`.txt` or anything not recognised below), optionally gzip-compressed: the
  whole text is tokenized as one document;
- JSON lines with a `text` field (the form C4 shards come in, `.jsonl`/`.json`, optionally
  `.gz`): each line is one document;
- ready token ids: a `.safetensors` file holding one integer tensor, a `.npy` or a `.pt`
  file, shaped [nsamples, seqlen]; used exactly as given.

Window sampling follows the reference pruners (Wanda/SparseGPT/LLM-Barber `get_c4`) with
Python's `random.Random(seed)`: for each sample, draw documents until one has more than
`seqlen` tokens, then a start position `randint(0, len - seqlen - 1)`. For a single
document this is one `randint` per sample.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from barber.errors import DataError

TOKEN_ID_SUFFIXES = (".safetensors", ".npy", ".pt")


def _open_text(path: Path) -> str:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt gzip file ({exc})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _is_jsonl(path: Path) -> bool:
    suffixes = [s.lower() for s in path.suffixes]
    return ".jsonl" in suffixes or ".json" in suffixes


def read_documents(path: Path) -> list[str]:
    """The documents of a calibration text file: one for plain text, one per JSON line."""
    if not path.is_file():
        raise DataError(f"calibration file not found: {path}")
    text = _open_text(path)
    if not _is_jsonl(path):
        return [text]
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{lineno}: expected an object with a string field 'text'")
        docs.append(record["text"])
    return docs


def load_token_ids(path: Path) -> torch.Tensor:
    """Ready-made calibration windows: one integer tensor [nsamples, seqlen] from a file."""
    if not path.is_file():
        raise DataError(f"calibration file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if len(tensors) != 1:
                raise DataError(f"{path}: expected exactly one tensor, found {len(tensors)}")
            ids = next(iter(tensors.values()))
        elif suffix == ".npy":
            import numpy as np

            ids = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            ids = torch.load(path, map_location="cpu", weights_only=True)
    except DataError:
        raise
    except Exception as exc:  # any parse failure of a user file is a user error
        raise DataError(f"{path}: cannot read token ids ({type(exc).__name__}: {exc})") from None
    if not isinstance(ids, torch.Tensor):
        raise DataError(f"{path}: expected a tensor, found {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise DataError(f"{path}: expected integer token ids, found {ids.dtype}")
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        raise DataError(f"{path}: expected token ids shaped [nsamples, seqlen], found {list(ids.shape)}")
    return ids.to(torch.long).contiguous()


def sample_windows(
    documents: Sequence[str], encode: Callable[[str], list[int]], nsamples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """Draw `nsamples` windows of `seqlen` tokens, reproducibly from `seed`.

    Documents are tokenized only when drawn (a C4 shard has hundreds of thousands).

    Args:
        documents: the texts.
        encode: text -> token ids.
        nsamples: number of windows.
        seqlen: tokens per window.
        seed: seed of the Python `random.Random` that picks documents and offsets.

    Returns:
        Token ids [nsamples, seqlen] (int64).
    """
    if not documents:
        raise DataError("calibration data holds no documents")
    rng = random.Random(seed)
    tokenized: dict[int, list[int]] = {}
    usable = set()
    windows = []
    for _ in range(nsamples):
        while True:
            index = rng.randint(0, len(documents) - 1)
            if index not in tokenized:
                tokenized[index] = encode(documents[index])
                if len(tokenized[index]) > seqlen:
                    usable.add(index)
            if index in usable:
                break
            if len(tokenized) == len(documents) and not usable:
                longest = max(len(t) for t in tokenized.values())
                raise DataError(
                    f"calibration text too short: need a document of more than {seqlen} tokens, "
                    f"the longest has {longest}"
                )
        doc = tokenized[index]
        start = rng.randint(0, len(doc) - seqlen - 1)
        windows.append(doc[start : start + seqlen])
    return torch.tensor(windows, dtype=torch.long)


def load_calibration(
    path: Path, encode: Callable[[str], list[int]], *, nsamples: int, seqlen: int, seed: int, vocab_size: int
) -> torch.Tensor:
    """Calibration windows [nsamples, seqlen] from a text, JSON-lines or token-id file.

    Token-id files are used exactly as given (their shape overrides nsamples/seqlen).
    Ids outside [0, vocab_size) are an error.
    """
    path = Path(path)
    if path.suffix.lower() in TOKEN_ID_SUFFIXES:
        ids = load_token_ids(path)
    else:
        if nsamples < 1 or seqlen < 2:
            raise DataError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
        ids = sample_windows(read_documents(path), encode, nsamples, seqlen, seed)
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        raise DataError(f"{path}: token id {int(ids[bad][0])} is outside the vocabulary [0, {vocab_size})")
    return ids
