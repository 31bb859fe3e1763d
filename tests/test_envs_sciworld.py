"""ScienceWorld env, task loader, prompt and expert-data script, on the real simulator (JVM).

All env tests share one env (one JVM) through a module-scoped fixture; the episode rules are checked against the
package's own ScienceWorldEnv API (a second JVM), driven the way the original ETO drives it.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from eval_agent.config import ConfigError, load_task_config
from eval_agent.envs.base import INVALID_FORMAT_OBSERVATION, TOO_LONG_OBSERVATION
from eval_agent.envs.sciworld_env import ScienceWorldEnv, simplification_string, without_task_header
from eval_agent.tasks.base import Task, shard
from eval_agent.tasks.sciworld import SciWorldTaskLoader
from scripts import build_sciworld_sft

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def loader():
    return SciWorldTaskLoader()


@pytest.fixture(scope="module")
def env():
    e = ScienceWorldEnv(Task("probe", "train", {"task_name": "find-animal", "variation": 0}), max_steps=100)
    yield e
    e.close()


@pytest.fixture(scope="module")
def package():
    """The package's env, as the original's main.py makes it."""
    from scienceworld import ScienceWorldEnv as PackageEnv

    e = PackageEnv("", envStepLimit=200)
    yield e
    e.close()


def _task(name, variation, **extra):
    return Task(f"t-{name}-{variation}", "train", {"task_name": name, "variation": variation, **extra})


def _package_reset(package, name, variation):
    """The original's SciWorldEnv.reset(): load, then the package's reset(); returns its info."""
    package.load(name, variation, simplification_string(name), generateGoldPath=False)
    _, info = package.reset()
    return info


# Cheap types that get a second variation, so the replay covers 30 variations.
_SECOND_VARIATION = ("find-plant", "find-non-living-thing", "use-thermometer", "lifespan-longest-lived",
                     "lifespan-shortest-lived", "measure-melting-point-known-substance")


def _replay_cases():
    """One train variation of every task type the splits have (24), plus a second one of 6 cheap types."""
    by_type: dict[str, list[int]] = {}
    for t in SciWorldTaskLoader().load("train"):
        by_type.setdefault(t.data["task_name"], []).append(t.data["variation"])
    cases = [(name, vs[0]) for name, vs in by_type.items()]
    return cases + [(name, by_type[name][1]) for name in _SECOND_VARIATION]


REPLAY_CASES = _replay_cases()


def test_replay_cases_cover_all_task_types_of_the_splits(loader):
    split_types = {t.data["task_name"] for split in ("train", "dev", "test") for t in loader.load(split)}
    assert {name for name, _ in REPLAY_CASES} == split_types and len(split_types) == 24
    assert len(set(REPLAY_CASES)) >= 30


@pytest.mark.slow
@pytest.mark.parametrize("task_name,variation", REPLAY_CASES, ids=[f"{n}-{v}" for n, v in REPLAY_CASES])
def test_gold_path_replay_scores_one(env, task_name, variation):
    """The simulator's expert, as the SFT build plays it, wins in our env. The simulator draws a
    new gold path per generation and some draws fail (freeze-9 failed 3 in a row once), so up to 8 are tried; per path the shortened
    version (teleports) first, then the raw one."""  # noqa: E501
    # A generous limit: this checks the env's scoring, not ETO's step limits.
    env.switch_task(_task(task_name, variation, max_steps=10_000))
    shorten = build_sciworld_sft.shorten_gold_path
    for _ in range(8):
        gold = env.gold_actions()
        for actions in (shorten(gold), gold):
            first = env.reset()
            assert first.startswith("Task Description:\nYour task is to")
            for action in actions:
                observation, reward, done, info = env.step(f"Thought: following the gold path.\nAction: {action}")
                assert observation.startswith("Observation: ") and info["valid_format"]
                if done:
                    break
            if env.state.reward == 1.0:
                break
        if env.state.reward == 1.0:
            break
    assert env.state.success and env.state.terminate_reason == "success"
    assert env.state.reward == 1.0 and env.simulator.server.getCompleted()


def test_bad_model_output_keeps_episode_going(env):
    env.switch_task(_task("find-animal", 0))
    env.reset()
    outputs = ["%%$#@ garbage !!", "", "Thought: let me try.\nAction: fly to the moon", "z" * 10_000,
               "Action: " + "z" * 600, "Thought: hm.\nAction:   "]  # the last: no "Action: " once stripped
    expected = [INVALID_FORMAT_OBSERVATION, INVALID_FORMAT_OBSERVATION,
                "Observation: No known action matches that input.", INVALID_FORMAT_OBSERVATION,
                TOO_LONG_OBSERVATION, INVALID_FORMAT_OBSERVATION]
    outcomes = ["invalid_format", "invalid_format", "rejected", "invalid_format", "not_run", "invalid_format"]
    for i, (output, want, outcome) in enumerate(zip(outputs, expected, outcomes), 1):
        observation, reward, done, info = env.step(output)
        assert (observation, info["outcome"]) == (want, outcome)
        # the unknown action reports the simulator's score (the reset's look-around scored); the next answer
        # without "Action:" sets it back to 0, and the over-long action (not run) leaves it there
        want_reward = env.simulator.server.getScore() if i == 3 else 0.0
        assert (env.state.steps, done, reward) == (i, False, want_reward)
    # A long thought before a valid action is fine: the action is still executed.
    observation, _, done, info = env.step("w" * 10_000 + "\nAction: look around")
    assert info["action"] == "look around" and observation.startswith("Observation: This room is called")
    assert info["outcome"] == "ran"
    assert env.state.steps == 7 and not done
    # The original executes the text after the *first* "Action:", to the end of the answer.
    observation, _, _, info = env.step("Thought: x\nAction: look around\nAction: inventory")
    assert info["action"] == "look around\nAction: inventory"
    assert observation == "Observation: No known action matches that input." and info["outcome"] == "rejected"
    observation, _, _, info = env.step("Action: open door")  # several doors: the simulator asks which
    assert observation.startswith("Observation: Ambiguous request:") and info["outcome"] == "rejected"


def test_step_limit_ends_episode(env):
    env.switch_task(_task("find-animal", 0, max_steps=3))
    env.reset()
    for _ in range(2):
        assert env.step("Action: look around")[2] is False
    _, reward, done, _ = env.step("Action: look around")
    assert done and env.state.terminate_reason == "max_steps" and not env.state.success
    with pytest.raises(RuntimeError):
        env.step("Action: look around")


def test_task_step_limit_wins_over_config_fallback(env):
    env.switch_task(_task("find-animal", 0, max_steps=15))
    assert env.max_steps == 15
    env.switch_task(_task("find-animal", 0))
    assert env.max_steps == 100  # the constructor's max_steps


def test_first_observation_is_the_packages_task_desc(env, package):
    """The original's first observation is info["taskDesc"] of the package's reset(), header and all."""
    for name, variation in (("find-animal", 0), ("boil", 3), ("measure-melting-point-known-substance", 326)):
        env.switch_task(_task(name, variation))
        first = env.reset()
        want = _package_reset(package, name, variation)["taskDesc"]
        assert first == want and want.startswith("Task Description:\nYour task is to")
        assert env.task_description() == want[len("Task Description:\n"):].strip()  # the expert records' form


def test_reset_plays_the_look_around_move(env, package):
    """After reset the world is the package's after its reset(): the move "look around" taken (in the simulator's
    action history; it scores the goal of being in the start room), and the same answers to what follows."""
    env.switch_task(_task("find-animal", 0))
    env.reset()
    _package_reset(package, "find-animal", 0)
    ours, theirs = env.simulator.server, package.server
    assert list(ours.getActionHistory()) == list(theirs.getActionHistory()) == ["look around"]
    assert ours.getScore() == theirs.getScore() > 0  # 0 after load() alone
    assert ours.getNumMoves() == theirs.getNumMoves()
    for action in ("teleport to kitchen", "look around", "pick up thermometer", "wait1", "inventory"):
        observation, _, _, _ = env.step(f"Action: {action}")
        text, _, _, info = package.step(action)
        assert observation == f"Observation: {text}"
        assert (env.state.reward, ours.getNumMoves()) == (theirs.getScore(), info["moves"])  # ETO's raw_score


def test_server_reset_after_load_rebuilds_the_same_world(package):
    """Why our reset skips the package's server.reset(): after load() it rebuilds the very same world."""
    def play(server_reset: bool) -> list:
        package.load("boil", 3, simplification_string("boil"))
        if server_reset:
            package.server.reset()
        out = []
        for action in ("look around", "teleport to kitchen", "look around", "open fridge", "wait1", "inventory"):
            out += [package.server.step(action), package.server.getScore(), package.server.getNumMoves()]
        return out + [sorted(package.server.getValidActionObjectCombinations())]

    assert play(False) == play(True)


def test_header_strip_is_construct_preferences():
    text = "Task Description:\nYour task is to boil water. \n"
    assert without_task_header(text) == text[len("Task Description:\n"):].strip() == "Your task is to boil water."
    assert without_task_header(" Your task is to boil water.") == "Your task is to boil water."  # no header: kept


def test_trailing_period_is_sent_as_it_is(env, package):
    env.switch_task(_task("find-animal", 0))
    env.reset()
    _package_reset(package, "find-animal", 0)
    observation, *_ = env.step("Thought: I look.\nAction: look around.")
    assert env.state.steps == 1
    assert observation == f"Observation: {package.step('look around.')[0]}"
    assert observation == "Observation: No known action matches that input."


def test_reward_resets_on_invalid_format_then_follows_the_raw_score(env):
    """The original: an answer without "Action: " sets the reward to 0; the next scored step sets it to the
    simulator's score when that is higher."""
    env.switch_task(_task("find-animal", 0))
    env.reset()
    server = env.simulator.server
    env.step("Action: teleport to kitchen")
    raised = server.getScore()
    assert env.state.reward == raised > 0
    assert env.step("I am not sure what to do.")[1] == 0.0
    _, reward, done, _ = env.step("Action: look around")  # no goal reached: the score stays
    assert server.getScore() == raised and reward == raised and not done


def test_wrong_focus_first_is_a_negative_success(env, package):
    """A wrong focus ends the episode, which the original calls a success; as the first scored step its score
    (-1) is the episode's reward."""
    env.switch_task(_task("find-animal", 0))
    env.reset()
    _package_reset(package, "find-animal", 0)
    _, reward, done, _ = env.step("Thought: the air.\nAction: focus on air")
    _, _, completed, info = package.step("focus on air")
    assert completed and info["score"] == -100  # the package's end of episode
    assert done and reward == -1.0
    assert env.state.success and env.state.terminate_reason == "success"


def test_wrong_focus_after_progress_keeps_the_best(env):
    env.switch_task(_task("find-animal", 0))
    env.reset()
    env.step("Action: teleport to kitchen")
    progress = env.state.reward
    assert progress > 0
    _, reward, done, _ = env.step("Action: focus on air")
    assert env.simulator.server.getScore() == -1.0
    assert done and env.state.success and env.state.terminate_reason == "success"
    assert reward == progress


def test_move_count_past_env_step_limit_ends_the_episode(env):
    """The original's main.py sets envStepLimit=200: more simulator moves than that end the episode ("success")."""
    assert env.env_step_limit == 200
    env.switch_task(_task("find-animal", 0))
    env.reset()
    env.env_step_limit = 5
    try:
        _, _, done, _ = env.step("Action: teleport to kitchen")
        assert not done and env.simulator.server.getNumMoves() <= 5
        _, _, done, _ = env.step("Action: wait")  # ten moves
        assert env.simulator.server.getNumMoves() > 5 and not env.simulator.server.getCompleted()
        assert done and env.state.success and env.state.terminate_reason == "success"
    finally:
        env.env_step_limit = 200


_ONE_STEP_AND_EXIT = """
import logging
logging.basicConfig(level=logging.INFO)  # as eval_agent.main: py4j's shutdown messages reach stderr
from eval_agent.envs.sciworld_env import ScienceWorldEnv
from eval_agent.tasks.base import Task
env = ScienceWorldEnv(Task("t", "train", {"task_name": "find-animal", "variation": 0}), max_steps=5)
env.reset()
env.step("Action: look around")
"""


@pytest.mark.parametrize("close", [True, False], ids=["closed", "left-open"])
def test_exit_prints_no_traceback(close):
    """A closed env is not closed again by the package's __del__ (py4j logged two tracebacks at exit)."""
    code = textwrap.dedent(_ONE_STEP_AND_EXIT) + ("env.close()\n" if close else "")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "Callback Server Shutting Down" in proc.stderr  # the log this checks is on
    assert "Traceback" not in proc.stderr, proc.stderr


def _used(env) -> set[str]:
    return {x.strip() for x in env.simulator.get_simplifications_used().split(",") if x.strip()}


def test_easy_simplification_is_the_originals(env):
    """scienceworld 1.1.3's "easy" (ETO's setup): teleport, open doors, self-watering pots, and no electrical
    actions except in power-component / conductivity tasks; containers stay closed."""
    env.switch_task(_task("boil", 0))
    env.reset()
    assert _used(env) == {"teleportAction", "openDoors", "selfWateringFlowerPots", "noElectricalAction"}
    env.switch_task(_task("power-component", 0))
    env.reset()
    assert _used(env) == {"teleportAction", "openDoors", "selfWateringFlowerPots"}
    env.switch_task(_task("chemistry-mix-paint-secondary-color", 3))
    env.reset()
    env.step("Action: teleport to art studio")
    assert "The large cupboard door is closed" in env.step("Action: look around")[0]


def test_open_containers_is_an_opt_in():
    e = ScienceWorldEnv(_task("chemistry-mix-paint-secondary-color", 3), max_steps=10, open_containers=True)
    try:
        e.reset()
        assert "openContainers" in _used(e)
        e.step("Action: teleport to art studio")
        assert "The large cupboard door is open" in e.step("Action: look around")[0]
    finally:
        e.close()
    assert "openContainers" not in simplification_string("boil")
    assert "openContainers" in simplification_string("boil", open_containers=True)


def test_icl_example_is_a_real_successful_episode(env):
    """Every action of our 1-shot example plays in the env and yields the shown observation."""
    cfg = load_task_config("sciworld")
    messages = cfg.icl_messages()
    env.switch_task(_task("find-plant", 7))
    env.reset()
    assert env.task_description() == messages[0]["content"]
    assert messages[-1]["role"] == "assistant"  # the task message follows it in the prompt
    shown = [m["content"] for m in messages[2::2]] + [None]
    for answer, expected in zip(messages[1::2], shown):
        assert answer["content"].startswith("Thought: ")
        observation, *_ = env.step(answer["content"])
        if expected is not None:
            assert observation == expected
    assert env.state.success


def test_close_stops_the_jvm():
    e = ScienceWorldEnv(_task("find-animal", 0), max_steps=5)
    e.reset()
    process = e.simulator._gateway.java_process
    e.close()
    process.wait(timeout=30)
    assert process.poll() is not None


def test_splits_ids_and_data(loader):
    sizes = {split: len(loader.load(split)) for split in ("train", "dev", "test")}
    assert sizes == {"train": 1483, "dev": 194, "test": 211}
    test_ids = {t.id for t in loader.load("test")}
    assert not test_ids & {t.id for t in loader.load("dev")}
    limits = json.loads((loader.split_dir / "max_steps.json").read_text())
    for t in loader.load("dev"):
        assert t.id == f"sciworld-{t.data['task_name']}-{t.data['variation']}"
        assert t.data["max_steps"] == limits[t.data["eto_task_name"]]
        assert "(" not in t.id and " " not in t.id
    with pytest.raises(ValueError, match="unknown split"):
        loader.load("valid")


def test_sharding_is_disjoint_and_complete(loader):
    tasks = loader.load("test")
    shards = [shard(tasks, 4, i) for i in range(4)]
    ids = [t.id for s in shards for t in s]
    assert len(ids) == len(set(ids)) == len(tasks)
    assert ids == [t.id for t in tasks]


def test_malformed_split_file_names_file_and_item(tmp_path, loader):
    for name in ("train_indices.json", "max_steps.json"):
        (tmp_path / name).write_text((loader.split_dir / name).read_text())
    (tmp_path / "dev_indices.json").write_text(json.dumps([["task-1-boil", 3], ["task-1-boil"]]))
    with pytest.raises(ValueError, match=r"dev_indices.json: item 1"):
        SciWorldTaskLoader(split_dir=str(tmp_path)).load("dev")
    with pytest.raises(FileNotFoundError, match="test_indices.json"):
        SciWorldTaskLoader(split_dir=str(tmp_path)).load("test")


@pytest.mark.parametrize("field,value,message", [
    ("max_steps", "many", "field 'max_steps' must be int"),
    ("env", None, "missing required field 'env'"),
    ("env", "eval_agent.envs.sciworld_env:NoSuchEnv", "field 'env': cannot import"),
])
def test_malformed_config_names_the_field(tmp_path, field, value, message):
    import yaml

    raw = yaml.safe_load((REPO / "eval_agent/configs/task/sciworld.yaml").read_text())
    if value is None:
        del raw[field]
    else:
        raw[field] = value
    path = tmp_path / "sciworld.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message):
        load_task_config(path).env_class()


def test_thought_templates_describe_the_action():
    script = build_sciworld_sft
    assert script.make_thought("pick up thermometer") == "I need the thermometer, so I pick it up."
    assert "option 1" in script.make_thought("1")
    assert script.shorten_gold_path(
        ["open door to kitchen", "go to kitchen", "go to hallway", "look around", "go to art studio"]
    ) == ["teleport to hallway", "look around", "teleport to art studio"]


@pytest.mark.slow
def test_build_script_writes_successful_records(tmp_path):
    out = tmp_path / "sw.json"
    assert build_sciworld_sft.main(["--limit", "2", "--workers", "1", "--out", str(out), "--rebuild"]) == 0
    records = json.loads(out.read_text())
    assert records and not (tmp_path / ".tmp" / "sw.json.partial.jsonl").exists()
    for r in records:
        turns = r["conversations"]
        assert r["reward"] == 1.0 and r["id"].startswith("sciworld-")
        assert [t["from"] for t in turns[:3]] == ["human", "gpt", "human"] and turns[1]["value"] == "OK"
        assert turns[2]["value"].startswith("Your task is to")  # no "Task Description:" header, as ETO's data
        assert all(t["value"].startswith("Thought: ") and "\nAction: " in t["value"] for t in turns[3::2])
        assert all(t["value"].startswith("Observation: ") for t in turns[4::2])
