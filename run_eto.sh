#!/usr/bin/env bash
# The whole ETO loop. Usage:
#   bash run_eto.sh <task> <exp_name> [model_path] [save_path] [--flags...]
#   bash run_eto.sh alfworld demo        # small budget on the embedded default model (CPU, < 30 min)
# <task>: webshop, sciworld, alfworld, or any task config found in ETO_TASK_PATH / --task_path DIR.
# Knobs are flags or environment variables: python scripts/eto_pipeline.py --help
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/scripts/eto_pipeline.py" "$@"
