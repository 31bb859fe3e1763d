#!/usr/bin/env bash
# Does GRPO learn? The key room's easy layout (key and door in the starting room: "take key", "open door" win),
# a tiny local model given a weak start (SFT on the 8 expert trajectories), then 6 GRPO steps against the same
# loop with the update disabled (--rl_learning_rate 0), per seed from one shared start (--from_run).
#   bash docs/results/rl-keyroom/run.sh [WORK_DIR]      # ~45 min on a 2-core CPU; prints the per-step rewards
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../../.." && pwd)"
WORK="${1:-$REPO/outputs/rl-keyroom}"
mkdir -p "$WORK"
cd "$WORK"
if [ ! -f tasks/keyroom_here.yaml ]; then
  rm -rf tasks && cp -r "$REPO/tests/newtask" tasks && rm -rf tasks/__pycache__
  sed 's/^name: keyroom$/name: keyroom_here/; s/^loader_options: {}$/loader_options: {layout: here}/;
       s/keyroom_sft.json/keyroom_here_sft.json/; s/--out {path}/--config keyroom_here.yaml --out {path}/' \
    tasks/keyroom.yaml > tasks/keyroom_here.yaml
  (cd tasks && python build_keyroom_sft.py --config keyroom_here.yaml --out keyroom_here_sft.json)
fi
[ -f tiny/config.json ] || (cd "$REPO" && python -c "
from eval_agent.prompt import PROMPT_DIR
from fastchat.model.tiny import build_tiny_model
build_tiny_model('$WORK/tiny', corpus_dirs=[PROMPT_DIR])")
export ETO_TASK_PATH="$WORK/tasks" OMP_NUM_THREADS=2
COMMON=(--sft_samples 8 --sft_epochs 40 --sft_batch_size 4 --sft_per_device_batch_size 4 --sft_lr 3e-3
        --model_max_length 2048 --num_workers 8 --max_steps 4 --max_new_tokens 48 --test_tasks 4)
RL=(--method grpo --rl_steps 8 --rl_tasks_per_step 8 --samples_per_task 8 --temperature 1.0 --rl_batch_size 16
    --rl_per_device_batch_size 8 --eval_every 4)
for seed in 0 1; do
  bash "$REPO/run_eto.sh" keyroom_here start-s$seed "$WORK/tiny" "$WORK/runs" "${COMMON[@]}" --subset_seed $seed \
    --iterations 0 > start-s$seed.out 2>&1
  for arm in "grpo 3e-4" "zero 0"; do
    set -- $arm
    bash "$REPO/run_eto.sh" keyroom_here $1-s$seed "$WORK/tiny" "$WORK/runs" "${COMMON[@]}" "${RL[@]}" \
      --subset_seed $seed --rl_learning_rate $2 --from_run start-s$seed > $1-s$seed.out 2>&1
  done
done
python - "$WORK/runs" "$HERE/results.json" "$REPO" <<'PY'
import json, subprocess, sys
from pathlib import Path
runs, out, repo = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
result = {"command": "bash docs/results/rl-keyroom/run.sh",
          "commit": subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
          "runs": {}}
for run in sorted(p for p in runs.iterdir() if (p / "summary.json").is_file()):
    s = json.loads((run / "summary.json").read_text())
    result["runs"][run.name] = {
        "test_reward": {r["stage"]: r["average_reward"] for r in s["results"] if r["split"] == "test"},
        "steps": [{k: r.get(k) for k in ("step", "reward_mean", "reward_std", "success", "kl", "entropy",
                                        "clip_fraction", "eval_reward")} for r in s["rl_log"]]}
    print(run.name, "rollout reward per step:", [round(r["reward_mean"], 3) for r in s["rl_log"]])
out.write_text(json.dumps(result, indent=1) + "\n")
PY
