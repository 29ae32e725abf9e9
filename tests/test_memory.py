"""Memory budgets: size parsing, the plan from shapes and budgets, offloaded hidden states, prefetch."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from helpers_models import make_tiny_checkpoint

from barber.budget import MemoryBudget, ModelShapes, model_shapes, parse_bytes, plan_memory
from barber.buffers import HiddenBuffer, Placement
from barber.checkpoint import BlockPrefetcher, Checkpoint
from barber.cli import stream_main
from barber.errors import BudgetError
from barber.output import REPORT_FILE, WORK_DIR
from barber.prune import InitMethod
from barber.report import BlockReport
from barber.run import prune_checkpoint
from barber.settings import PruneSettings
from barber.state import Fingerprint, load_hidden, load_state, save_state
from barber.sysmem import current_rss

GiB, MiB = 2**30, 2**20
_EMPTY_BLOCK = BlockReport(0, {}, [], {}, 0)  # a block report for states made by hand


# ---- sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("6GiB", 6 * GiB), ("500MiB", 500 * MiB), ("1.5G", int(1.5 * GiB)), ("8GB", 8 * 10**9), ("123", 123),
     ("2 gib", 2 * GiB), ("64k", 64 * 1024), ("1TB", 10**12)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["6XB", "", "GiB", "-1GiB", "0", "1.2.3G", "6 GiB extra"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match="size|positive"):
        parse_bytes(text)


def test_cli_bad_budget_is_a_one_line_usage_error(capsys):
    rc = stream_main(["--ckpt", "x", "--out", "y", "--max-cpu-memory", "6XB"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "--max-cpu-memory" in err and "6XB" in err


def test_cli_gpu_budget_needs_cuda(tmp_path, capsys):
    src = make_tiny_checkpoint(tmp_path, "llama")
    rc = stream_main(["--ckpt", str(src), "--out", str(tmp_path / "o"), "--max-gpu-memory", "1GiB", "--nsamples", "2",
                      "--seqlen", "8", "--calib", str(_text(tmp_path))])
    err = capsys.readouterr().err
    assert rc == 2 and "--max-gpu-memory needs --device cuda" in err


def test_cli_impossible_budget_fails_before_writing(tmp_path, capsys):
    src = make_tiny_checkpoint(tmp_path, "llama")
    out = tmp_path / "o"
    rc = stream_main(["--ckpt", str(src), "--out", str(out), "--max-cpu-memory", "1MiB", "--nsamples", "2",
                      "--seqlen", "8", "--calib", str(_text(tmp_path)), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "memory budget is too small" in err
    assert not out.exists()


def _text(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("hello world, this is calibration text. " * 50)
    return path


# ---- the plan -----------------------------------------------------------------------------------

# A LLaMA-13B-shaped block (no checkpoint needed): d 5120, f 13824, bf16 storage.
D, F = 5120, 13824
LINEARS = {
    "self_attn.q_proj": (D, D), "self_attn.k_proj": (D, D), "self_attn.v_proj": (D, D), "self_attn.o_proj": (D, D),
    "mlp.gate_proj": (F, D), "mlp.up_proj": (F, D), "mlp.down_proj": (D, F),
}
SHAPES = ModelShapes(
    hidden=D,
    block_numel=sum(o * i for o, i in LINEARS.values()) + 2 * D,
    block_stored_bytes=2 * (sum(o * i for o, i in LINEARS.values()) + 2 * D),
    linears=LINEARS,
    attn=tuple(n for n in LINEARS if n.startswith("self_attn")),
    mlp=tuple(n for n in LINEARS if n.startswith("mlp")),
    embed_numel=32000 * D,
)


def plan(cpu=None, gpu=None, *, nsamples=128, seqlen=2048, device="cpu", dtype=torch.bfloat16, hidden="auto",
         prefetch=True, batch_size=0, base=400 * MiB):
    return plan_memory(
        SHAPES, nsamples=nsamples, seqlen=seqlen, compute_dtype=dtype, device=device,
        budget=MemoryBudget(cpu=cpu, gpu=gpu, hidden=hidden, prefetch=prefetch), batch_size=batch_size,
        base_rss=base, cpu_budget=64 * GiB, gpu_budget=80 * GiB,
    )


def test_generous_budget_keeps_everything_on_the_device_with_the_automatic_batch():
    p = plan(cpu=100 * GiB, nsamples=8, seqlen=128)
    assert (p.hidden_placement, p.prefetch, p.micro_batch) == ("device", True, 8)  # 1024 // 128 = 8
    assert p.cpu_budget_source == "given" and p.estimates["peak_cpu"] <= 100 * GiB
    assert p.estimates["hidden_states"] == 2 * 8 * 128 * D * 2


def test_automatic_budget_is_used_when_none_is_given():
    p = plan(nsamples=8, seqlen=128)
    assert p.cpu_budget == 64 * GiB and p.cpu_budget_source == "auto"


def test_asked_batch_size_is_an_upper_bound():
    assert plan(cpu=100 * GiB, nsamples=64, seqlen=128, batch_size=3).micro_batch == 3


def test_shrinking_budget_lowers_batch_then_drops_prefetch_then_goes_to_disk():
    shape = dict(nsamples=512, seqlen=512)  # 1024 automatic CPU tokens = 2 samples
    full = plan(cpu=1000 * GiB, **shape)
    assert (full.hidden_placement, full.prefetch, full.micro_batch) == ("device", True, 2)
    one = plan(cpu=full.estimates["peak_cpu"] - 1, **shape)
    assert (one.hidden_placement, one.prefetch, one.micro_batch) == ("device", True, 1)
    no_prefetch = plan(cpu=one.estimates["peak_cpu"] - 1, **shape)
    assert (no_prefetch.hidden_placement, no_prefetch.prefetch) == ("device", False)
    smallest = no_prefetch
    if smallest.micro_batch > 1:  # without prefetch the larger micro-batch may fit again
        smallest = plan(cpu=no_prefetch.estimates["peak_cpu"] - 1, **shape)
        assert (smallest.hidden_placement, smallest.prefetch, smallest.micro_batch) == ("device", False, 1)
    disk = plan(cpu=smallest.estimates["peak_cpu"] - 1, **shape)
    assert disk.hidden_placement == "disk"
    # 512 x 512 tokens of bf16 hidden states (2 buffers, 5.4 GB) leave RSS when on disk.
    lean = plan(cpu=no_prefetch.estimates["peak_cpu"], hidden="disk", prefetch=False, batch_size=1, **shape)
    assert no_prefetch.estimates["peak_cpu"] - lean.estimates["peak_cpu"] > 4.5 * GiB
    for p in (full, one, no_prefetch, disk):
        assert p.estimates["peak_cpu"] <= p.cpu_budget


def test_impossible_budget_is_one_clear_error():
    with pytest.raises(BudgetError, match="too small.*disk.*micro-batch 1.*RSS"):
        plan(cpu=1 * GiB)


def test_float32_needs_no_float32_copies_but_larger_weights():
    bf16, fp32 = plan(cpu=1000 * GiB, nsamples=4, seqlen=128), plan(
        cpu=1000 * GiB, nsamples=4, seqlen=128, dtype=torch.float32)
    assert fp32.estimates["block_resident"] > bf16.estimates["block_resident"]
    assert fp32.estimates["gradient_pass"] < bf16.estimates["gradient_pass"]  # no fp32 copies of the weights


def test_gpu_plan_places_hidden_states_by_both_budgets():
    on_gpu = plan(cpu=64 * GiB, gpu=80 * GiB, device="cuda")
    assert on_gpu.hidden_placement == "device" and on_gpu.estimates["peak_gpu"] <= 80 * GiB
    host = plan(cpu=64 * GiB, gpu=6 * GiB, device="cuda")
    assert host.hidden_placement == "host" and host.estimates["peak_gpu"] <= 6 * GiB
    assert host.estimates["peak_cpu"] >= host.estimates["hidden_states"]
    disk = plan(cpu=4 * GiB, gpu=6 * GiB, device="cuda")
    assert disk.hidden_placement == "disk" and disk.estimates["peak_cpu"] <= 4 * GiB
    with pytest.raises(BudgetError, match="GPU"):
        plan(cpu=64 * GiB, gpu=1 * GiB, device="cuda")


def test_forced_placement_is_kept():
    assert plan(cpu=1000 * GiB, hidden="disk").hidden_placement == "disk"
    assert plan(cpu=1000 * GiB, hidden="host").hidden_placement == "device"  # host RAM is the device on a CPU run
    with pytest.raises(ValueError, match="placement"):
        MemoryBudget(hidden="swap")


def test_pinned_is_the_old_name_of_host(capsys):
    """Commands, reports and states written before the rename say "pinned"; it still means host."""
    from barber.options import stream_parser as _stream_parser

    assert _stream_parser().parse_args(["--hidden-states", "pinned"]).hidden_states == "host"
    assert "deprecated" in capsys.readouterr().err
    assert Placement("pinned") is Placement.HOST and MemoryBudget(hidden="pinned").hidden is Placement.HOST
    assert plan(cpu=64 * GiB, gpu=6 * GiB, device="cuda", hidden="pinned").hidden_placement == "host"
    assert HiddenBuffer(torch.zeros(1), "pinned", torch.device("cpu")).placement is Placement.HOST
    assert json.dumps(Placement.HOST) == '"host"' and f"{Placement.DISK}" == "disk"


def test_model_shapes_of_a_checkpoint(tmp_path):
    ckpt = Checkpoint.open(make_tiny_checkpoint(tmp_path, "qwen2", dtype=torch.bfloat16))
    sh = model_shapes(ckpt)
    assert sh.hidden == 64 and sh.linears["mlp.down_proj"] == (64, 96)
    assert sh.block_stored_bytes == 2 * sh.block_numel  # bf16 storage, biases included
    assert sh.embed_numel == 300 * 64


# ---- buffers and prefetch ----------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["device", "host", "disk"])
def test_hidden_buffer_round_trip(tmp_path, placement):
    placement_device = "cuda" if placement == "host" and torch.cuda.is_available() else "cpu"
    buf = HiddenBuffer.allocate((5, 3, 4), torch.bfloat16, placement, placement_device, tmp_path / "h.bin")
    data = torch.randn(5, 3, 4).to(torch.bfloat16)
    for c in (slice(0, 2), slice(2, 5)):
        buf.put(c, data[c])
    assert torch.equal(buf.get(slice(1, 4)).cpu(), data[1:4])
    assert torch.equal(buf.tensor.cpu(), data)
    if placement == "disk":
        assert (tmp_path / "h.bin").stat().st_size == data.numel() * 2
        buf.close()
        assert not (tmp_path / "h.bin").exists()


def test_disk_states_are_saved_and_restored_without_mapping_them_whole(tmp_path):
    """Saving a disk buffer to a state file, and reading it back into a disk buffer, stream it in
    pieces: RSS grows by far less than the buffer (it grew by all of it when the writer read the
    mapping whole), and the data come back bit-exact."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read RSS")
    shape, step = (48, 1024, 1024), 4  # 192 MiB of float32, put and got 16 MiB at a time
    # The writer streams `host_pieces` of up to 64 MiB; the heap may keep one piece's pages after it is
    # freed, so "far less than the buffer" is: under 1.5 pieces (the old writer grew by all 192 MiB).
    bound = 96 * MiB

    def piece(i: int) -> torch.Tensor:
        return torch.randn(step, 1024, 1024, generator=torch.Generator().manual_seed(i))

    buf = HiddenBuffer.allocate(shape, torch.float32, "disk", "cpu", tmp_path / "h.bin")
    for i in range(shape[0] // step):
        buf.put(slice(step * i, step * (i + 1)), piece(i))
    before = current_rss()
    save_state(tmp_path / "state.safetensors", next_block=1, num_blocks=2, blocks=[_EMPTY_BLOCK], hidden=buf,
               fp=Fingerprint("c", "d", "s", {}))
    assert current_rss() - before < bound, "saving mapped the disk buffer into RSS"
    buf.close()

    back = load_hidden(load_state(tmp_path / "state.safetensors"), None)
    assert back.placement == "disk" and back.shape == shape
    target = HiddenBuffer.allocate(shape, torch.float32, "disk", "cpu", tmp_path / "g.bin")
    before = current_rss()
    for i in range(shape[0] // step):
        c = slice(step * i, step * (i + 1))
        target.put(c, back.get(c))
    assert current_rss() - before < bound, "restoring mapped the state file into RSS"
    for i in range(shape[0] // step):
        assert torch.equal(target.get(slice(step * i, step * (i + 1))), piece(i))
    with pytest.raises(RuntimeError, match="read-only"):
        back.put(slice(0, 1), torch.zeros(1, 1024, 1024))
    target.close()


def test_a_state_with_the_old_random_state_still_loads(tmp_path):
    """States used to carry the torch random state (tensors rng_cpu, rng_cuda); they still load, and
    new states carry only the hidden states."""
    from safetensors.torch import save_file

    from barber.safetensors_format import read_header

    hidden = HiddenBuffer(torch.arange(12.0).view(1, 3, 4), "device", torch.device("cpu"))
    save_state(tmp_path / "new.safetensors", next_block=1, num_blocks=2, blocks=[_EMPTY_BLOCK], hidden=hidden,
               fp=Fingerprint("c", "d", "s", {}))
    header = read_header(tmp_path / "new.safetensors")
    assert set(header.tensors) == {"hidden"}
    save_file({"hidden": hidden.tensor, "rng_cpu": torch.get_rng_state()}, tmp_path / "old.safetensors",
              metadata=header.metadata)
    old = load_state(tmp_path / "old.safetensors")
    assert old.next_block == 1 and torch.equal(load_hidden(old, "cpu").tensor, hidden.tensor)


def test_prefetcher_reads_the_same_tensors(tmp_path):
    ckpt = Checkpoint.open(make_tiny_checkpoint(tmp_path, "llama", layers=3, dtype=torch.bfloat16))
    pre = BlockPrefetcher(ckpt)
    pre.ahead(1)
    pre.ahead(1)  # idempotent
    got = pre.take(1)
    direct = ckpt.block_weights(1)
    assert got.keys() == direct.keys() and all(torch.equal(got[k], direct[k]) for k in got)
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    pre.ahead(2)
    pre.ahead(3)  # out of range: nothing
    pre.close()
    assert torch.equal(pre.take(0)["mlp.up_proj.weight"], ckpt.block_weights(0)["mlp.up_proj.weight"])


# ---- end to end: placement and prefetch never change the output -----------------------------------


def _digest(path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _prune(src, out, budget, **settings):
    ids = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(0))
    settings = PruneSettings(batch_size=2, **settings)
    return prune_checkpoint(Checkpoint.open(src), out, settings, ids, progress=False, budget=budget).to_json()


@pytest.mark.parametrize("init, rebuild", [(InitMethod.WANDA, True), (InitMethod.SPARSEGPT, True),
                                           (InitMethod.WANDA, False)])
def test_disk_offload_and_prefetch_give_byte_identical_output(tmp_path, init, rebuild):
    src = make_tiny_checkpoint(tmp_path, "llama", layers=3, dtype=torch.bfloat16)
    kw = dict(init=init, rebuild=rebuild, ratio=0.3, dtype=torch.bfloat16)
    ref = _prune(src, tmp_path / "ref", MemoryBudget(hidden="device", prefetch=False), **kw)
    disk = _prune(src, tmp_path / "disk", MemoryBudget(hidden="disk", prefetch=False), **kw)
    pre = _prune(src, tmp_path / "pre", MemoryBudget(hidden="device", prefetch=True), **kw)
    both = _prune(src, tmp_path / "both", MemoryBudget(hidden="disk", prefetch=True), **kw)
    assert ref["memory"]["plan"]["hidden_placement"] == "device" and not ref["memory"]["plan"]["prefetch"]
    assert disk["memory"]["plan"]["hidden_placement"] == "disk"
    assert pre["memory"]["plan"]["prefetch"] and both["memory"]["plan"]["prefetch"]
    digests = {name: _digest(tmp_path / name) for name in ("ref", "disk", "pre", "both")}
    assert len(set(digests.values())) == 1, digests
    losses = [[sb["loss_after"] for b in r["blocks"] for sb in b["subblocks"]] for r in (ref, disk, pre, both)]
    assert all(x == losses[0] for x in losses)
    assert not (tmp_path / "disk" / WORK_DIR).exists()


def test_report_states_plan_peaks_and_phase_times(tmp_path):
    src = make_tiny_checkpoint(tmp_path, "opt")
    report = _prune(src, tmp_path / "out", MemoryBudget(cpu=8 * GiB))
    plan = report["memory"]["plan"]
    assert plan["cpu_budget"] == 8 * GiB and plan["cpu_budget_source"] == "given"
    assert plan["micro_batch"] == 2 and plan["estimates"]["peak_cpu"] <= 8 * GiB
    assert 0 < report["memory"]["peak_rss"] < 8 * GiB
    for block in report["blocks"]:
        assert {"read", "stats", "select", "gradient", "rebuild", "forward", "write"} <= set(block["seconds"])
    assert (tmp_path / "out" / REPORT_FILE).exists()


def test_budget_lowers_the_micro_batch_and_the_run_still_prunes(tmp_path, monkeypatch):
    src = make_tiny_checkpoint(tmp_path, "llama")
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    ckpt = Checkpoint.open(src)
    roomy = plan_memory(model_shapes(ckpt), nsamples=4, seqlen=16, compute_dtype=torch.float32, device="cpu",
                        budget=MemoryBudget(cpu=64 * GiB, prefetch=False), base_rss=0)
    assert roomy.micro_batch == 4
    from barber.budget import OVERHEAD

    per_sample = OVERHEAD * roomy.estimates["activations_per_sample"]
    tight = int(roomy.estimates["peak_cpu"] - 1.5 * per_sample)  # room for 2 samples' activations, not 3 or 4
    monkeypatch.setattr("barber.residency.current_rss", lambda: 0)  # the plan's base, fixed for the test
    budget = MemoryBudget(cpu=tight, prefetch=False)
    report = prune_checkpoint(ckpt, tmp_path / "o", PruneSettings(), ids, progress=False, budget=budget).to_json()
    assert report["memory"]["plan"]["micro_batch"] == 2
    assert report["sparsity"] == pytest.approx(0.5)


def test_cli_passes_budgets_placement_and_prefetch_through(tmp_path, capsys):
    import json

    src = make_tiny_checkpoint(tmp_path, "qwen2")
    out = tmp_path / "o"
    rc = stream_main(["--ckpt", str(src), "--out", str(out), "--nsamples", "3", "--seqlen", "16", "--calib",
                      str(_text(tmp_path)), "--no-progress", "--max-cpu-memory", "8GiB", "--hidden-states", "disk",
                      "--no-prefetch", "--batch-size", "2"])
    assert rc == 0, capsys.readouterr().err
    plan = json.loads((out / REPORT_FILE).read_text())["memory"]["plan"]
    assert (plan["hidden_placement"], plan["prefetch"], plan["micro_batch"]) == ("disk", False, 2)
    assert plan["cpu_budget"] == 8 * GiB


def test_a_state_from_elsewhere_is_adopted_into_the_planned_buffer(tmp_path):
    """A resumed state's hidden states (in host memory) move into the plan's placement; same results."""
    from barber.pipeline import Pruner

    ckpt = Checkpoint.open(make_tiny_checkpoint(tmp_path, "llama", layers=2))
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    settings = PruneSettings(batch_size=2, ratio=0.3)

    def run_all(pruner, state):
        written = {}
        while state.next_block < ckpt.num_layers:
            state = pruner.run_block(state, lambda i, w: written.update({(i, k): v.clone() for k, v in w.items()}))
        return written, state.hidden.tensor.clone()

    ref, ref_hidden = run_all(p := Pruner(ckpt, settings, progress=False), p.start(ids))
    start = Pruner(ckpt, settings, progress=False).start(ids)
    state = type(start)(start.next_block, HiddenBuffer(start.hidden.tensor.clone(), "host", torch.device("cpu")), [])
    disk = Pruner(ckpt, settings, progress=False, budget=MemoryBudget(hidden="disk"), work_dir=tmp_path / "w")
    got, got_hidden = run_all(disk, state)
    assert disk.plan.hidden_placement == "disk"
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert torch.equal(ref_hidden, got_hidden)
    assert not list((tmp_path / "w").glob("*.bin"))  # files removed after the last block
