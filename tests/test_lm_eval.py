"""barber outputs work with lm-evaluation-harness as its users run it: `lm_eval --model hf --model_args pretrained=OUT`.

The task is built here from text the repository ships (README.md's sentences, each scored on its last
word: LAMBADA-style, `output_type: loglikelihood`), so nothing is downloaded (HF_*_OFFLINE=1). The
pruned output is evaluated, and every item's log-likelihood must be the one transformers gives on that
output (so lm-eval loaded the pruned weights and scored what it should), and differ from the dense
input's. Skipped where lm-eval is not installed (tools/bootstrap.sh installs it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_models import make_tiny_checkpoint

from barber.cli import stream_main

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed")

ROOT = Path(__file__).resolve().parents[1]
ITEMS = 24

TASK = """task: barber_lastword
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: " {{{{target}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_task(root: Path) -> Path:
    """A last-word task from README.md's sentences of 6 to 30 words."""
    text = re.sub(r"[`*|#\[\]()<>]", " ", (ROOT / "README.md").read_text(encoding="utf-8"))
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 6 < len(s.split()) < 30]
    items = []
    for s in sentences[:ITEMS]:
        words = s.rstrip(".!?").split()
        items.append({"context": " ".join(words[:-1]), "target": words[-1]})
    assert len(items) == ITEMS
    task = root / "task"
    task.mkdir()
    (task / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    (task / "barber_lastword.yaml").write_text(TASK.format(items=task / "items.jsonl"), encoding="utf-8")
    return task


def lm_eval(model: Path, task: Path, out: Path) -> tuple[dict, list[float]]:
    """(the task's results, per-item log-likelihoods) of `lm_eval` on `model` (the byte tokenizer has no
    BOS token, and lm-eval wants a prefix token id for empty contexts: token 10; no context here is empty)."""
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={model},dtype=float32,prefix_token_id=10", "--tasks", "barber_lastword",
           "--include_path", str(task), "--device", "cpu", "--batch_size", "4", "--output_path", str(out),
           "--log_samples"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["barber_lastword"]
    samples = [json.loads(line) for line in next(out.rglob("samples_barber_lastword_*.jsonl")).read_text().splitlines()]
    return results, [float(s["resps"][0][0][0]) for s in sorted(samples, key=lambda s: s["doc_id"])]


def direct(model_dir: Path, task: Path) -> list[float]:
    """Each item's log p(" target" | context) from transformers, on the model in `model_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for line in (task / "items.jsonl").read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        ctx, cont = tok(item["context"])["input_ids"], tok(" " + item["target"])["input_ids"]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        out.append(float(logp[range(len(ctx) - 1, ids.shape[1] - 1), cont].sum()))
    return out


def test_lm_eval_scores_a_pruned_output(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path, "llama", layers=2)
    ids = tmp_path / "ids.pt"
    torch.save(torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0)), ids)
    out = tmp_path / "pruned"
    assert stream_main(["--ckpt", str(ckpt), "--out", str(out), "--calib", str(ids), "--no-progress"]) == 0
    task = write_task(tmp_path)
    results, got = lm_eval(out, task, tmp_path / "eval")
    assert 0.0 <= results["acc,none"] <= 1.0
    expected = direct(out, task)
    assert len(got) == ITEMS
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-4, atol=1e-3)
    assert direct(ckpt, task) != expected  # the pruned weights, not the input's
