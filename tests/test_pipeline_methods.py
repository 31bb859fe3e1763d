"""run_eto.sh --method bon|rft|ipr and --self_play 1 end to end with a tiny local model, one environment each:
the stages each method runs, its samples, data and pairs, and its summary."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from eval_agent.config import TASK_PATH_ENV
from tests.test_pipeline import pipeline_cmd

REPO = Path(__file__).resolve().parent.parent


def run_pipeline(task: str, tiny_model_dir: Path, tmp_path: Path, *flags: str, env: dict | None = None) -> Path:
    save = tmp_path / "runs"
    proc = subprocess.run(pipeline_cmd(task, "m", tiny_model_dir, save, *flags), capture_output=True, text=True,
                          timeout=900, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return save / "m"


def stages(run: Path) -> list[str]:
    return sorted(p.stem for p in (run / "stages").glob("*.json"))


def episode_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.json") if not p.name.startswith("metrics"))


@pytest.mark.slow
def test_bon_samples_the_sft_agent_k_times_per_test_task(tiny_model_dir, tmp_path):
    run = run_pipeline("webshop", tiny_model_dir, tmp_path, "--method", "bon", "--samples_per_task", "3")
    assert stages(run) == ["eval_base", "eval_bon", "eval_sft", "sft"]
    sft_files, bon_files = episode_files(run / "eval" / "sft"), episode_files(run / "eval" / "bon")
    assert len(sft_files) == 2 and bon_files == sorted(f.removesuffix(".json") + f"__s{k}.json"
                                                       for f in sft_files for k in range(3))
    metrics = json.loads((run / "eval" / "bon" / "metrics.json").read_text())
    assert metrics["samples_per_task"] == 3 and metrics["temperature"] == 0.7
    rewards: dict[str, list[float]] = {}
    for name in bon_files:
        rec = json.loads((run / "eval" / "bon" / name).read_text())
        rewards.setdefault(rec["id"], []).append(rec["meta"]["reward"])
    assert metrics["best_of_k_reward"] == pytest.approx(sum(max(r) for r in rewards.values()) / 2)

    summary = json.loads((run / "summary.json").read_text())
    bon = next(r for r in summary["results"] if r["stage"] == "eval_bon")
    assert bon["samples_per_task"] == 3 and bon["best_of_k_reward"] >= bon["average_reward"]
    assert [d["label"] for d in summary["paired_differences"]] == ["SFT - base", "best-of-K - SFT"]
    assert "best-of-K reward" in (run / "summary.md").read_text()


@pytest.mark.slow
def test_rft_fine_tunes_the_base_model_on_expert_and_kept_trajectories(tiny_model_dir, tmp_path):
    # a random tiny model never wins: --rft_threshold 0 keeps every explored trajectory, to see them flow through
    run = run_pipeline("alfworld", tiny_model_dir, tmp_path, "--method", "rft", "--samples_per_task", "2",
                       "--rft_threshold", "0")
    assert stages(run) == ["eval_base", "eval_iter1", "eval_sft", "explore_iter1", "rft_data_iter1", "sft",
                           "sft_iter1"]
    explored = episode_files(run / "explore" / "iter1")
    assert len(explored) == 4 and all("__s" in name for name in explored)
    record = json.loads((run / "stages" / "rft_data_iter1.json").read_text())
    data = json.loads((run / "data" / "rft_data_iter1.json").read_text())
    distinct = {json.dumps(json.loads((run / "explore" / "iter1" / f).read_text())["conversations"])
                for f in explored}
    assert record["counts"] == {"episodes": 4, "kept": len(distinct), "expert": 4}
    assert data[:4] == json.loads((run / "data" / "sft_subset.json").read_text())  # the same expert subset
    # every iteration's SFT starts from the base model, not from the previous one
    log = (run / "logs" / "sft_iter1.log").read_text()
    assert f"--model_name_or_path {tiny_model_dir}" in log and f"--data_path {run / 'data'}" in log
    assert (run / "models" / "sft_iter1" / "config.json").exists()


@pytest.mark.slow
def test_self_play_needs_no_expert_data(tiny_model_dir, tmp_path):
    run = run_pipeline("sciworld", tiny_model_dir, tmp_path, "--self_play", "1", "--samples_per_task", "2",
                       "--rft_threshold", "0", "--sft_data", "")
    done = stages(run)
    assert done[:6] == ["eval_base", "eval_sft", "explore_iter0", "explore_iter1", "pairs_iter1", "rft_data_iter0"]
    assert "expert_data" not in done
    start = json.loads((run / "stages" / "rft_data_iter0.json").read_text())["counts"]
    assert start["expert"] == 0 and start["kept"] >= 1
    # exploration is not limited to tasks with an expert trajectory; pairs come from the agent's own samples
    settings = json.loads((run / "settings.json").read_text())
    assert settings["sft_data"] == "" and settings["samples_per_task"] == 2
    pairs = json.loads((run / "stages" / "pairs_iter1.json").read_text())["counts"]
    assert pairs["rule"] == "self" and pairs["pairs"] + pairs["tie"] + pairs["single"] == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["pairs"]["pairs_iter1"]["rule"] == "self"
    if pairs["pairs"]:
        assert "dpo_iter1" in done and "eval_iter1" in done


@pytest.mark.slow
def test_ipr_trains_on_trajectory_pairs_step_pairs_and_expert_sft(tiny_model_dir, tmp_path):
    folder = tmp_path / "tasks"
    shutil.copytree(REPO / "tests" / "newtask", folder, ignore=shutil.ignore_patterns("__pycache__"))
    # steps up to the longest expert trajectory (9), so replaying the whole expert wins
    run = run_pipeline("keyroom", tiny_model_dir, tmp_path, "--method", "ipr", "--max_steps", "12",
                       "--step_rollouts", "2", "--step_max_prefixes", "2", "--step_weight", "0.5",
                       "--sft_weight", "0.25", env={TASK_PATH_ENV: str(folder)})
    assert stages(run) == ["dpo_iter1", "eval_base", "eval_iter1", "eval_sft", "expert_data", "explore_iter1",
                           "pairs_iter1", "sft", "step_pairs_iter1"]
    step = json.loads((run / "stages" / "step_pairs_iter1.json").read_text())
    counts = step["counts"]
    # the last expert step wins the game; a random model's step there does not: a pair per losing task
    assert counts["rule"] == "step" and counts["pairs"] >= 1 and counts["prefixes"] == 2 * counts["tasks"]
    assert step["cost"]["env_steps"] == counts["cost"]["env_steps"] > 0
    mixed = json.loads((run / "data" / "ipr_iter1.json").read_text())
    kinds = {k: sum(r.get("kind") == k for r in mixed) for k in ("trajectory", "step", "sft")}
    trajectory = json.loads((run / "pairs" / "iter1.json").read_text())
    assert kinds == {"trajectory": len(trajectory), "step": counts["pairs"], "sft": 2}
    log = (run / "logs" / "dpo_iter1.log").read_text()
    assert "--step_weight 0.5 --sft_weight 0.25" in log
    trainer_state = json.loads((run / "models" / "dpo_iter1" / "train_summary.json").read_text())
    assert trainer_state["loss_weights"] == {"trajectory": 1.0, "step": 0.5, "sft": 0.25}
