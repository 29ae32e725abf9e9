"""Tokenizers for checkpoints: `tokenizer.json` via the `tokenizers` library, `tokenizer.model` via sentencepiece.

`load_tokenizer(path)` takes a checkpoint directory (tokenizer.json is preferred over tokenizer.model)
or one of those files directly. `encode` never adds special tokens: callers decide about BOS.
"""

from __future__ import annotations

import json
from pathlib import Path

from barber.config import token_id
from barber.errors import CheckpointError

#: Ids encoded beyond what `Tokenizer.encode_prefix` returns, so the cut never affects them.
PREFIX_MARGIN = 256


class Tokenizer:
    """A loaded tokenizer.

    Attributes:
        path: the file it was loaded from.
        kind: "tokenizers" or "sentencepiece".
        bos_id / eos_id: special token ids, or None when the tokenizer has none.
        vocab_size: number of ids the tokenizer can produce (special tokens included).
    """

    def __init__(self, path: Path, kind: str, impl, bos_id: int | None, eos_id: int | None, vocab_size: int):
        self.path = path
        self.kind = kind
        self._impl = impl
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any special token."""
        if self.kind == "sentencepiece":
            return list(self._impl.encode(text))
        return self._impl.encode(text, add_special_tokens=False).ids

    def encode_prefix(self, text: str, n_tokens: int | None) -> list[int]:
        """The first `n_tokens` ids of `encode(text)` (all of them for None), without encoding all of it.

        Tokenizing a whole multi-MB text costs hundreds of MB; an evaluation of a few windows needs
        only its start. Prefixes of growing length are encoded until one yields `PREFIX_MARGIN` ids
        more than needed: tokenization is local (pre-tokens never span far), so ids that far before
        the cut are the same as in the whole text's encoding.
        """
        if n_tokens is None:
            return self.encode(text)
        chars = max(1024, 8 * n_tokens)
        while True:
            ids = self.encode(text[:chars])
            if chars >= len(text) or len(ids) >= n_tokens + PREFIX_MARGIN:
                return ids[:n_tokens]
            chars *= 2

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` (for messages and debugging)."""
        return self._impl.decode(list(ids))

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, {self.kind}, vocab={self.vocab_size})"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of a checkpoint directory, or a tokenizer.json / *.model file.

    Raises:
        CheckpointError: no tokenizer file, or one that cannot be read.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return _load_file(path / name, path)
        raise CheckpointError(f"{path}: no tokenizer.json or tokenizer.model")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such tokenizer file")
    return _load_file(path, path.parent)


def _load_file(path: Path, ckpt_dir: Path) -> Tokenizer:
    if path.suffix == ".json":
        return _load_hf(path, ckpt_dir)
    return _load_sentencepiece(path)


def _load_hf(path: Path, ckpt_dir: Path) -> Tokenizer:
    """tokenizer.json; BOS/EOS come from config.json, then tokenizer_config.json, then common token names.

    config.json is read as a plain dict, not as a `ModelConfig`: a tokenizer directory need not hold
    a whole model config.
    """
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as exc:  # the Rust library raises a bare Exception for every parse error
        raise CheckpointError(f"{path}: unreadable tokenizer ({_first_line(exc)})") from None
    bos, eos = _special_ids(tok, ckpt_dir)
    return Tokenizer(path, "tokenizers", tok, bos, eos, tok.get_vocab_size(with_added_tokens=True))


def _load_sentencepiece(path: Path) -> Tokenizer:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: unreadable sentencepiece model ({_first_line(exc)})") from None
    bos, eos = sp.bos_id(), sp.eos_id()
    return Tokenizer(path, "sentencepiece", sp, bos if bos >= 0 else None, eos if eos >= 0 else None,
                     sp.get_piece_size())


def _special_ids(tok, ckpt_dir: Path) -> tuple[int | None, int | None]:
    ids: dict[str, int | None] = {"bos": None, "eos": None}
    config = _read_json(ckpt_dir / "config.json")
    for key in ids:
        ids[key] = token_id(config, f"{key}_token_id")
    tok_config = _read_json(ckpt_dir / "tokenizer_config.json")
    defaults = {
        "bos": ("<s>", "<|endoftext|>", "<|begin_of_text|>"),
        "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>"),
    }
    for key in ids:
        if ids[key] is not None:
            continue
        token = tok_config.get(f"{key}_token")
        if isinstance(token, dict):
            token = token.get("content")
        for candidate in ((token,) if isinstance(token, str) else ()) + defaults[key]:
            found = tok.token_to_id(candidate)
            if found is not None:
                ids[key] = found
                break
    return ids["bos"], ids["eos"]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
