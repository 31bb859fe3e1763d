#!/usr/bin/env bash
# The learning-effect study at scale on one GPU (bf16): base -> SFT -> ETO (1 iteration) on ScienceWorld with the
# default model, all expert trajectories of the train split and the whole test split (211 tasks), aimed at
# <= 10 minutes on one H200 (16 CPU cores). Nothing is downloaded: it needs this repository, its installed
# Python packages (pip wheels may travel with it), Java 17+ for ScienceWorld, and models/ prepared by setup.sh.
#
#   bash scripts/gpu_study.sh [save_path] [extra run_eto.sh flags]     # run folder <save_path>/gpu-study
#
# Settings: the `gpu-study` preset, scripts/pipeline/presets/gpu-study.yaml (64 concurrent episodes on one batching
# worker, exploration of 256 train tasks spread over the task types, the original's global batch sizes). GPU 0 unless
# ETO_GPUS says otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
SAVE=${1:-outputs}
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu_study.sh: no CUDA GPU visible")'
java -version >/dev/null 2>&1 || { echo "gpu_study.sh: ScienceWorld needs Java 17+ on PATH" >&2; exit 1; }
EXPERT=data/sciworld_sft.json
WORKERS=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
# the whole train split's gold replays (1,483 tasks), once; a rerun resumes or keeps the finished file
[ -f "$EXPERT" ] || "$PYTHON" -m scripts.build_sciworld_sft --out "$EXPERT" --workers "$WORKERS" --rebuild
bash run_eto.sh sciworld gpu-study "" "$SAVE" --sft_data "$EXPERT" --gpus "${ETO_GPUS:-0}" "${@:2}"
