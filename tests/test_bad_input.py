"""Bad input to barber-stream: one-line errors, documented exit codes, no traceback, input untouched.

Every case runs `stream_main([...])` in-process. Exit codes (see `barber-stream --help`): 2 usage,
3 checkpoint, 4 calibration data, 5 output not writable. Also: a full disk (simulated) leaves a
resumable, visibly unfinished output, and the safetensors header parser is fuzzed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from helpers_models import make_tiny_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import barber.writer
from barber.checkpoint import Checkpoint
from barber.cli import stream_main
from barber.errors import CheckpointError
from barber.layout import REPORT_MD
from barber.output import REPORT_FILE, STATE_FILE, WORK_DIR
from barber.safetensors_format import MAX_HEADER_BYTES, read_safetensors_header
from barber.state import load_state

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    ckpt = make_tiny_checkpoint(root, "llama", layers=2, shards=2)
    ids = root / "ids.pt"
    torch.save(torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0)), ids)
    short = root / "short.txt"
    short.write_text("far too short for a window")
    binary = root / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81 not text")
    return {"root": root, "ckpt": ckpt, "ids": ids, "short": short, "binary": binary}


def snapshot(path: Path) -> dict[str, str]:
    """Every file and directory under `path` with its sha256 (directories: '-')."""
    if not path.exists():
        return {}
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "-"
        for p in sorted(path.rglob("*"))
    }


def stream(capsys, args: list[str]) -> tuple[int, str]:
    rc = stream_main(args)
    return rc, capsys.readouterr().err


def assert_one_line_error(rc: int, err: str, code: int, message: str) -> None:
    assert rc == code, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert message in err, err


def base_args(ckpt: Path, out: Path, ids: Path) -> list[str]:
    return ["--ckpt", str(ckpt), "--out", str(out), "--calib", str(ids), "--no-progress"]


# ---- the checkpoint ------------------------------------------------------------------------------


def _edit_config(root: Path, **changes) -> None:
    cfg = json.loads((root / "config.json").read_text())
    cfg.update(changes)
    (root / "config.json").write_text(json.dumps(cfg))


def _edit_shard(root: Path, shard: str, edit) -> None:
    tensors = load_file(root / shard)
    edit(tensors)
    save_file(tensors, str(root / shard), metadata={"format": "pt"})


def _corrupt(kind: str, root: Path) -> Path:
    """Damage a copy of the checkpoint; returns the --ckpt to pass."""
    shard = root / SHARD1
    if kind == "nonexistent directory":
        shutil.rmtree(root)
    elif kind == "empty directory":
        shutil.rmtree(root)
        root.mkdir()
    elif kind == "a file, not a directory":
        return shard
    elif kind == "no config.json":
        (root / "config.json").unlink()
    elif kind == "config.json not JSON":
        (root / "config.json").write_text("{not json")
    elif kind == "missing shard":
        (root / SHARD2).unlink()
    elif kind == "truncated shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif kind == "garbage header":
        data = bytearray(shard.read_bytes())
        data[8:20] = b"#garbage!#!!"
        shard.write_bytes(bytes(data))
    elif kind == "oversized header length":
        shard.write_bytes((2**62).to_bytes(8, "little") + shard.read_bytes()[8:])
    elif kind == "header length past the end":
        shard.write_bytes((10**6).to_bytes(8, "little") + shard.read_bytes()[8:])
    elif kind == "tensor missing":
        _edit_config(root, num_hidden_layers=3)
    elif kind == "shape disagrees with config.json":
        _edit_config(root, intermediate_size=128)
    elif kind == "dtype not a float":
        def to_int(t):
            name = next(n for n in sorted(t) if n.endswith("q_proj.weight"))
            t[name] = t[name].to(torch.int32)

        for s in (SHARD1, SHARD2):
            if any(n.endswith("q_proj.weight") for n in load_file(root / s)):
                _edit_shard(root, s, to_int)
                break
    elif kind == "unsupported model_type":
        _edit_config(root, model_type="bloom")
    elif kind == "index names a path outside":
        index = json.loads((root / "model.safetensors.index.json").read_text())
        index["weight_map"] = {k: "../" + v for k, v in index["weight_map"].items()}
        (root / "model.safetensors.index.json").write_text(json.dumps(index))
    elif kind == "unreadable tokenizer":
        (root / "tokenizer.json").write_text('{"model": 42')
    elif kind == "no tokenizer":
        (root / "tokenizer.json").unlink()
    else:
        raise AssertionError(kind)
    return root


CHECKPOINT_CASES = {
    "nonexistent directory": "no such checkpoint directory",
    "empty directory": "empty checkpoint directory",
    "a file, not a directory": "not a directory",
    "no config.json": "no config.json",
    "config.json not JSON": "not valid JSON",
    "missing shard": f"missing shard {SHARD2}",
    "truncated shard": "truncated safetensors file",
    "garbage header": "corrupt safetensors header",
    "oversized header length": "corrupt safetensors header (claims",
    "header length past the end": "truncated safetensors file (header of 1000000 bytes",
    "tensor missing": "'model.layers.2.self_attn.q_proj.weight' is missing",
    "shape disagrees with config.json": "has shape [96, 64] but config.json implies [128, 64]",
    "dtype not a float": "q_proj.weight' has non-float dtype torch.int32",
    "unsupported model_type": "unsupported model_type 'bloom'",
    "index names a path outside": "invalid shard name",
    "unreadable tokenizer": "unreadable tokenizer",
    "no tokenizer": "no tokenizer.json or tokenizer.model",
}


@pytest.mark.parametrize("kind", list(CHECKPOINT_CASES))
def test_bad_checkpoint(assets, capsys, tmp_path, kind):
    root = Path(shutil.copytree(assets["ckpt"], tmp_path / "ckpt"))
    ckpt = _corrupt(kind, root)
    before = snapshot(root)
    out = tmp_path / "out"
    rc, err = stream(capsys, base_args(ckpt, out, assets["ids"]))
    assert_one_line_error(rc, err, 3, CHECKPOINT_CASES[kind])
    assert snapshot(root) == before, "the input must be untouched"
    assert not out.exists(), "nothing is created before the input is validated"


# ---- options and calibration data ----------------------------------------------------------------


OPTION_CASES = [
    (["--sparsity", "-0.1"], 2, "--sparsity must be in [0, 1), got -0.1"),
    (["--sparsity", "1"], 2, "--sparsity must be in [0, 1), got 1.0"),
    (["--sparsity", "1.5"], 2, "--sparsity must be in [0, 1)"),
    (["--sparsity", "nan"], 2, "--sparsity must be in [0, 1), got nan"),
    (["--sparsity", "half"], 2, "argument --sparsity: invalid float value: 'half'"),
    (["--pattern", "2:x"], 2, "--pattern: pattern must be 'unstructured' or N:M"),
    (["--pattern", "2-4"], 2, "--pattern: pattern must be 'unstructured' or N:M"),
    (["--pattern", "2:4:8"], 2, "--pattern: pattern must be 'unstructured' or N:M"),
    (["--pattern", "5:4"], 2, "--pattern: pattern N:M needs 0 < N < M"),
    (["--pattern", "0:4"], 2, "--pattern: pattern N:M needs 0 < N < M"),
    (["--pattern", "2:5"], 2, "--pattern 2:5: self_attn.q_proj.weight has 64 input columns, not divisible by 5"),
    (["--pattern", "1:3"], 2, "has 64 input columns, not divisible by 3"),
    (["--pattern", "2:4", "--sparsity", "0.6"], 2, "--sparsity 0.6 contradicts --pattern 2:4"),
    (["--rebuild-ratio", "2"], 2, "--rebuild-ratio must be in [0, 1]"),
    (["--nsamples", "0"], 2, "--nsamples is too small: 0"),
    (["--state-interval", "-1"], 2, "--state-interval must be >= 0 seconds, got -1.0"),
    (["--init", "random"], 2, "argument --init: invalid choice: 'random'"),
    (["--calib", "{short}", "--seqlen", "64"], 4, "calibration text too short: need a document of more than 64 tokens"),
    (["--calib", "{missing}"], 4, "calibration file not found"),
    (["--calib", "{binary}", "--seqlen", "4"], 4, "not UTF-8 text"),
    (["--bogus"], 2, "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("extra, code, message", OPTION_CASES, ids=[" ".join(c[0]) for c in OPTION_CASES])
def test_bad_options_and_data(assets, capsys, tmp_path, extra, code, message):
    subst = {"{short}": str(assets["short"]), "{binary}": str(assets["binary"]),
             "{missing}": str(tmp_path / "nope.txt")}
    extra = [subst.get(a, a) for a in extra]
    before = snapshot(assets["ckpt"])
    out = tmp_path / "out"
    rc, err = stream(capsys, base_args(assets["ckpt"], out, assets["ids"]) + extra)
    assert_one_line_error(rc, err, code, message)
    assert snapshot(assets["ckpt"]) == before
    assert not out.exists()


def test_required_options(capsys):
    rc, err = stream(capsys, ["--out", "x"])
    assert_one_line_error(rc, err, 2, "--ckpt and --out are required")


# ---- the output directory ------------------------------------------------------------------------


def _finished(assets) -> Path:
    out = assets["root"] / "finished"
    if not (out / REPORT_FILE).exists():
        assert stream_main(base_args(assets["ckpt"], out, assets["ids"])) == 0
    return out


OUT_CASES = {
    "equal to --ckpt": ([], 2, "is the input checkpoint or inside it"),
    "inside --ckpt": ([], 2, "is the input checkpoint or inside it"),
    "containing --ckpt": ([], 2, "contains the input checkpoint"),
    "a file": ([], 2, "exists and is not a directory"),
    "non-empty": ([], 2, "is not empty (use --overwrite"),
    "non-empty, --overwrite": (["--overwrite"], 2, "holds no barber result; refusing to overwrite it"),
    "non-empty, --resume": (["--resume"], 2, "holds no interrupted run (it is not a barber output)"),
    "finished result": ([], 2, "already holds a finished barber result (use --overwrite to replace it)"),
}


@pytest.mark.parametrize("kind", list(OUT_CASES))
def test_bad_output_directory(assets, capsys, tmp_path, kind):
    ckpt = assets["ckpt"]
    if kind == "equal to --ckpt":
        out = ckpt
    elif kind == "inside --ckpt":
        out = ckpt / "pruned"
    elif kind == "containing --ckpt":
        ckpt = Path(shutil.copytree(ckpt, tmp_path / "models" / "llama"))
        out = tmp_path / "models"
    elif kind == "a file":
        out = tmp_path / "out.txt"
        out.write_text("mine")
    elif kind.startswith("non-empty"):
        out = tmp_path / "out"
        out.mkdir()
        (out / "notes.txt").write_text("precious")
    else:
        out = _finished(assets)
    before_in, before_out = snapshot(ckpt), snapshot(out)
    extra, code, message = OUT_CASES[kind]
    rc, err = stream(capsys, base_args(ckpt, out, assets["ids"]) + extra)
    assert_one_line_error(rc, err, code, message)
    assert snapshot(ckpt) == before_in and snapshot(out) == before_out
    assert not (ckpt / "pruned").exists()


def test_overwrite_replaces_a_finished_result(assets, capsys, tmp_path):
    out = Path(shutil.copytree(_finished(assets), tmp_path / "out"))
    (out / "stale.txt").write_text("left by an earlier run")
    rc, err = stream(capsys, base_args(assets["ckpt"], out, assets["ids"]) + ["--overwrite", "--sparsity", "0.25"])
    assert rc == 0, err
    assert not (out / "stale.txt").exists()
    assert json.loads((out / REPORT_FILE).read_text())["settings"]["sparsity"] == 0.25


# ---- a full disk ----------------------------------------------------------------------------------


def _disk_full_at(monkeypatch, name_part: str, nth: int = 1) -> None:
    """Make the writer fail with ENOSPC in the `nth` file whose temporary name contains `name_part`."""
    real = barber.writer._write_bytes
    seen: list = []

    def write(f, data) -> None:
        if name_part in os.path.basename(f.name):
            if f not in seen:
                seen.append(f)
            if len(seen) == nth:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(f, data)

    monkeypatch.setattr(barber.writer, "_write_bytes", write)


DISK_FULL = {
    "block file": (".block-00001", 1, 1),
    "state file": (".state.safetensors", 2, 1),
    "first state file": (".state.safetensors", 1, None),
    "side file": (".config.json", 1, 2),
    "output shard": (f".{SHARD2}", 1, 2),
    "report": (f".{REPORT_FILE}", 1, 2),
}


@pytest.mark.parametrize("where", list(DISK_FULL))
def test_disk_full_fails_cleanly_and_resumes(assets, capsys, tmp_path, monkeypatch, where):
    name_part, nth, saved_next = DISK_FULL[where]
    reference = snapshot(_finished(assets))
    for varying in (REPORT_FILE, REPORT_MD):  # times
        reference.pop(varying)
    before = snapshot(assets["ckpt"])
    out = tmp_path / "out"
    args = base_args(assets["ckpt"], out, assets["ids"])
    _disk_full_at(monkeypatch, name_part, nth)
    rc, err = stream(capsys, args)
    assert_one_line_error(rc, err, 5, "No space left on device")
    assert "run the same command again to resume" in err
    assert not (out / REPORT_FILE).exists(), "a failed run must never look complete"
    with pytest.raises(CheckpointError, match="unfinished barber-stream output"):
        Checkpoint.open(out)
    assert not [p for p in out.rglob(".*.tmp")], "temporary files are removed"
    state = out / WORK_DIR / STATE_FILE
    if saved_next is None:
        assert not state.exists()
    else:
        assert load_state(state).next_block == saved_next
    monkeypatch.undo()
    rc, err = stream(capsys, args)
    assert rc == 0, err
    after = snapshot(out)
    for varying in (REPORT_FILE, REPORT_MD):
        after.pop(varying)
    assert after == reference
    assert snapshot(assets["ckpt"]) == before


# ---- the safetensors header parser, fuzzed ------------------------------------------------------


def _parse_bounded(path: Path) -> dict:
    """Parse a header; any failure must be a one-line CheckpointError, memory bounded by the file size."""
    size = path.stat().st_size
    tracemalloc.start()
    try:
        infos = read_safetensors_header(path)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
        infos = None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 256 * 1024 + 20 * size, f"{peak} bytes allocated for a {size}-byte file"
    if infos is not None:
        n = int.from_bytes(path.read_bytes()[:8], "little")
        for info in infos.values():
            assert 8 + n <= info.start <= info.end <= size
    return infos


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "x.safetensors"


_LENGTHS = st.one_of(
    st.integers(0, 400), st.integers(0, 2**64 - 1), st.sampled_from([MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1, 2**63])
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(length=st.one_of(st.none(), _LENGTHS), body=st.binary(max_size=300))
def test_fuzz_random_bytes(fuzz_file, length, body):
    fuzz_file.write_bytes(body if length is None else struct.pack("<Q", length) + body)
    _parse_bounded(fuzz_file)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=12,
)
_ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "BOOL", "F8_E4M3", "X", ""]) | _JSON,
        "shape": st.lists(st.integers(-2, 2**40) | st.sampled_from([0, 1, 2, 4]), max_size=6) | _JSON,
        "data_offsets": st.lists(st.integers(-8, 2**66), min_size=2, max_size=2) | _JSON,
    }
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    header=st.dictionaries(st.text(max_size=8), _ENTRY | _JSON, max_size=4),
    metadata=st.none() | _JSON,
    data=st.integers(0, 128),
    pad=st.integers(0, 16),
)
def test_fuzz_structured_headers(fuzz_file, header, metadata, data, pad):
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode() + b" " * pad
    fuzz_file.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data)
    _parse_bounded(fuzz_file)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzz_real_shard_headers_through_open(assets, tmp_path_factory, flips):
    """Random byte changes in a real shard's header: Checkpoint.open either accepts it or says why."""
    root = assets["root"] / "flipped"
    if not root.exists():
        shutil.copytree(assets["ckpt"], root)
    pristine = (assets["ckpt"] / SHARD1).read_bytes()
    n = 8 + int.from_bytes(pristine[:8], "little")
    data = bytearray(pristine)
    for pos, value in flips:
        data[pos % n] = value
    (root / SHARD1).write_bytes(bytes(data))
    try:
        Checkpoint.open(root)
    except CheckpointError as exc:
        assert "\n" not in str(exc)


def test_pathological_headers_are_cheap(fuzz_file):
    """Huge dimension lists and deep nesting: rejected without big integers, recursion or big allocations."""
    cases = [
        {"a": {"dtype": "F32", "shape": [2**40] * 100_000, "data_offsets": [0, 4]}},
        {"a": {"dtype": "F32", "shape": [0] + [2**62] * 1000, "data_offsets": [0, 4]}},
        {"__metadata__": {"k": ["not", "a", "string"]}},
    ]
    for header in cases:
        raw = json.dumps(header).encode()
        fuzz_file.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
        started = time.perf_counter()
        assert _parse_bounded(fuzz_file) is None
        # math.prod of the first shape takes ~20 s (a 1.4 MB header); the bounded product ~1 ms
        assert time.perf_counter() - started < 5
    deep = b"[" * 200_000 + b"]" * 200_000
    fuzz_file.write_bytes(struct.pack("<Q", len(deep)) + deep)
    assert _parse_bounded(fuzz_file) is None


def test_help_documents_exit_codes(capsys):
    with pytest.raises(SystemExit) as exc:
        stream_main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "exit codes:" in text and "--resume" in text and "--state-interval" in text
    for code in ("2 ", "3 ", "4 ", "5 ", "130", "143"):
        assert f"\n  {code}" in text, code
