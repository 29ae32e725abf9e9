"""Data-parallel runs on the CPU (gloo): several ranks, micro-batches and resumes all write the same bytes.

Ranks are real processes started by torchrun (`python -m torch.distributed.run --standalone`, which
picks a free port) running `python -m barber.stream`, as a user runs them; references run
in-process with one torch thread, as every rank does under torchrun.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_models import make_tiny_checkpoint

from barber.cli import stream_main
from barber.layout import REPORT_FILE, REPORT_MD, REPORT_PNG
from barber.output import KILL_ENV, WORK_DIR
from barber.state import load_state

pytestmark = pytest.mark.usefixtures("one_thread")

GROUPS = "6"  # sample groups: 1 to 6 ranks
#: The default recipe (Wanda + sub-block re-fit) and the paper's (Wanda + Barber rebuild).
RECIPES = {"refit": ["--recipe", "refit"], "paper": ["--recipe", "paper", "--rebuild-ratio", "0.2"]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    ckpt = make_tiny_checkpoint(root, "llama", layers=3)
    ids = root / "ids.pt"
    torch.save(torch.randint(0, 256, (12, 16), generator=torch.Generator().manual_seed(0)), ids)
    return {"root": root, "ckpt": ckpt, "ids": ids, "refs": {}}


def argv(inputs, out: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(inputs["ckpt"]), "--out", str(out), "--calib", str(inputs["ids"]), "--no-progress",
            "--sample-groups", GROUPS, *extra]


def digest(out: Path) -> str:
    """sha256 over every output file but the reports (which hold times)."""
    h = hashlib.sha256()
    for f in sorted(out.iterdir()):
        if f.is_file() and f.name not in (REPORT_FILE, REPORT_MD, REPORT_PNG):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def reference(inputs, recipe: str) -> str:
    """The digest of one in-process run of `recipe` (cached per module)."""
    if recipe not in inputs["refs"]:
        out = inputs["root"] / f"ref-{recipe}"
        assert stream_main(argv(inputs, out, *RECIPES[recipe])) == 0
        inputs["refs"][recipe] = digest(out)
    return inputs["refs"][recipe]


def torchrun(ranks: int, args: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           "-m", "barber.stream", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full_env.pop(KILL_ENV, None)
    full_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_two_and_three_ranks_write_the_bytes_of_one_process(inputs, recipe):
    expected = reference(inputs, recipe)
    for ranks in (2, 3):
        out = inputs["root"] / f"{recipe}-{ranks}"
        run = torchrun(ranks, argv(inputs, out, *RECIPES[recipe]))
        assert run.returncode == 0, run.stderr[-3000:]
        assert digest(out) == expected, f"{ranks} ranks"
        assert run.stdout.count("pruned 3 blocks") == 1  # only rank 0 speaks


def test_micro_batches_placements_and_threads_write_the_same_bytes(inputs):
    expected = reference(inputs, "paper")
    for extra in (["--batch-size", "1"], ["--batch-size", "4"], ["--batch-size", "16", "--hidden-states", "disk"]):
        out = inputs["root"] / f"mb-{'-'.join(extra)}"
        assert stream_main(argv(inputs, out, *RECIPES["paper"], *extra)) == 0
        assert digest(out) == expected, extra
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = inputs["root"] / "two-threads"
        assert stream_main(argv(inputs, out, *RECIPES["paper"])) == 0
    finally:
        torch.set_num_threads(before)
    assert digest(out) == expected


def test_a_killed_rank_stops_the_run_and_another_world_size_resumes_it(inputs):
    expected = reference(inputs, "refit")
    out = inputs["root"] / "killed"
    args = argv(inputs, out, *RECIPES["refit"])
    run = torchrun(3, args, env={KILL_ENV: "state:1@1"})  # rank 1 dies once block 0 is committed
    assert run.returncode != 0
    assert "Traceback" not in "\n".join(line for line in run.stderr.splitlines() if "barber" in line)
    assert load_state(out / WORK_DIR / "state.safetensors").next_block >= 1
    resumed = torchrun(2, args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at block" in resumed.stdout
    assert digest(out) == expected


def test_more_ranks_than_sample_groups_is_one_line(inputs):
    run = torchrun(3, argv(inputs, inputs["root"] / "too-many", "--sample-groups", "2"))
    assert run.returncode != 0
    assert "error: 3 ranks but only 2 sample groups" in run.stderr
    assert not (inputs["root"] / "too-many").exists()


def test_a_mixture_of_experts_on_two_ranks_writes_the_bytes_of_one_process(inputs):
    """Experts' statistics over routed tokens fold like any other (qwen2_moe: routed and shared experts),
    with the rebuild and the re-fit per expert."""
    root = inputs["root"] / "moe"
    ckpt = make_tiny_checkpoint(root, "qwen2_moe", layers=2)
    args = ["--ckpt", str(ckpt), "--calib", str(inputs["ids"]), "--no-progress", "--sample-groups", GROUPS,
            "--recipe", "refit", "--rebuild", "--rebuild-ratio", "0.2", "--pattern", "2:4"]
    assert stream_main([*args, "--out", str(root / "one")]) == 0
    run = torchrun(2, [*args, "--out", str(root / "two")])
    assert run.returncode == 0, run.stderr[-3000:]
    assert digest(root / "two") == digest(root / "one")
