"""Streaming perplexity and `barber-eval`: parity with transformers, user errors, memory independent of depth."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers_models import make_tiny_checkpoint, make_tiny_model, save_checkpoint
from test_tokenizer import real_asset

from barber.checkpoint import Checkpoint
from barber.cli import eval_main
from barber.errors import DataError
from barber.evaluate import advance_hidden, make_windows, perplexity
from barber.model import Arch
from barber.peak_rss import run_measured

TEXT = "".join(
    f"Line {i}: the quick brown fox {i * 7 % 13} jumps over the lazy dog; ünïcödé {i % 5}.\n" for i in range(60)
)


def hf_window_ppl(model, windows: torch.Tensor) -> float:
    """Reference: transformers' mean loss per window (batch 1), exp of the mean over windows."""
    with torch.no_grad():
        losses = [float(model(w[None], labels=w[None]).loss) for w in windows]
    return math.exp(sum(losses) / len(losses))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


# ---- windows and chunking ---------------------------------------------------------------------


def test_make_windows():
    w = make_windows(list(range(10)), 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert make_windows(range(10), 3, max_windows=2).shape == (2, 3)
    assert make_windows(range(5), 3, bos_id=99).tolist() == [[99, 0, 1], [2, 3, 4]]
    with pytest.raises(DataError, match="fewer than one window"):
        make_windows(range(5), 8)
    with pytest.raises(DataError, match="at least 2"):
        make_windows(range(5), 1)


def test_advance_hidden_chunking_is_invisible(tmp_path):
    ckpt = Checkpoint.open(make_tiny_checkpoint(tmp_path, "llama"))
    arch = Arch.from_checkpoint(ckpt)
    w = ckpt.block_weights(0)
    h = torch.randn(5, 12, ckpt.config.hidden_size)
    pos = arch.positions(12)
    one = advance_hidden(arch, h.clone(), w, pos, chunk_size=1)
    out = torch.empty_like(h)
    three = advance_hidden(arch, h, w, pos, chunk_size=3, out=out)
    assert three is out
    torch.testing.assert_close(one, three, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(one, arch.block_forward(h, w, pos), rtol=1e-6, atol=1e-6)


# ---- parity with transformers -----------------------------------------------------------------


@pytest.mark.parametrize(
    "family, overrides",
    [("llama", {}), ("mistral", {}), ("qwen2", {}), ("opt", dict(do_layer_norm_before=False, word_embed_proj_dim=32))],
    ids=["llama", "mistral", "qwen2", "opt-post-ln"],
)
def test_eval_matches_transformers(tmp_path, text_file, family, overrides, capsys):
    model = make_tiny_model(family, layers=3, seed=3, **overrides)
    root = save_checkpoint(model, tmp_path / "ckpt", shards=2)
    out_json = tmp_path / "ppl.json"
    rc = eval_main(["--ckpt", str(root), "--text", str(text_file), "--seqlen", "40", "--max-windows", "4",
                    "--json", str(out_json), "--batch-size", "3"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "perplexity" in stdout and "no BOS prepended" in stdout
    result = json.loads(out_json.read_text())
    ids = list(TEXT.encode("utf-8"))  # the byte tokenizer's ids are the UTF-8 bytes
    expected = hf_window_ppl(model, make_windows(ids, 40, 4))
    assert result["n_windows"] == 4 and result["tokens"] == 4 * 39
    assert result["settings"]["seqlen"] == 40 and result["settings"]["bos"] is False
    assert abs(result["ppl"] - expected) / expected <= 1e-4


def test_batch_size_and_bos(tmp_path):
    root = make_tiny_checkpoint(tmp_path, "llama", layers=2)
    ckpt = Checkpoint.open(root)
    ids = list(TEXT.encode("utf-8"))
    r1 = perplexity(ckpt, ids, seqlen=32, max_windows=5, progress=False)
    r5 = perplexity(ckpt, ids, seqlen=32, max_windows=5, batch_size=5, progress=False)
    assert abs(r1.ppl - r5.ppl) / r1.ppl < 1e-6
    rb = perplexity(ckpt, ids, seqlen=32, max_windows=5, bos_id=1, progress=False)
    assert rb.settings["bos"] is True and rb.ppl != r1.ppl
    model = make_tiny_model("llama", layers=2)
    assert abs(rb.ppl - hf_window_ppl(model, make_windows(ids, 32, 5, bos_id=1))) / rb.ppl <= 1e-4


def test_bfloat16_eval_runs_close(tmp_path):
    ckpt = Checkpoint.open(make_tiny_checkpoint(tmp_path, "qwen2", dtype=torch.bfloat16))
    ids = list(TEXT.encode("utf-8"))
    r32 = perplexity(ckpt, ids, seqlen=32, max_windows=3, progress=False)
    r16 = perplexity(ckpt, ids, seqlen=32, max_windows=3, dtype=torch.bfloat16, progress=False)
    assert r16.settings["dtype"] == "bfloat16"
    assert abs(r16.nll - r32.nll) / r32.nll < 0.02


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cuda_matches_cpu(tmp_path, dtype):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ckpt = Checkpoint.open(make_tiny_checkpoint(tmp_path, "mistral", layers=3))
    ids = list(TEXT.encode("utf-8"))
    cpu = perplexity(ckpt, ids, seqlen=40, max_windows=4, progress=False)
    gpu = perplexity(ckpt, ids, seqlen=40, max_windows=4, device="cuda", dtype=dtype, batch_size=2, progress=False)
    assert gpu.settings["device"] == "cuda"
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert abs(gpu.nll - cpu.nll) / cpu.nll <= tol, (gpu.nll, cpu.nll)


# ---- user errors through eval_main ------------------------------------------------------------


def _corrupt(kind: str, root: Path) -> None:
    if kind == "missing shard":
        (root / "model-00002-of-00002.safetensors").unlink()
    elif kind == "truncated file":
        f = root / "model-00001-of-00002.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif kind == "corrupt header":
        f = root / "model-00001-of-00002.safetensors"
        data = bytearray(f.read_bytes())
        data[8:20] = b"#garbage!#!!"
        f.write_bytes(bytes(data))
    elif kind == "huge header length":
        f = root / "model-00001-of-00002.safetensors"
        f.write_bytes((2**62).to_bytes(8, "little") + f.read_bytes()[8:])
    elif kind == "shape mismatch":
        cfg = json.loads((root / "config.json").read_text())
        cfg["hidden_size"] = 48
        cfg["head_dim"] = 12
        (root / "config.json").write_text(json.dumps(cfg))
    elif kind == "unsupported model_type":
        cfg = json.loads((root / "config.json").read_text())
        cfg["model_type"] = "bloom"
        (root / "config.json").write_text(json.dumps(cfg))
    elif kind == "no tokenizer":
        (root / "tokenizer.json").unlink()


BAD = {
    "missing shard": (3, "missing shard model-00002-of-00002.safetensors"),
    "truncated file": (3, "truncated safetensors file"),
    "corrupt header": (3, "corrupt safetensors header"),
    "huge header length": (3, "corrupt safetensors header"),
    "shape mismatch": (3, "has shape [64, 64] but config.json implies [48, 48]"),
    "unsupported model_type": (
        3, "unsupported model_type 'bloom' (supported: gemma2, gemma3_text, llama, mistral, mixtral, opt, phi3, "
        "qwen2, qwen2_moe, qwen3, qwen3_moe)"
    ),
    "no tokenizer": (3, "no tokenizer.json or tokenizer.model"),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("pristine"), "llama", shards=2)


def _run_error(capsys, argv) -> tuple[int, str]:
    rc = eval_main(argv)
    captured = capsys.readouterr()
    return rc, captured.err


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_checkpoints_give_one_line_errors(tmp_path, pristine, text_file, capsys, kind):
    import shutil

    root = Path(shutil.copytree(pristine, tmp_path / "ckpt"))
    _corrupt(kind, root)
    rc, err = _run_error(capsys, ["--ckpt", str(root), "--text", str(text_file), "--seqlen", "16", "--no-progress"])
    code, message = BAD[kind]
    assert rc == code
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--ckpt", "{missing}"], 3, "no such checkpoint directory"),
        (["--text", "{missing}"], 4, "no such text file"),
        (["--seqlen", "100000"], 4, "fewer than one window of 100000"),
        (["--seqlen", "1"], 2, "--seqlen must be at least 2"),
        (["--max-windows", "0"], 2, "--max-windows must be at least 1"),
        (["--dtype", "float64"], 2, "invalid choice: 'float64'"),
        (["--seqlen", "abc"], 2, "invalid int value"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nonsense"], 2, "--device"),
        (["--json", "{missing}/sub/out.json"], 2, "--json"),
        (["--bogus"], 2, "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors(tmp_path, pristine, text_file, capsys, args, code, message):
    base = {"--ckpt": str(pristine), "--text": str(text_file), "--seqlen": "16", "--no-progress": None}
    missing = str(tmp_path / "does-not-exist")
    args = [a.replace("{missing}", missing) for a in args]
    for key in args[::2]:
        base.pop(key, None)
    argv = [x for k, v in base.items() for x in ([k] if v is None else [k, v])] + args
    rc, err = _run_error(capsys, argv)
    assert rc == code, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err


def test_missing_required_option(capsys):
    rc, err = _run_error(capsys, ["--text", "x"])
    assert rc == 2 and "the following arguments are required: --ckpt" in err


# ---- memory ------------------------------------------------------------------------------------

def peak_rss_of_eval(argv: list[str]) -> int:
    """Run barber-eval in a fresh interpreter; its peak RSS in bytes."""
    run = run_measured("eval_main", argv, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr
    return run.peak_rss


def test_peak_memory_independent_of_depth(tmp_path, text_file):
    """2 and 6 blocks of ~50 MB each: the deeper model may not cost even one more block."""
    overrides = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=8)
    rss = {}
    for layers in (2, 6):
        root = make_tiny_checkpoint(tmp_path, "llama", layers=layers, shards=layers, **overrides)
        rss[layers] = peak_rss_of_eval(["--ckpt", str(root), "--text", str(text_file), "--seqlen", "64",
                                        "--max-windows", "2", "--no-progress"])
    block_bytes = (4 * 1024 * 1024 + 3 * 1024 * 2816) * 4
    assert rss[6] - rss[2] < block_bytes, (rss, block_bytes)


# ---- real model --------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_perplexity_matches_transformers(tmp_path, capsys):
    ckpt_dir = real_asset("smollm2_dir")
    wiki = real_asset("wiki_text_path")
    transformers = pytest.importorskip("transformers")
    text = tmp_path / "wiki.txt"
    text.write_text(wiki.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    out_json = tmp_path / "ppl.json"
    rc = eval_main(["--ckpt", str(ckpt_dir), "--text", str(text), "--seqlen", "256", "--max-windows", "2",
                    "--json", str(out_json), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    ours = json.loads(out_json.read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt_dir), dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(ckpt_dir))
    ids = tok(text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    expected = hf_window_ppl(model, make_windows(ids, 256, 2))
    assert ours["n_windows"] == 2
    assert abs(ours["ppl"] - expected) / expected <= 1e-4, (ours["ppl"], expected)
    assert 5 < ours["ppl"] < 100  # a real language model on real text, not noise
