"""The episode loop, result files, resume and metrics of eval_agent, on the real ScienceWorld env.

The agent here is `ScriptedAgent`, our own implementation of the agent interface that replays
fixed answers per task (and raises the agent errors the loop must survive).
"""
from __future__ import annotations

import json
import os
import threading

import pytest

from eval_agent.agents.base import Agent, ContextOverflowError, ModelError
from eval_agent.config import load_task_config
from eval_agent.main import metrics_filename, parse_args, run
from eval_agent.prompt import build_messages
from eval_agent.runner import EnvPool, compute_metrics, is_complete, run_episode, task_filename
from eval_agent.tasks.base import Task, shard
from fastchat.records import OK_REPLY, write_json_atomic

# ScienceWorld ends the episode with a negative score: the original's "success", not solved
WRONG_FOCUS = "Thought: I will focus on the door.\nAction: focus on door"


class ScriptedAgent(Agent):
    """Answers from `script[key]` for the task whose text contains `key`; step n gets answer n
    (the last one repeats). An exception in the list is raised. The step is read from the
    messages, so one agent serves concurrent episodes."""

    def __init__(self, script: dict[str, list], prompt_len: int, default: list | None = None):
        # prompt_len: messages before the task text (instruction, OK, the example turns)
        super().__init__("scripted")
        self.script, self.prompt_len, self.default = script, prompt_len, default
        self.calls: list[list[dict[str, str]]] = []
        self._lock = threading.Lock()

    def __call__(self, messages):
        with self._lock:
            self.calls.append([dict(m) for m in messages])
        task_text = messages[self.prompt_len]["content"]
        answers = next((a for key, a in self.script.items() if key in task_text), self.default)
        assert answers is not None, f"no script for task {task_text[:80]!r}"
        step = sum(m["role"] == "assistant" for m in messages[self.prompt_len:])
        answer = answers[min(step, len(answers) - 1)]
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture(scope="module")
def sciworld():
    pytest.importorskip("scienceworld")
    cfg = load_task_config("sciworld")
    return cfg, cfg.instruction_text(), cfg.icl_messages()


@pytest.fixture(scope="module")
def envs(sciworld):
    """One ScienceWorld JVM for the episode tests of this module."""
    pool = EnvPool(sciworld[0])
    yield pool
    pool.close_all()


def _prompt_len(icl_messages, icl_num=1):
    return 2 + (len(icl_messages) if icl_num else 0)


def test_episode_replaying_gold_actions_succeeds_and_records_turns(sciworld, envs):
    cfg, instruction, icl = sciworld
    task = cfg.make_loader().load("dev")[5]  # find-plant: a short gold path
    env = envs.acquire(task)
    gold = env.gold_actions()
    envs.release(env, healthy=True)
    answers = [f"Thought: step {i}.\nAction: {a}" for i, a in enumerate(gold)]
    agent = ScriptedAgent({"": answers}, _prompt_len(icl))
    record = run_episode(cfg, task, agent, 1, instruction, icl, envs=envs)

    meta = record["meta"]
    assert record["id"] == task.id
    assert meta["success"] and meta["finished"] and meta["reward"] == 1.0
    assert meta["terminate_reason"] == "success" and 0 < meta["steps"] <= len(gold)
    steps = meta["steps"]
    assert meta["step_outcomes"] == ["ran"] * steps  # the gold path: every action carried out
    assert meta["reset_score"] <= meta["step_scores"][0]
    turns = record["conversations"]
    assert [t["value"] for t in turns[:2]] == [instruction, OK_REPLY]
    task_text = turns[2]["value"]
    # the model saw the 1-shot example; the record leaves it out and alternates gpt/human turns
    assert agent.calls[0] == build_messages(instruction, icl, task_text, 1)
    assert [t["from"] for t in turns[3:]] == ["gpt", "human"] * (steps - 1) + ["gpt"]
    assert [t["value"] for t in turns[3::2]] == answers[:steps]
    assert all(t["value"].startswith("Observation:") for t in turns[4::2])
    assert all(icl_turn["content"] not in [t["value"] for t in turns[3:]] for icl_turn in icl[1:] if
               icl_turn["role"] == "assistant")


def test_agent_errors_end_the_episode_with_a_reason(sciworld, envs):
    cfg, instruction, icl = sciworld
    task = cfg.make_loader().load("test")[0]
    overflow = ScriptedAgent({"": ["Action: look around", ContextOverflowError("too long")]}, _prompt_len(icl))
    record = run_episode(cfg, task, overflow, 1, instruction, icl, envs=envs)
    meta = record["meta"]
    assert meta["terminate_reason"] == "context_overflow" and meta["steps"] == 1 and not meta["success"]
    assert is_complete(record)  # a result of the model, kept by reruns

    broken = ScriptedAgent({"": [ModelError("connection refused")]}, _prompt_len(icl, icl_num=0))
    record = run_episode(cfg, task, broken, 0, instruction, icl, envs=envs)
    assert record["meta"]["terminate_reason"] == "model_error: connection refused"
    assert len(broken.calls[0]) == 3  # icl_num 0: instruction, OK, task
    assert not is_complete(record)

    buggy = ScriptedAgent({"": [KeyError("choices")]}, _prompt_len(icl))
    reason = run_episode(cfg, task, buggy, 1, instruction, icl, envs=envs)["meta"]["terminate_reason"]
    assert reason == "model_error: KeyError: 'choices'"


def _args(tmp_path, *extra):
    return parse_args(["--exp_config", "sciworld", "--split", "test", "--output_path", str(tmp_path),
                       "--max_tasks", "3", *extra])


def test_run_writes_results_and_a_rerun_redoes_only_failed_tasks(sciworld, envs, tmp_path):
    cfg, _, icl = sciworld
    prompt_len = _prompt_len(icl)
    tasks = cfg.make_loader().load("test")[:3]
    # the tasks are "boil lead", "boil tin", "boil tin" (variations 21-23)
    first = ScriptedAgent({"boil lead": [ModelError("worker died")],
                           "boil tin": ["Action: look around", WRONG_FOCUS]}, prompt_len)
    assert run(_args(tmp_path), agent=first, envs=envs) == 1  # an infrastructure failure

    files = {t.id: tmp_path / task_filename(t.id) for t in tasks}
    assert all(p.exists() for p in files.values())
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    lead, tin, tin2 = (json.loads(files[t.id].read_text()) for t in tasks)
    assert lead["meta"]["terminate_reason"] == "model_error: worker died"
    assert tin["meta"]["steps"] == tin2["meta"]["steps"] == 2 and tin["meta"]["terminate_reason"] == "success"
    assert {k: tin["meta"][k] for k in ("split", "task_config", "model_name", "icl_num")} == \
        {"split": "test", "task_config": "sciworld", "model_name": "scripted", "icl_num": 1}
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_tasks"] == 3 and metrics["num_infrastructure_failures"] == 1
    assert metrics["infrastructure_failures"] == {"model_error": 1}
    assert metrics["terminate_reasons"] == {"model_error": 1, "success": 2}
    assert (metrics["num_success"], metrics["num_solved"]) == (2, 0)  # the wrong focuses

    kept = {i: files[i].read_text() for i in (tasks[1].id, tasks[2].id)}
    second = ScriptedAgent({"": [WRONG_FOCUS]}, prompt_len)
    assert run(_args(tmp_path), agent=second, envs=envs) == 0
    assert len(second.calls) == 1  # only the failed task was played again
    assert all(files[i].read_text() == text for i, text in kept.items())
    lead = json.loads(files[tasks[0].id].read_text())["meta"]
    assert lead["terminate_reason"] == "success" and lead["reward"] < 0  # a wrong focus first: its score stays
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_infrastructure_failures"] == 0 and metrics["success_rate"] == 1.0
    # the negative reward is averaged as it is
    rewards = [json.loads(f.read_text())["meta"]["reward"] for f in files.values()]
    assert metrics["average_reward"] == pytest.approx(sum(rewards) / 3) and metrics["average_reward"] < 0

    # --override replays finished tasks; --part_num/--part_idx shard before --max_tasks
    third_agent = ScriptedAgent({"": [ContextOverflowError("full")]}, prompt_len)
    assert run(_args(tmp_path, "--override", "--part_num", "2", "--part_idx", "1"), agent=third_agent,
               envs=envs) == 0
    second_half = shard(cfg.make_loader().load("test"), 2, 1)[:3]
    assert len(third_agent.calls) == 3
    assert all(json.loads((tmp_path / task_filename(t.id)).read_text())["meta"]["terminate_reason"] ==
               "context_overflow" for t in second_half)
    assert json.loads((tmp_path / metrics_filename(2, 1)).read_text())["num_tasks"] == 3


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "task.json"
    write_json_atomic(path, {"meta": {"finished": True}})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"meta": object()})
    assert json.loads(path.read_text()) == {"meta": {"finished": True}}
    assert os.listdir(tmp_path) == ["task.json"]


def test_metrics_average_over_all_tasks_of_the_shard():
    def rec(reward, success, reason):
        return {"meta": {"reward": reward, "success": success, "steps": 4, "finished": True,
                         "terminate_reason": reason}}

    records = [rec(1.0, True, "success"), rec(0.5, False, "max_steps"), rec(0.25, False, "model_error: timeout"),
               None]
    m = compute_metrics(records, num_tasks=4)
    assert m["average_reward"] == pytest.approx((1.0 + 0.5 + 0.25) / 4)
    assert m["success_rate"] == pytest.approx(1 / 4)
    assert m["num_missing"] == 1 and m["num_infrastructure_failures"] == 1
    assert m["failure_examples"] == {"model_error": "model_error: timeout"}
    assert m["terminate_reasons"] == {"max_steps": 1, "model_error": 1, "success": 1}


def test_env_exception_ends_the_episode_not_the_run(sciworld, envs):
    cfg, instruction, icl = sciworld
    bad = Task("sciworld-no-such-task-0", "test", {"task_name": "no-such-task", "variation": 0})
    record = run_episode(cfg, bad, ScriptedAgent({"": [WRONG_FOCUS]}, 2), 1, instruction, icl, envs=envs)
    assert record["meta"]["terminate_reason"].startswith("env_error: ValueError")
    assert record["meta"]["finished"] and not is_complete(record)


def test_bad_configs_exit_with_status_2_naming_the_file(tmp_path, caplog):
    from eval_agent.main import main

    assert main(["--exp_config", "no-such-benchmark", "--output_path", str(tmp_path)]) == 2
    assert "no-such-benchmark.yaml not found" in caplog.text
    bad = tmp_path / "agent.json"
    bad.write_text("{not json")
    assert main(["--exp_config", "sciworld", "--agent_config", str(bad), "--output_path", str(tmp_path)]) == 2
    assert f"{bad}: not valid JSON" in caplog.text
    with pytest.raises(SystemExit):
        parse_args(["--part_num", "2", "--part_idx", "2"])


def test_unencodable_model_output_ends_no_more_than_its_episode(sciworld, envs, tmp_path):
    """A lone surrogate, NUL and a terminal escape in an answer: the simulator gets a safe action, the episode
    file is written (and reads back to the same text), the run finishes with its metrics."""
    cfg, _, icl = sciworld
    broken = "Thought: \ud800\x00 hm\x1b[31m\nAction: look \ud800around\x00"
    agent = ScriptedAgent({"": [broken, WRONG_FOCUS]}, _prompt_len(icl))
    assert run(_args(tmp_path, "--max_tasks", "1"), agent=agent, envs=envs) == 0
    task = cfg.make_loader().load("test")[0]
    record = json.loads((tmp_path / task_filename(task.id)).read_text(encoding="utf-8"))
    assert record["conversations"][3]["value"] == broken  # stored as the model said it
    assert record["conversations"][4]["value"] == "Observation: No known action matches that input."
    assert record["meta"]["terminate_reason"] == "success" and record["meta"]["steps"] == 2
    assert json.loads((tmp_path / "metrics.json").read_text())["num_tasks"] == 1
