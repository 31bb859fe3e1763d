"""Adding a task touches only the task's own files: configs in any folder on --task_path / $ETO_TASK_PATH
are discovered by eval_agent.main, run_eto.sh and the pair builder, and the whole loop runs on them.
The new task is tests/newtask/ (the key room game of docs/adding-a-task.md, whose shown config tests/test_docs.py
checks), copied outside the repository."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eval_agent import main as eval_main
from eval_agent.config import TASK_CONFIG_DIR, TASK_PATH_ENV, ConfigError, discover_tasks, load_task_config
from eval_agent.paths import data_dir
from scripts import construct_preference, eto_pipeline
from scripts.pipeline.stages import Pipeline
from tests.test_pipeline import pipeline_cmd

REPO = Path(__file__).resolve().parent.parent
NEW_TASK = REPO / "tests" / "newtask"
BUILT_IN = ["alfworld", "sciworld", "webshop"]


@pytest.fixture(autouse=True)
def no_task_path(monkeypatch):
    monkeypatch.delenv(TASK_PATH_ENV, raising=False)


def new_task_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tasks"
    shutil.copytree(NEW_TASK, folder, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def test_built_in_tasks_are_the_yaml_files_only():
    assert (TASK_CONFIG_DIR / "TEMPLATE.md").is_file()
    assert sorted(discover_tasks()) == BUILT_IN


def test_a_task_in_another_folder_loads_its_own_modules_and_prompt(tmp_path, monkeypatch):
    folder = new_task_folder(tmp_path)
    monkeypatch.setenv(TASK_PATH_ENV, os.pathsep + str(folder))  # an empty entry is skipped
    cfg = load_task_config("keyroom")
    assert cfg.path == folder / "keyroom.yaml"
    assert cfg.resolve(cfg.instruction) == folder / "keyroom_instruction.txt"
    assert cfg.icl_messages()[-1]["content"].endswith("Action: open door")
    tasks = cfg.make_loader().load("test")
    env = cfg.env_class()(tasks[0], max_steps=cfg.max_steps)
    assert env.reset().startswith("Your task is to open the vault door.")
    assert cfg.expert_data_path() == folder / "keyroom_sft.json"
    assert cfg.expert_build_command() == [sys.executable, "build_keyroom_sft.py", "--out",
                                          str(folder / "keyroom_sft.json")]


def test_help_and_unknown_names_list_the_discovered_tasks(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv(TASK_PATH_ENV, str(new_task_folder(tmp_path)))
    listing = "alfworld, keyroom, sciworld, webshop"
    for parse in (eval_main.parse_args, lambda argv: eto_pipeline.parse_args(["keyroom", "exp", *argv]),
                  construct_preference.main):
        with pytest.raises(SystemExit):
            parse(["--help"])
        assert listing in " ".join(capsys.readouterr().out.split())

    assert eval_main.main(["--exp_config", "nosuch", "--output_path", str(tmp_path / "out")]) == 2
    assert "nosuch.yaml not found" in caplog.text and listing in caplog.text
    with pytest.raises(SystemExit):
        eto_pipeline.parse_args(["nosuch", "exp"])
    assert listing in capsys.readouterr().err


def test_task_path_flag_finds_the_task_everywhere(tmp_path, monkeypatch):
    folder = new_task_folder(tmp_path)
    args = eto_pipeline.parse_args(["keyroom", "exp", str(tmp_path / "model"), str(tmp_path / "runs"),
                                    "--task_path", str(folder)])
    assert args.sft_data == str(folder / "keyroom_sft.json")  # the config's expert_data.path
    assert Pipeline(args).env[TASK_PATH_ENV] == str(folder)  # stages find it by name too
    # the pair builder applies the task's rule: expert rounds + 2
    expert = {"id": "t", "reward": 1.0, "conversations": [
        {"from": "human", "value": "i"}, {"from": "gpt", "value": "OK"}, {"from": "human", "value": "task"},
        {"from": "gpt", "value": "Action: look"}]}
    explored = tmp_path / "explore"
    explored.mkdir()
    (explored / "t.json").write_text(json.dumps({**expert, "meta": {"reward": 0.0, "terminate_reason": "max_steps"}}))
    (tmp_path / "expert.json").write_text(json.dumps([expert]))
    assert construct_preference.main(["--explore_dir", str(explored), "--expert_path", str(tmp_path / "expert.json"),
                                      "--output_path", str(tmp_path / "pairs.json"), "--task", "keyroom",
                                      "--task_path", str(folder)]) == 0
    assert json.loads((tmp_path / "pairs.json").read_text())[0]["rejected_cap_rounds"] == 1 + 2


def test_two_configs_with_one_name_name_both_files(tmp_path, monkeypatch):
    first, second = new_task_folder(tmp_path / "a"), new_task_folder(tmp_path / "b")
    monkeypatch.setenv(TASK_PATH_ENV, str(first))
    with pytest.raises(ConfigError, match=re.escape(f"{second / 'keyroom.yaml'} and {first / 'keyroom.yaml'}")):
        load_task_config("keyroom", [second])
    shutil.copy(TASK_CONFIG_DIR / "webshop.yaml", first / "webshop.yaml")
    both = f"{TASK_CONFIG_DIR / 'webshop.yaml'} and {first / 'webshop.yaml'}"
    with pytest.raises(ConfigError, match=re.escape(both)):
        load_task_config("alfworld")


def test_built_in_expert_data_comes_from_the_configs(tmp_path, monkeypatch):
    monkeypatch.setenv("ETO_DATA_DIR", str(tmp_path))
    for task in BUILT_IN:
        cfg = load_task_config(task)
        assert cfg.expert_data_path() == data_dir() / f"{task}_sft.json"
        assert cfg.expert_build_command() == [sys.executable, str(REPO / "scripts" / f"build_{task}_sft.py"), "--out",
                                              str(data_dir() / f"{task}_sft.json")]
    args = eto_pipeline.parse_args(["webshop", "exp", str(tmp_path / "model"), str(tmp_path / "runs")])
    assert args.sft_data == str(tmp_path / "webshop_sft.json")
    args = eto_pipeline.parse_args(["webshop", "exp", str(tmp_path / "model"), str(tmp_path / "runs"),
                                    "--sft_data", "/elsewhere/sft.json"])
    assert args.sft_data == "/elsewhere/sft.json"  # --sft_data still wins


@pytest.mark.parametrize("edit, message", [
    (("name", "other"), "field 'name' is 'other'; it must be the file name, 'keyroom'"),
    (("instruction", "missing.txt"), "field 'instruction': missing.txt is in neither"),
    (("expert_data", {"path": "{nope}/x.json", "build": "true"}), "field 'expert_data.path'.*placeholders"),
    (("expert_data", {"path": "x.json"}), "field 'expert_data' must be a mapping with the keys 'path' and 'build'"),
])
def test_malformed_new_config_names_the_file_and_field(tmp_path, edit, message):
    import yaml

    folder = new_task_folder(tmp_path)
    raw = yaml.safe_load((folder / "keyroom.yaml").read_text())
    raw[edit[0]] = edit[1]
    (folder / "keyroom.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=re.escape(str(folder / "keyroom.yaml")) + ": " + message):
        load_task_config("keyroom", [folder])


def _repo_state() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
def test_new_task_outside_the_repository_runs_eval_and_the_whole_loop(tiny_model_dir, tmp_path):
    before = _repo_state()
    folder = new_task_folder(tmp_path)
    # Python's bytecode caches are not the task's doing; anything else written under the repository is
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}

    # eval_agent.main with a stand-in agent that plays the expert: the task is found and winnable
    proc = subprocess.run([sys.executable, "-m", "eval_agent.main", "--agent_config",
                           str(folder / "keyroom_agent.json"), "--exp_config", "keyroom", "--task_path", str(folder),
                           "--split", "test", "--output_path", str(tmp_path / "eval")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (metrics["num_tasks"], metrics["success_rate"], metrics["average_reward"]) == (4, 1.0, 1.0)

    # the whole loop, the task found through $ETO_TASK_PATH; its expert data built by its config's command
    save = tmp_path / "runs"
    proc = subprocess.run(pipeline_cmd("keyroom", "tiny", tiny_model_dir, save), capture_output=True, text=True,
                          timeout=900, cwd=tmp_path, env={**env, TASK_PATH_ENV: str(folder)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = save / "tiny"
    assert sorted(p.stem for p in (run / "stages").glob("*.json")) == sorted(
        ["expert_data", "eval_base", "sft", "eval_sft", "explore_iter1", "pairs_iter1", "dpo_iter1", "eval_iter1"])
    experts = json.loads((folder / "keyroom_sft.json").read_text())
    assert len(experts) == 8 and {r["reward"] for r in experts} == {1.0}

    # pairs follow the config's rule: a losing trajectory is capped at the expert's rounds + 2
    rounds = {r["id"]: sum(t["from"] == "gpt" for t in r["conversations"][3:]) for r in experts}
    pairs = json.loads((run / "pairs" / "iter1.json").read_text())
    lost = [p for p in pairs if p["outcome"] == "lose"]
    assert lost, "a random tiny model should fail where the expert wins"
    assert all(p["rejected_cap_rounds"] == rounds[p["id"]] + 2 for p in lost)

    summary = json.loads((run / "summary.json").read_text())
    assert [r["stage"] for r in summary["results"]] == ["eval_base", "eval_sft", "explore_iter1", "eval_iter1"]
    assert summary["pairs"]["pairs_iter1"]["pairs"] == len(pairs)
    assert (run / "summary.md").exists() and (run / "summary.png").exists()

    assert _repo_state() == before, "running a new task changed files under the repository"


def test_success_reward_reaches_the_env_and_bad_values_are_refused(tmp_path):
    from eval_agent.runner import EnvPool

    config = Path(__file__).resolve().parent / "newtask" / "keyroom.yaml"
    text = config.read_text()
    folder = tmp_path / "tasks"
    shutil.copytree(config.parent, folder)
    (folder / "keyroom.yaml").write_text(text + "\nsuccess_reward: 0.5\n")
    cfg = load_task_config(folder / "keyroom.yaml")
    task = cfg.make_loader().load("test")[0]
    env = EnvPool(cfg).acquire(task)
    assert env.success_reward == 0.5
    (folder / "keyroom.yaml").write_text(text + "\nsuccess_reward: 2\n")
    with pytest.raises(ConfigError, match="keyroom.yaml: field 'success_reward' must be a number in"):
        load_task_config(folder / "keyroom.yaml")
