"""ALFWorld: env (real games through textworld), task splits, prompt config, SFT builder."""
from __future__ import annotations

import json
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from eval_agent.config import load_task_config
from eval_agent.envs.alfworld_env import (
    BANNER,
    ERROR_INPUT_OBSERVATION,
    AlfWorldEnv,
    first_observation,
    format_observation,
    match_command,
    task_text,
)
from eval_agent.paths import alfworld_data_dir, eto_split_dir
from eval_agent.tasks.alfworld import TASK_TYPES, AlfWorldLoader
from eval_agent.tasks.base import Task, shard
from scripts import build_alfworld_sft

# a small kitchen game: the expert cleans an apple and puts it on the diningtable in 7 actions
GAME = ("json_2.1.1/train/pick_clean_then_place_in_recep-Apple-None-DiningTable-4/"
        "trial_T20190908_104413_450768/game.tw-pddl")


@pytest.fixture(scope="module")
def loader():
    return AlfWorldLoader()


@pytest.fixture(scope="module")
def train(loader):
    return loader.load("train")


def make_env(task=None, **options) -> AlfWorldEnv:
    task = task or Task("alfworld-test", "train", {"game_file": GAME, "task_type": "pick_clean_then_place_in_recep"})
    return AlfWorldEnv(task, **{"max_steps": 40, **options})


def expert_turns(task) -> list[dict]:
    return json.loads((alfworld_data_dir() / task.data["game_file"]).with_name("gt_traj.json").read_text())


# -- splits and sharding --------------------------------------------------------------------

def test_splits_have_the_documented_counts_and_portable_stable_ids(loader, train):
    dev, test = loader.load("dev"), loader.load("test")
    assert (len(train), len(dev), len(test)) == (3321, 140, 134)  # train: the games the original explores
    assert {t.data["task_type"] for t in train} == set(TASK_TYPES)
    for task in train[:3] + dev[:3] + test[:3]:
        game = Path(task.data["game_file"])
        assert not game.is_absolute() and (alfworld_data_dir() / game).exists()
        assert task.id == "alfworld-" + "-".join(game.parent.parts[-3:])
    assert [t.id for t in loader.load("test")] == [t.id for t in test]  # stable
    # test = valid_unseen = ETO's 134 unseen games
    eto_ids = set((eto_split_dir() / "alfworld" / "gamefile_id.txt").read_text().split())
    assert {"/".join(Path(t.data["game_file"]).parent.parts[-2:]) for t in test} == eto_ids
    with pytest.raises(ValueError, match="unknown split"):
        loader.load("valid")


def test_shards_are_disjoint_and_cover_the_split(loader):
    tasks = loader.load("dev")
    parts = [shard(tasks, 3, i) for i in range(3)]
    ids = [t.id for part in parts for t in part]
    assert len(ids) == len(set(ids)) == len(tasks)
    assert ids == [t.id for t in tasks]


def test_task_config_prompt_and_example():
    cfg = load_task_config("alfworld")
    assert cfg.max_steps == 40 and cfg.env_class() is AlfWorldEnv
    instruction = cfg.instruction_text()
    for grammar in ("go to <recep>", "take <obj> from <recep>", "put <obj> in/on <recep>", "use <obj>",
                    "clean <obj> with <recep>", "heat <obj> with <recep>", "cool <obj> with <recep>"):
        assert grammar in instruction
    example = cfg.icl_messages()
    assert example[0]["role"] == "user" and example[-1]["role"] == "assistant"  # the task follows it
    assert all(m["content"].startswith("Thought: ") and "\nAction: " in m["content"]
               for m in example if m["role"] == "assistant")
    assert all(m["content"].startswith("Observation: ") for m in example[2::2])


# -- the environment ---------------------------------------------------------------------

def test_observation_format_and_command_matching():
    intro = f"{BANNER}\n\nYou are in the middle of a room.\n\nYour task is to: x."
    assert first_observation(intro) == "You are in the middle of a room.\nYour task is to: x."  # the env's
    assert task_text(intro) == "You are in the middle of a room.\n\nYour task is to: x."  # expert records'
    assert format_observation("You arrive at loc 12. The drawer 1 is closed.") == "Observation: The drawer 1 is closed."
    admissible = ["go to desk 1", "put mug 1 in/on desk 1"]
    assert match_command("Go to  Desk 1.", admissible) == "go to desk 1"
    assert match_command("put mug 1 on desk 1", admissible) == "put mug 1 in/on desk 1"
    assert match_command("fly away", admissible) == "fly away"


def replay(task) -> tuple[str, list[str], float, str]:
    turns = expert_turns(task)
    env = make_env(task)
    try:
        first = env.reset()
        mismatches = []
        for i in range(1, len(turns), 2):
            obs, reward, done, _ = env.step(f"Thought: next step.\nAction: {turns[i]['value']}")
            if obs != format_observation(turns[i + 1]["value"]):
                mismatches.append(f"{task.id} step {i // 2}: {obs!r}")
            if done:
                break
        return first, mismatches, env.state.reward, env.state.terminate_reason
    finally:
        env.close()


@pytest.mark.slow
def test_expert_replay_wins_on_30_games_of_all_6_types(train):
    by_type = defaultdict(list)
    for task in train:
        by_type[task.data["task_type"]].append(task)
    picked = []
    for kind in TASK_TYPES:  # 5 games per type, spread over the split, short enough for CI
        short = [t for t in by_type[kind][::7] if len(expert_turns(t)) <= 31]
        picked += short[:: max(1, len(short) // 5)][:5]
    assert len(picked) == 30
    with ThreadPoolExecutor(2) as pool:  # each env has its own game process
        results = list(pool.map(replay, picked))
    for task, (first, mismatches, reward, reason) in zip(picked, results):
        assert first == first_observation(expert_turns(task)[0]["value"]), task.id
        assert not mismatches, mismatches[:3]  # the env shows exactly what the SFT data stores
        assert (reward, reason) == (1.0, "success"), task.id


def test_bad_outputs_get_clear_observations_and_count_as_steps():
    env = make_env()
    try:
        assert "Your task is to: put a clean apple in diningtable." in env.reset()
        assert env.step("I am not sure what to do")[0] == ERROR_INPUT_OBSERVATION
        assert env.step("")[0] == ERROR_INPUT_OBSERVATION
        assert env.step("x" * 10_000)[0] == ERROR_INPUT_OBSERVATION
        obs, reward, done, info = env.step("Thought: try.\nAction: fly to the moon")
        assert obs == "Observation: Nothing happens." and info["action"] == "fly to the moon"
        assert info["outcome"] == "rejected"  # what the behaviour table counts
        obs, reward, done, info = env.step("Thought: " + "y" * 10_000 + "\nAction: go to sinkbasin 1")
        assert obs.startswith("Observation: On the sinkbasin 1, you see") and info["outcome"] == "ran"
        assert env.state.steps == 5 and not done and reward == 0.0 and not env.state.finished
    finally:
        env.close()


def test_step_limit_ends_the_episode_with_max_steps():
    env = make_env(max_steps=3)
    try:
        env.reset()
        dones = [env.step("Action: look")[2] for _ in range(3)]
        assert dones == [False, False, True]
        assert (env.state.terminate_reason, env.state.success, env.state.reward) == ("max_steps", False, 0.0)
    finally:
        env.close()


def test_timeouts_and_a_dead_game_end_the_episode_and_the_next_one_runs():
    env = make_env(reset_timeout=0.001)
    first = env.reset()
    assert "did not answer the reset" in first
    assert env.state.finished and env.state.terminate_reason == "reset_timeout" and not env.state.success
    env.close()

    env = make_env(step_timeout=0.001)
    env.reset()
    obs, reward, done, _ = env.step("Action: go to sinkbasin 1")
    assert done and reward == 0.0 and env.state.terminate_reason == "step_timeout" and "did not answer" in obs
    env.close()

    env = make_env()
    env.reset()
    env._worker.process.kill()  # the game process dies mid-episode
    obs, _, done, _ = env.step("Action: go to sinkbasin 1")
    assert done and env.state.terminate_reason == "env_error" and "game failed" in obs
    env.close()

    env = make_env()  # the run goes on
    env.reset()
    assert env.step("Action: go to sinkbasin 1")[0].startswith("Observation: On the sinkbasin 1")
    env.close()


# -- expert trajectories --------------------------------------------------------------------

def test_sft_builder_writes_true_records_in_the_env_format(tmp_path, train):
    out = tmp_path / "alfworld_sft.json"
    assert build_alfworld_sft.main(["--limit", "40", "--out", str(out), "--rebuild"]) == 0
    records = json.loads(out.read_text())
    assert len(records) >= 30
    instruction = load_task_config("alfworld").instruction_text()
    ids = {t.id for t in train}
    for r in records:
        assert r["id"] in ids and r["reward"] == 1.0 and (alfworld_data_dir() / r["game_file"]).exists()
        turns = r["conversations"]
        assert [t["value"] for t in turns[:2]] == [instruction, "OK"]
        assert BANNER not in turns[2]["value"] and "Your task is to:" in turns[2]["value"]
        assert all(t["from"] == "gpt" and t["value"].startswith("Thought: ") and "\nAction: " in t["value"]
                   for t in turns[3::2])
        assert all(t["from"] == "human" and t["value"].startswith("Observation: ") for t in turns[4::2])
        assert turns[-1]["from"] == "gpt"


def test_sft_thoughts_follow_the_state():
    expert = build_alfworld_sft.Expert("pick_two_obj_and_place",
                                       {"object_target": "Pen", "parent_target": "Drawer", "toggle_target": ""})
    assert "find a pen" in expert.thought("go to desk 1", "")
    assert "There is no pen" in expert.thought("close drawer 2", "You open the drawer 2. In it, you see a cd 1.")
    assert "There is a pen 1" in expert.thought("take pen 1 from desk 1", "On the desk 1, you see a pen 1.")
    assert "take the pen 1 to the drawer 1" in expert.thought("go to drawer 1", "")
    assert "still need another" in expert.thought("put pen 1 in/on drawer 1", "")
    assert "find another pen" in expert.thought("go to shelf 1", "")
    expert.thought("take pen 2 from shelf 1", "On the shelf 1, you see a pen 2.")
    assert "completes the task" in expert.thought("put pen 2 in/on drawer 1", "")
    assert expert.reached_goal()
