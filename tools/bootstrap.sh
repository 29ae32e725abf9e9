#!/usr/bin/env bash
# Sets up everything barber needs on a fresh clone, idempotently:
#   .venv with torch (the local CPU wheel torch==2.13.0 unless a torch is already there),
#   the runtime, asset and test dependencies, barber itself (native extension built
#   with --no-build-isolation so pip never fetches a second torch), GoogleTest for the
#   C++ tests, and the real assets (SmolLM2-135M, Wikipedia and Botchan text) in
#   $BARBER_CACHE (default ~/.cache/barber).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
pipq() { "$VPY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "bootstrap: installing torch==2.13.0"
  pipq torch==2.13.0
fi
"$VPY" -c "import torch" || { echo "bootstrap: torch failed to install" >&2; exit 1; }
echo "bootstrap: installing dependencies"
pipq setuptools wheel ninja pybind11 numpy safetensors tokenizers sentencepiece tqdm matplotlib \
     gguf mwparserfromhell pytest hypothesis transformers accelerate psutil ruff lm-eval

if [ ! -f /usr/include/gtest/gtest.h ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "bootstrap: installing GoogleTest (libgtest-dev)"
  (apt-get update -qq && apt-get install -y -qq libgtest-dev cmake) >/dev/null 2>&1 \
    || echo "bootstrap: warning: could not install libgtest-dev; C++ tests will not build" >&2
fi

echo "bootstrap: building barber"
MAX_JOBS=${MAX_JOBS:-2} "$VPY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 \
  | grep -E "^barber build:|rror" || true
"$VPY" -c "import torch, barber._C" || { echo "bootstrap: the native extension failed to build" >&2; exit 1; }

"$VPY" -m barber.fetch
echo "bootstrap: ready"
