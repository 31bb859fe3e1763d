#!/usr/bin/env bash
# The whole ETO loop. Usage:
#   bash run_eto.sh <task> <exp_name> [model_path] [save_path] [--flags...]
#   bash run_eto.sh alfworld demo        # small budget on the embedded default model (CPU, < 30 min)
# <task>: webshop, sciworld, alfworld, or any task config found in ETO_TASK_PATH / --task_path DIR.
# Knobs (docs/knobs.md, or --help): flags, ETO_<KNOB> environment variables (e.g. ETO_GPUS=0,1), a YAML file of
# knob values given with --config FILE, and the presets in scripts/pipeline/presets/ (applied to a run of that name).
# Relative paths are the caller's. The entry point runs as a file (the same as `python -m scripts.eto_pipeline`
# from the repository root): that puts this repository's scripts/ first on the import path, never a scripts/
# folder in the caller's directory.
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/scripts/eto_pipeline.py" "$@"
