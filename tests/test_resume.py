"""Interrupted barber-stream runs: SIGKILL at several points, SIGINT/SIGTERM, then the same command again.

Every resumed output must be byte-identical (sha256 of every file but barber_report.json) to an
uninterrupted run. The kill points come from the BARBER_TEST_KILL_AT hook of `barber.output`; the
killed runs are subprocesses started together (their start-up dominates), the reruns run in-process,
everything with one torch thread.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_models import make_tiny_checkpoint

from barber.checkpoint import Checkpoint
from barber.cli import eval_main, stream_main
from barber.errors import CheckpointError
from barber.output import KILL_ENV, REPORT_FILE, STATE_FILE, WORK_DIR
from barber.safetensors_format import read_header
from barber.state import checkpoint_digest, load_state

BLOCKS = 4
#: SIGKILL points: right after block 1's state is committed; in the middle of writing block 2's file;
#: after the first output shard is staged; after two output files were renamed into --out.
KILL_POINTS = ["state:1", "block-write:2", "assemble:1", "publish:2"]
SIGTERM_POINT = "block-write:1/SIGTERM"  # SIGTERM while block 1 is being written: block 1 must still finish

_MAIN = "import sys; from barber.cli import stream_main; sys.exit(stream_main())"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    ckpt = make_tiny_checkpoint(root, "llama", layers=BLOCKS, shards=2)
    ids = root / "ids.pt"
    torch.save(torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0)), ids)
    other_ids = root / "other-ids.pt"
    torch.save(torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1)), other_ids)
    return {"root": root, "ckpt": ckpt, "ids": ids, "other_ids": other_ids}


def argv(inputs, out: Path, *extra: str, ids: Path | None = None, ckpt: Path | None = None, ratio="0.2") -> list[str]:
    return [
        "--ckpt", str(ckpt or inputs["ckpt"]), "--out", str(out), "--calib", str(ids or inputs["ids"]),
        "--rebuild-ratio", ratio, "--no-progress", "--no-report", *extra,  # report.md holds times
    ]


def digests(out: Path) -> dict[str, str]:
    """sha256 of every file under `out` (relative path -> digest), the report excepted."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != REPORT_FILE
    }


def run_inprocess(capsys, args: list[str]) -> tuple[int, str, str]:
    rc = stream_main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def reference(inputs):
    out = inputs["root"] / "reference"
    assert stream_main(argv(inputs, out)) == 0
    assert (out / REPORT_FILE).is_file() and not (out / WORK_DIR).exists()
    d = digests(out)
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= set(d) and len(d) == 5
    return d


@pytest.fixture(scope="module")
def interrupted(inputs):
    """Run every subprocess scenario at once; point -> (out dir, return code, stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = {}
    for point in KILL_POINTS + [SIGTERM_POINT]:
        out = inputs["root"] / ("killed-" + point.replace(":", "-").replace("/", "-"))
        procs[point] = (out, subprocess.Popen(
            [sys.executable, "-c", _MAIN, *argv(inputs, out)], env={**env, KILL_ENV: point},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    results = {}
    for point, (out, proc) in procs.items():
        _, err = proc.communicate(timeout=300)
        results[point] = (out, proc.returncode, err)
    return results


def assert_unfinished(out: Path, capsys) -> None:
    """A killed output is never mistaken for a result: no report, refused by Checkpoint.open and barber-eval."""
    assert not (out / REPORT_FILE).exists()
    with pytest.raises(CheckpointError, match="unfinished barber-stream output"):
        Checkpoint.open(out)
    text = out.parent / "eval.txt"
    text.write_text("some text " * 20)
    assert eval_main(["--ckpt", str(out), "--text", str(text), "--seqlen", "8", "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "unfinished barber-stream output" in err


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_then_same_command_is_byte_identical(inputs, reference, interrupted, capsys, point):
    out, rc, err = interrupted[point]
    assert rc == -signal.SIGKILL, err
    assert_unfinished(out, capsys)
    state = load_state(out / WORK_DIR / STATE_FILE)
    expected_next = {"state:1": 1, "block-write:2": 2, "assemble:1": BLOCKS, "publish:2": BLOCKS}[point]
    assert state.next_block == expected_next
    if point == "block-write:2":
        assert (out / WORK_DIR / ".block-00002.safetensors.tmp").exists()  # killed mid-write
    if point == "publish:2":
        assert sorted(p.name for p in out.iterdir() if p.name != WORK_DIR)  # some files already published

    rc, stdout, err = run_inprocess(capsys, argv(inputs, out))
    assert rc == 0, err
    assert f"(resumed at block {expected_next})" in stdout
    assert digests(out) == reference
    assert not (out / WORK_DIR).exists()
    Checkpoint.open(out)


def test_sigterm_finishes_the_current_block_then_resumes(inputs, reference, interrupted, capsys):
    out, rc, err = interrupted[SIGTERM_POINT]
    assert rc == 143
    lines = err.strip().splitlines()
    assert "SIGTERM received, stopping after the current block" in err
    assert lines[-1] == (
        f"error: stopped by SIGTERM after block 1 of {BLOCKS}; the progress is saved: "
        "run the same command again to resume"
    )
    assert "Traceback" not in err
    assert load_state(out / WORK_DIR / STATE_FILE).next_block == 2  # block 1 was finished
    assert_unfinished(out, capsys)
    rc, _, err = run_inprocess(capsys, argv(inputs, out))
    assert rc == 0, err
    assert digests(out) == reference


def test_sigint_in_process_stops_cleanly_and_restores_handlers(inputs, reference, capsys, monkeypatch, tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out = tmp_path / "out"
    monkeypatch.setenv(KILL_ENV, "block-write:2/SIGINT")
    rc, _, err = run_inprocess(capsys, argv(inputs, out))
    assert rc == 130
    assert err.strip().splitlines()[-1].startswith(f"error: stopped by SIGINT after block 2 of {BLOCKS}")
    assert {s: signal.getsignal(s) for s in before} == before
    assert load_state(out / WORK_DIR / STATE_FILE).next_block == 3
    monkeypatch.delenv(KILL_ENV)
    rc, _, err = run_inprocess(capsys, argv(inputs, out))
    assert rc == 0, err
    assert digests(out) == reference


def test_second_signal_stops_at_once(inputs, reference, capsys, monkeypatch, tmp_path):
    out = tmp_path / "out"
    monkeypatch.setenv(KILL_ENV, "block-write:1/SIGINT,block-write:1/SIGINT")
    rc, _, err = run_inprocess(capsys, argv(inputs, out))
    assert rc == 130
    assert err.strip().splitlines()[-1].startswith("error: stopped at once by SIGINT")
    work = out / WORK_DIR
    assert load_state(work / STATE_FILE).next_block == 1  # block 1 was abandoned
    assert not list(work.glob(".*.tmp"))  # the half-written block file was removed
    monkeypatch.delenv(KILL_ENV)
    rc, _, err = run_inprocess(capsys, argv(inputs, out))
    assert rc == 0, err
    assert digests(out) == reference


@pytest.fixture
def stopped_after_block_0(inputs, capsys, monkeypatch, tmp_path):
    """An output directory holding a run interrupted (SIGINT) after block 0."""
    out = tmp_path / "out"
    monkeypatch.setenv(KILL_ENV, "state:1/SIGINT")
    rc, _, _ = run_inprocess(capsys, argv(inputs, out))
    monkeypatch.delenv(KILL_ENV)
    assert rc == 130
    return out


def _changed_checkpoint(inputs, tmp_path) -> Path:
    ckpt = Path(shutil.copytree(inputs["ckpt"], tmp_path / "changed-ckpt"))
    config = ckpt / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 2e-05'))
    assert "2e-05" in config.read_text()
    return ckpt


def test_checkpoint_digest_sees_the_data_ends_and_not_the_location(inputs, tmp_path):
    """The checkpoint digest covers the first and last MiB of every shard's data: a changed byte
    there changes it; a copy of the checkpoint elsewhere keeps it."""
    original = checkpoint_digest(Checkpoint.open(inputs["ckpt"]))
    copy = Path(shutil.copytree(inputs["ckpt"], tmp_path / "copy"))
    assert checkpoint_digest(Checkpoint.open(copy)) == original
    shard = copy / Checkpoint.open(copy).shard_files[0]
    start = len(read_header(shard).raw)
    for offset in (start, shard.stat().st_size - 1):  # first and last data byte
        data = bytearray(shard.read_bytes())
        data[offset] ^= 0x40
        shard.write_bytes(bytes(data))
        assert checkpoint_digest(Checkpoint.open(copy)) != original
        data[offset] ^= 0x40
        shard.write_bytes(bytes(data))
        assert checkpoint_digest(Checkpoint.open(copy)) == original


def test_fingerprint_mismatch_is_refused(inputs, reference, capsys, tmp_path, stopped_after_block_0):
    out = stopped_after_block_0
    state_file = out / WORK_DIR / STATE_FILE
    saved = state_file.read_bytes()
    cases = [
        (argv(inputs, out, ids=inputs["other_ids"]), "different calibration data"),
        (argv(inputs, out, ckpt=_changed_checkpoint(inputs, tmp_path)), "a different checkpoint"),
        (argv(inputs, out, ratio="0.3"), "different settings (ratio 0.2 -> 0.3)"),
        (argv(inputs, out, "--sparsity", "0.6", "--resume"), "different settings (sparsity 0.5 -> 0.6)"),
    ]
    for args, message in cases:
        rc, _, err = run_inprocess(capsys, args)
        assert rc == 2, err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
        assert message in err and "--overwrite to start over" in err
        assert state_file.read_bytes() == saved  # nothing touched
    rc, _, err = run_inprocess(capsys, argv(inputs, out, "--resume"))
    assert rc == 0, err
    assert digests(out) == reference


def test_overwrite_discards_an_interrupted_run(inputs, capsys, stopped_after_block_0):
    out = stopped_after_block_0
    rc, stdout, err = run_inprocess(capsys, argv(inputs, out, "--overwrite", "--sparsity", "0.25"))
    assert rc == 0, err
    assert "resumed" not in stdout and "sparsity 0.2500" in stdout


def test_resume_flag_needs_something_to_resume(inputs, reference, capsys, tmp_path):
    cases = [
        (tmp_path / "missing", "holds no interrupted run"),
        (inputs["root"] / "reference", "holds a finished result, nothing to resume"),
    ]
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", "holds no interrupted run"))
    (tmp_path / "early" / WORK_DIR).mkdir(parents=True)  # killed before its first block was saved
    cases.append((tmp_path / "early", "stopped before its first block was saved"))
    for out, message in cases:
        rc, _, err = run_inprocess(capsys, argv(inputs, out, "--resume"))
        assert rc == 2 and message in err, err
    rc, _, err = run_inprocess(capsys, argv(inputs, tmp_path / "x", "--resume", "--overwrite"))
    assert rc == 2 and "contradict" in err
    assert not (tmp_path / "missing").exists() and not (tmp_path / "x").exists()
    # without --resume, a work directory with nothing saved is simply started over
    rc, _, err = run_inprocess(capsys, argv(inputs, tmp_path / "early"))
    assert rc == 0, err
    assert digests(tmp_path / "early") == reference


def test_a_locked_output_is_refused(inputs, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rc, _, err = run_inprocess(capsys, argv(inputs, out))
    finally:
        os.close(fd)
    assert rc == 2 and "in use by another barber-stream run" in err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("first, second", [("disk", "auto"), ("auto", "disk")])
def test_resume_across_hidden_state_placements(inputs, reference, capsys, monkeypatch, tmp_path, first, second):
    """Where the hidden states live (memory or a file in the work directory) changes no byte of the output."""
    out = tmp_path / "out"
    monkeypatch.setenv(KILL_ENV, "state:2/SIGINT")
    rc, _, err = run_inprocess(capsys, argv(inputs, out, "--hidden-states", first))
    assert rc == 130, err
    assert not list((out / WORK_DIR).glob("*.bin")), "disk-backed hidden states are removed on a stop"
    monkeypatch.delenv(KILL_ENV)
    rc, stdout, err = run_inprocess(capsys, argv(inputs, out, "--hidden-states", second))
    assert rc == 0, err
    assert "(resumed at block 2)" in stdout
    assert digests(out) == reference


def test_state_interval_saves_less_often_and_still_resumes(inputs, reference, capsys, monkeypatch, tmp_path):
    """--state-interval: no state between blocks within the interval, always one after the last block."""
    import errno

    import barber.writer

    real = barber.writer._write_bytes
    fail_in = {"name": ".block-00002"}

    def full_disk(f, data):
        if fail_in["name"] in os.path.basename(f.name):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(f, data)

    monkeypatch.setattr(barber.writer, "_write_bytes", full_disk)
    out = tmp_path / "out"
    args = argv(inputs, out, "--state-interval", "1e9")
    rc, _, err = run_inprocess(capsys, args)
    assert rc == 5 and "No space left on device" in err
    assert (out / WORK_DIR / "block-00001.safetensors").exists()
    assert not (out / WORK_DIR / STATE_FILE).exists(), "within the interval, no state is written"
    fail_in["name"] = ".model-00002"  # now fail while writing the output
    rc, _, err = run_inprocess(capsys, args)
    assert rc == 5
    assert load_state(out / WORK_DIR / STATE_FILE).next_block == BLOCKS, "the last block's state is always saved"
    monkeypatch.undo()
    rc, stdout, err = run_inprocess(capsys, args)
    assert rc == 0, err
    assert f"(resumed at block {BLOCKS})" in stdout
    assert digests(out) == reference


def test_pruning_a_pruned_model_never_publishes_the_input_report(inputs, reference, capsys, tmp_path):
    """The input's barber_report.json is not a side file: it would mark the output complete too early."""
    import json

    from barber.writer import copy_side_files

    pruned = inputs["root"] / "reference"
    stage = tmp_path / "stage"
    stage.mkdir()
    assert REPORT_FILE not in copy_side_files(pruned, stage, skip={REPORT_FILE})
    out = tmp_path / "again"
    rc, _, err = run_inprocess(capsys, argv(inputs, out, ckpt=pruned))
    assert rc == 0, err
    assert json.loads((out / REPORT_FILE).read_text())["input"] == str(pruned)


def test_resume_with_another_micro_batch_writes_the_same_bytes(inputs, reference, capsys, monkeypatch, tmp_path):
    """The automatic micro-batch depends on the memory at start; a resume with a smaller one (less memory)
    writes the bytes of the uninterrupted run (the sums have a fixed order, barber.fold)."""
    import json

    import barber.budget

    out = tmp_path / "out"
    monkeypatch.setenv(KILL_ENV, "state:1/SIGINT")
    rc, _, err = run_inprocess(capsys, argv(inputs, out))
    assert rc == 130, err
    assert load_state(out / WORK_DIR / STATE_FILE).extra["micro_batch"] == 2
    monkeypatch.delenv(KILL_ENV)
    monkeypatch.setitem(barber.budget.AUTO_BATCH_TOKENS, "cpu", 8)  # auto now picks 1 sample of 8 tokens
    rc, _, err = run_inprocess(capsys, argv(inputs, out))
    assert rc == 0, err
    assert json.loads((out / REPORT_FILE).read_text())["memory"]["plan"]["micro_batch"] == 1
    assert digests(out) == reference
