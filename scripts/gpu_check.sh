#!/usr/bin/env bash
# GPU check, about 5 minutes on one GPU with nothing downloadable: the whole loop on the default model in bf16
# (SFT and DPO steps, the HF worker on CUDA with batching behind a controller, evaluation and exploration through
# eval_agent.main), then serving and training tokens/s. Exits non-zero on any failure.
#
#   bash scripts/gpu_check.sh [save_path]          # run folder <save_path>/gpu-check (default outputs)
#   ETO_GPUS=1 bash scripts/gpu_check.sh           # on GPU 1 (default 0)
#
# --small: the check that fits one 10-minute run on the lent GPU machine (no models/, no data/, no fastapi there):
# installs the wheel bundle (.gpu-bundle/, python -m scripts.gpu_bundle) into a temporary target, then runs
# python -m scripts.gpu_check (its docstring lists the steps); everything it measures goes to OUT_DIR.
#   bash scripts/gpu_check.sh --small OUT_DIR [--device cpu] [--model DIR] [flags of python -m scripts.gpu_check]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ "${1:-}" = "--small" ]; then
  shift
  if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash scripts/gpu_check.sh --small OUT_DIR [--device cpu] [flags of python -m scripts.gpu_check]" >&2
    exit 2
  fi
  if ! compgen -G ".gpu-bundle/wheels/*.whl" >/dev/null; then
    echo "[gpu-check] no wheel bundle (.gpu-bundle/wheels): using the packages installed here"
  elif ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    echo "[gpu-check] the wheel bundle is for Python 3.12, this is $("$PYTHON" -V 2>&1): using the packages installed here"
  else
    SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-site.XXXXXX")
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$SITE" .gpu-bundle/wheels/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "[gpu-check] wheel bundle installed into $SITE"
  fi
  exec "$PYTHON" -m scripts.gpu_check "$@"
fi
SAVE=${1:-outputs}
"$PYTHON" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA GPU visible")
print(f"[gpu-check] {torch.cuda.get_device_name(0)}, torch {torch.__version__}, bf16 {torch.cuda.is_bf16_supported()}")
PY
[ -f data/alfworld_sft.json ] || { echo "gpu_check.sh: data/alfworld_sft.json missing: run setup.sh" >&2; exit 1; }
bash run_eto.sh alfworld gpu-check "" "$SAVE" --restart --gpus "${ETO_GPUS:-0}" --iterations 1 --eval_base 0 \
    --sft_samples 64 --sft_epochs 1 --sft_batch_size 16 --sft_per_device_batch_size 8 --model_max_length 2048 \
    --test_tasks 16 --train_tasks 16 --max_steps 10 --num_workers 16 --worker_batch_size 16 \
    --dpo_batch_size 8 --dpo_per_device_batch_size 4 --dpo_epochs 1
"$PYTHON" - "$SAVE/gpu-check" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
for stage in ("sft", "dpo_iter1"):
    s = json.loads((run / "models" / stage / "train_summary.json").read_text())
    rate = s["tokens_per_epoch"] * s["epochs"] / s["train_runtime_s"]
    print(f"[gpu-check] {stage}: {rate:.0f} training tokens/s, peak CUDA {s.get('peak_cuda_mib', 0):.0f} MiB")
for stage in ("eval_sft", "explore_iter1", "eval_iter1"):
    rec = json.loads((run / "stages" / f"{stage}.json").read_text())
    cost = rec.get("cost") or {}
    tokens = cost.get("completion_tokens")
    rate = f"{tokens / rec['seconds']:.0f} generated tokens/s" if tokens else "tokens not reported"
    print(f"[gpu-check] {stage}: {rec['metrics']['num_tasks']} episodes in {rec['seconds']:.0f} s, {rate}, "
          f"average reward {rec['metrics']['average_reward']:.3f}")
PY
echo "[gpu-check] OK"
