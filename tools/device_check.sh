#!/usr/bin/env bash
# tools/device_check.sh: build, test and benchmark barber on a lent GPU, in one call of a few minutes.
#
# On the device machine (the session's device tool; torch 2.11 + CUDA 13.0 + Python 3.12 there), from
# the repository root, carrying nothing (the extension is built there with that machine's torch):
#
#     run(command="bash tools/device_check.sh", timeout_s=600)
#
# Steps, in this order, each bounded so the whole run ends by BUDGET_S seconds (default 560):
#   build   `python setup.py build_ext --inplace` with the machine's python and torch (CUDA kernels for
#           this GPU's arch only), under flock /tmp/barber-build.lock where flock exists
#   tests   pytest of the native ops (tests/test_mask_ops.py, tests/test_pack_ops.py: CPU and CUDA),
#           the CUDA perplexity test (tests/test_eval.py -k cuda) and tests/test_memory.py
#   stream  tools/bench/bench_stream.py: LLaMA-13B-shaped synthetic checkpoints of 2 and 4 blocks, 128 x 2048
#           calibration tokens, bfloat16 on cuda, plus a run under --max-gpu-memory 6GiB
#   ops     tools/bench/bench_ops.py --device cuda
#   tf32    the same 2-block prune with and without --allow-tf32: how many mask entries differ
#   sparse24  tools/bench/bench_sparse24.py: tokens/s of dense against 2:4 semi-structured linears (7B/13B shapes)
#   same    the same bytes on the GPU: micro-batches 1, 4 and 16 (batch invariance of the kernels,
#           docs/algorithm.md §10.3), and with two or more GPUs a 2-rank NCCL run against one process
# Results (flat, at most 8 files, as the device tool returns them) go to $OUT:
#   device_check.log (everything), env.txt, bench_stream.json, bench_ops.json, tf32.json, same_bytes.json,
#   summary.txt
#
# By hand, on any machine:
#     OUT=/tmp/dc bash tools/device_check.sh [--cpu] [--quick] [--steps build,tests,stream,ops,tf32,same,sparse24]
#   --cpu    run the steps on the CPU with small sizes (the CUDA parts are skipped; the tf32 step then only
#            exercises its code: TF32 does nothing on a CPU)
#   --quick  smaller benchmarks (fewer tokens and blocks)
#   PYTHON=... picks the interpreter (default: .venv/bin/python when present, else python3).
# Without --cpu and without a usable CUDA GPU it says so and exits 3 at once, running nothing.
# Exit status: 0 every step passed; 1 a step failed (see the log and summary.txt); 2 bad arguments; 3 no GPU.

set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
OUT="${OUT:-/tmp/barber-device-check}"
WORK="${WORK:-/tmp/barber-device-work}"
BUDGET_S="${BUDGET_S:-560}"
MODE=cuda
QUICK=0
STEPS="build,tests,stream,ops,tf32,same,sparse24"

usage() { sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) MODE=cpu ;;
        --quick) QUICK=1 ;;
        --steps) shift; STEPS="${1:-}" ;;
        --steps=*) STEPS="${1#--steps=}" ;;
        -h|--help) usage; exit 0 ;;
        *) echo "device_check: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for s in ${STEPS//,/ }; do
    case "$s" in build|tests|stream|ops|tf32|same|sparse24) ;; *) echo "device_check: unknown step: $s" >&2; exit 2 ;; esac
done

if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi

# ---- is there a GPU? (fast: nvidia-smi first, torch only when a driver answers) -------------------
if [ "$MODE" = cuda ]; then
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "device_check: no NVIDIA GPU on this machine (nvidia-smi is missing or finds no device); nothing was run." >&2
        echo "device_check: run it on a lent GPU machine, or add --cpu to run the CPU parts here." >&2
        exit 3
    fi
    if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
        echo "device_check: nvidia-smi sees a GPU but $PYTHON's torch cannot use it (CPU-only torch or driver mismatch); nothing was run." >&2
        exit 3
    fi
fi

mkdir -p "$OUT" "$WORK" || exit 2
LOG="$OUT/device_check.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
: >"$SUMMARY"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 MODE QUICK OUT WORK REPO PYTHON
START=$SECONDS
FAILED=0

note() { echo "[$(date -u +%H:%M:%S) +$((SECONDS - START))s] $*"; }
left() { echo $((BUDGET_S - (SECONDS - START))); }
# step NAME MAX_SECONDS CMD...: run with a timeout bounded by what is left; record the outcome.
step() {
    local name="$1" max="$2"; shift 2
    local remaining; remaining=$(left)
    local limit=$(( max < remaining - 5 ? max : remaining - 5 ))
    if [ "$limit" -lt 20 ]; then
        note "$name: SKIPPED (only ${remaining}s left)"; echo "$name: skipped (no time left)" >>"$SUMMARY"; return 0
    fi
    note "$name: start (limit ${limit}s): $*"
    local t0=$SECONDS
    if declare -F "$1" >/dev/null; then  # a function of this script: run it in a child bash
        timeout --kill-after=10 "$limit" bash -c "set -u -o pipefail; $(declare -f "$1"); $*"
    else
        timeout --kill-after=10 "$limit" "$@"
    fi
    local rc=$?
    local took=$((SECONDS - t0))
    if [ $rc -eq 0 ]; then
        note "$name: ok (${took}s)"; echo "$name: ok (${took}s)" >>"$SUMMARY"
    else
        [ $rc -eq 124 ] && note "$name: TIMED OUT after ${took}s" || note "$name: FAILED (exit $rc, ${took}s)"
        echo "$name: FAILED (exit $rc, ${took}s)" >>"$SUMMARY"; FAILED=1
    fi
    return 0
}
wants() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# ---- environment ---------------------------------------------------------------------------------
{
    echo "date: $(date -u)"; echo "mode: $MODE quick=$QUICK steps=$STEPS"; echo "repo: $REPO"
    echo "commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
    uname -a; nproc; free -g 2>/dev/null | head -2
    "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], sys.executable); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
    command -v nvcc >/dev/null && nvcc --version | tail -2
    command -v nvidia-smi >/dev/null && nvidia-smi
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# ---- build ---------------------------------------------------------------------------------------
build() {
    # In place, with this machine's python and torch (a venv made from a venv's python would not see the
    # parent venv's torch, and the image's python3 is one); tests and benchmarks then import ./barber.
    local arch=""
    if [ "$MODE" = cuda ]; then
        arch=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') || return 1
    fi
    local lock=()
    command -v flock >/dev/null && lock=(flock /tmp/barber-build.lock)
    env MAX_JOBS="${MAX_JOBS:-$(nproc)}" ${arch:+TORCH_CUDA_ARCH_LIST="$arch"} \
        $([ "$MODE" = cpu ] && echo BARBER_NO_CUDA=1) \
        "${lock[@]}" "$PYTHON" setup.py -q build_ext --inplace || return 1
    "$PYTHON" -c 'from barber import _native; print("native ops:", _native.available(), _native.build_info())'
}
if wants build; then
    step build 240 build
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c 'import barber' 2>/dev/null || { note "barber does not import with $PYTHON; stopping"; echo "import: FAILED" >>"$SUMMARY"; exit 1; }

# ---- tests ---------------------------------------------------------------------------------------
if wants tests; then
    files=()
    for f in tests/test_mask_ops.py tests/test_pack_ops.py tests/test_memory.py; do [ -f "$f" ] && files+=("$f"); done
    export BARBER_REQUIRE_NATIVE=1
    step tests 150 "$PYTHON" -m pytest -q -x -p no:cacheprovider "${files[@]}"
    if [ "$MODE" = cuda ] && [ -f tests/test_eval.py ]; then
        step tests-cuda-eval 60 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_eval.py -k cuda
    fi
fi

# ---- bench_stream --------------------------------------------------------------------------------
if wants stream; then
    if [ "$MODE" = cuda ]; then
        if [ $QUICK = 1 ]; then size=(--nsamples 32 --seqlen 2048 --blocks 2); else size=(--nsamples 128 --seqlen 2048 --blocks 2 4); fi
        step stream 270 "$PYTHON" tools/bench/bench_stream.py --model llama-13b "${size[@]}" --device cuda --dtype bfloat16 \
            --gpu-budget-check 6GiB --workdir "$WORK" --json "$OUT/bench_stream.json"
    else
        if [ $QUICK = 1 ]; then size=(--blocks 2 3); else size=(--blocks 2 4); fi
        step stream 270 "$PYTHON" tools/bench/bench_stream.py --model smollm2-135m "${size[@]}" --nsamples 4 --seqlen 64 \
            --device cpu --budget-check 2GiB --workdir "$WORK" --json "$OUT/bench_stream.json"
    fi
fi

# ---- bench_ops -----------------------------------------------------------------------------------
if wants ops; then
    quick=(); { [ $QUICK = 1 ] || [ "$MODE" = cpu ]; } && quick=(--quick)
    step ops 120 "$PYTHON" tools/bench/bench_ops.py --device "$MODE" "${quick[@]}" --json "$OUT/bench_ops.json"
fi

# ---- TF32: does it change the masks? -------------------------------------------------------------
tf32_check() {
    local dir="$WORK/tf32"
    rm -rf "$dir"; mkdir -p "$dir"
    local n=128 seqlen=2048 model=llama-13b
    [ $QUICK = 1 ] && n=32
    [ "$MODE" = cpu ] && n=4 seqlen=64 model=smollm2-135m  # exercises the code path; TF32 does nothing on a CPU
    "$PYTHON" tools/bench/make_synthetic_checkpoint.py --model $model --blocks 2 --out "$dir/ckpt" || return 1
    local calib
    calib=$("$PYTHON" -c 'import sys; sys.path.insert(0, "tools/bench"); from pathlib import Path; from bench_stream import calibration_text; print(calibration_text(Path(sys.argv[1]), int(sys.argv[2])))' "$dir/calib.txt" $((n * seqlen))) || return 1
    for flag in "" --allow-tf32; do
        local out="$dir/out${flag:+-tf32}"
        "$PYTHON" -c 'import sys; from barber.cli import stream_main; sys.exit(stream_main(sys.argv[1:]))' \
            --ckpt "$dir/ckpt" --out "$out" --calib "$calib" --nsamples "$n" --seqlen $seqlen --device "$MODE" \
            --dtype bfloat16 --no-progress $flag || return 1
    done
    "$PYTHON" - "$dir" "$OUT/tf32.json" "$n" "$seqlen" "$model" "$MODE" <<'EOF'
import json, sys
from pathlib import Path
from safetensors import safe_open
root, dest, n, seqlen, model, device = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
def tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as g:
            out.update({k: g.get_tensor(k) for k in g.keys() if ".layers." in k and k.endswith("proj.weight")})
    return out
a, b = tensors(root / "out"), tensors(root / "out-tf32")
per = {k: int(((a[k] != 0) != (b[k] != 0)).sum()) for k in sorted(a)}
total = sum(v.numel() for v in a.values())
ra, rb = (json.loads((root / d / "barber_report.json").read_text()) for d in ("out", "out-tf32"))
result = {
    "calibration": f"{n} x {seqlen} tokens", "dtype": "bfloat16", "model": f"{model} (random), 2 blocks",
    "device": device,
    "mask_entries_differing": sum(per.values()), "weights": total, "fraction": sum(per.values()) / total,
    "per_tensor": per,
    "seconds_fp32": ra["seconds"], "seconds_tf32": rb["seconds"],
    "swaps_fp32": ra["swaps"], "swaps_tf32": rb["swaps"],
}
dest.write_text(json.dumps(result, indent=2) + "\n")
print(f"TF32 changed {result['mask_entries_differing']} of {total} mask entries ({result['fraction']:.3e}); "
      f"gradient pass {ra['seconds'].get('gradient', 0):.1f} s -> {rb['seconds'].get('gradient', 0):.1f} s")
EOF
}
if wants tf32; then
    step tf32 150 tf32_check
fi

# ---- the same bytes: micro-batches, and NCCL ranks ----------------------------------------------
same_check() {
    local dir="$WORK/same"
    rm -rf "$dir"; mkdir -p "$dir"
    local n=32 seqlen=512 gpus=0
    [ "$MODE" = cpu ] && n=8 seqlen=64
    [ "$MODE" = cuda ] && gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
    "$PYTHON" tools/bench/make_synthetic_checkpoint.py --model smollm2-135m --blocks 3 --out "$dir/ckpt" || return 1
    local calib
    calib=$("$PYTHON" -c 'import sys; sys.path.insert(0, "tools/bench"); from pathlib import Path; from bench_stream import calibration_text; print(calibration_text(Path(sys.argv[1]), int(sys.argv[2])))' "$dir/calib.txt" $((n * seqlen))) || return 1
    local common=(--ckpt "$dir/ckpt" --calib "$calib" --nsamples "$n" --seqlen $seqlen --device "$MODE"
                  --dtype bfloat16 --sample-groups 4 --no-progress --recipe paper --rebuild-ratio 0.1)
    for mb in 1 4 16; do
        "$PYTHON" -m barber.stream "${common[@]}" --out "$dir/mb$mb" --batch-size $mb || return 1
    done
    if [ "$gpus" -ge 2 ]; then
        "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 -m barber.stream "${common[@]}" \
            --out "$dir/ranks2" || return 1
    fi
    "$PYTHON" - "$dir" "$OUT/same_bytes.json" "$gpus" <<'EOF'
import hashlib, json, sys
from pathlib import Path
root, dest, gpus = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
def digest(d):
    h = hashlib.sha256()
    for f in sorted(d.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()
runs = {d.name: digest(d) for d in sorted(root.iterdir()) if d.name.startswith(("mb", "ranks"))}
result = {"digests": runs, "identical": len(set(runs.values())) == 1, "gpus": gpus,
          "nccl_checked": "ranks2" in runs}
dest.write_text(json.dumps(result, indent=2) + "\n")
print("same bytes:", "yes" if result["identical"] else "NO", runs)
sys.exit(0 if result["identical"] else 1)
EOF
}
if wants same; then
    step same 150 same_check
fi

# ---- 2:4 semi-structured speed --------------------------------------------------------------------
if wants sparse24 && [ "$MODE" = cuda ]; then
    step sparse24 90 "$PYTHON" tools/bench/bench_sparse24.py --iters 20
fi

rm -rf "$WORK/tf32" "$WORK/same" "$WORK"/barber-bench-stream-* 2>/dev/null
note "done in $((SECONDS - START))s"
echo "total: $((SECONDS - START))s" >>"$SUMMARY"
cat "$SUMMARY"
exit $FAILED
