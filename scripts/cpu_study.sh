#!/usr/bin/env bash
# The learning-effect study on this 2-core CPU: base -> SFT -> ETO (1 iteration) on ScienceWorld with the
# default model, in at most 150 minutes, resumable (rerun the same command). docs/results/README.md says
# why each setting was chosen and reports the result.
#
#   bash scripts/cpu_study.sh [save_path]        # default save_path: outputs (run folder outputs/cpu-study)
#
# 1. expert trajectories for 120 train tasks spread evenly over the 24 task types (gold-path replays);
# 2. run_eto.sh sciworld cpu-study: eval_base, SFT on 64 of them, eval, explore 16 of their tasks, pairs
#    (the original's rule), DPO, eval; every evaluation on the same 24 test tasks (one per type).
set -euo pipefail
cd "$(dirname "$0")/.."
SAVE=${1:-outputs}
PYTHON=${PYTHON:-python3}
EXPERT=data/sciworld_study_sft.json
# built once: a rerun keeps the file its finished stages were trained and paired with
[ -f "$EXPERT" ] || "$PYTHON" -m scripts.build_sciworld_sft --sample 120 --seed 0 --out "$EXPERT" --rebuild
bash run_eto.sh sciworld cpu-study "" "$SAVE" --sft_data "$EXPERT" "${@:2}"
