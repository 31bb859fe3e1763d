"""The RL data builder (scripts/rl_data.py) on hand-written episode files: one record per usable episode, the
advantages and returns of each method per gpt turn, the stats, and bad input refused."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fastchat.records import PROMPT_TURNS
from scripts.rl_data import main

REPO = Path(__file__).resolve().parent.parent
HALL = "Observation: You are in the hall."


def episode(tid: str, sample: int, reward: float, steps: list[tuple[str, str | None]], **meta) -> dict:
    """steps: (answer, the observation after it, None when the episode ended on it)."""
    turns = [{"from": "human", "value": "Instruction."}, {"from": "gpt", "value": "OK"},
             {"from": "human", "value": f"Task {tid}."}]
    for answer, observation in steps:
        turns.append({"from": "gpt", "value": answer})
        if observation is not None:
            turns.append({"from": "human", "value": observation})
    return {"id": tid, "conversations": turns,
            "meta": {"reward": reward, "sample": sample, "steps": len(steps), "terminate_reason": "done", **meta}}


def explore_dir(tmp_path: Path) -> Path:
    """Task t1: K=4 usable samples with rewards 1, 0, 0, 1 and a fifth ended by an env crash; task t2: two samples
    with reward 0 (their group has identical rewards)."""
    go = "Thought: the hall first.\nAction: go to hall"
    episodes = [
        episode("t1", 0, 1.0, [(go, HALL), ("Action: take key", "Observation: You take the key."),
                               ("Action: open door", None)], policy_versions=[2, 3]),
        # ended by the context limit: the conversation ends on an observation
        episode("t1", 1, 0.0, [(go, HALL), ("Action: look", HALL)], terminate_reason="context_overflow"),
        episode("t1", 2, 0.0, [("Action: look", "Observation: Nothing happens."), ("Action: look", None)],
                terminate_reason="max_steps"),
        # the same first action, in other words: the same state after it, another history
        episode("t1", 3, 1.0, [("Thought: go.\nAction: go to hall", HALL), ("Action: open door", None)]),
        episode("t1", 4, 0.0, [(go, None)], terminate_reason="env_error: RuntimeError: simulator died"),
        episode("t2", 0, 0.0, [("Action: look", None)]),
        episode("t2", 1, 0.0, [("Action: look", None)]),
    ]
    folder = tmp_path / "rollout_step1"
    folder.mkdir()
    for ep in episodes:
        (folder / f"{ep['id']}__s{ep['meta']['sample']}.json").write_text(json.dumps(ep))
    (folder / "metrics.json").write_text(json.dumps({"average_reward": 0.3}))
    return folder


def build(tmp_path: Path, *flags: str) -> tuple[dict, dict]:
    out = tmp_path / "rl_step1.json"
    assert main(["--explore_dir", str(explore_dir(tmp_path)), "--output_path", str(out), *flags]) == 0
    records = {(r["id"], r["sample"]): r for r in json.loads(out.read_text())}
    return records, json.loads((tmp_path / "rl_step1.stats.json").read_text())


def test_grpo_records_stats_and_one_advantage_per_gpt_turn(tmp_path):
    records, stats = build(tmp_path, "--method", "grpo", "--eps", "0")
    assert sorted(records) == [("t1", 0), ("t1", 1), ("t1", 2), ("t1", 3), ("t2", 0), ("t2", 1)]  # no crash
    folder = tmp_path / "rollout_step1"
    for (tid, k), rec in records.items():
        stored = json.loads((folder / f"{tid}__s{k}.json").read_text())
        assert rec["conversations"] == stored["conversations"] and rec["group"] == tid
        gpt_turns = sum(t["from"] == "gpt" for t in rec["conversations"][PROMPT_TURNS:])
        assert len(rec["advantages"]) == len(rec["returns"]) == gpt_turns
    # t1: rewards 1, 0, 0, 1 -> +1, -1, -1, +1 at every step; t2: equal rewards -> 0
    assert records["t1", 0]["advantages"] == [1.0, 1.0, 1.0]
    assert records["t1", 1]["advantages"] == records["t1", 2]["advantages"] == [-1.0, -1.0]
    assert records["t1", 3]["advantages"] == [1.0, 1.0]
    assert records["t2", 0]["advantages"] == records["t2", 1]["advantages"] == [0.0]
    assert records["t1", 0]["returns"] == [1.0, 1.0, 1.0] and records["t1", 1]["returns"] == [0.0, 0.0]  # gamma 1
    assert records["t1", 0]["policy_version"] == 3 and records["t1", 1]["policy_version"] is None
    assert stats == {"method": "grpo", "gamma": 1.0, "eps": 0.0, "episodes": 6, "skipped": 1, "groups": 2,
                     "groups_identical_rewards": 1, "mean_reward": pytest.approx(1 / 3),
                     "std_reward": pytest.approx(math.sqrt(2 / 9)), "mean_steps": pytest.approx(11 / 6),
                     "episodes_with_context": 0, "policy_versions": [3], "episodes_zero_advantages": 2}


def test_gigpo_adds_the_step_advantage_of_the_observation_group(tmp_path):
    records, stats = build(tmp_path, "--method", "gigpo", "--gamma", "0.5", "--eps", "0")
    # step returns (final reward at the last step, gamma 0.5): s0 .25 .5 1; s1 0 0; s2 0 0; s3 .5 1
    # task state: (.25, 0, 0, .5): mean 3/16, std sqrt(11)/16 -> 1, -3, -3, 5 over sqrt(11)
    # the hall: s0 .5, s1 0, s3 1 -> 0, -sqrt(1.5), +sqrt(1.5); "take key" state and "Nothing happens": alone -> 0
    r11, r = math.sqrt(11), math.sqrt(1.5)
    assert records["t1", 0]["advantages"] == pytest.approx([1 + 1 / r11, 1.0, 1.0])
    assert records["t1", 1]["advantages"] == pytest.approx([-1 - 3 / r11, -1 - r])
    assert records["t1", 2]["advantages"] == pytest.approx([-1 - 3 / r11, -1.0])
    assert records["t1", 3]["advantages"] == pytest.approx([1 + 5 / r11, 1 + r])
    assert records["t2", 0]["advantages"] == [0.0]
    assert records["t1", 0]["returns"] == [0.25, 0.5, 1.0]
    assert (stats["step_weight"], stats["state_key"], stats["gamma"]) == (1.0, "observation", 0.5)
    # step groups: t1's task, hall, key, nothing; t2's task; shared: 4 task steps + 3 hall steps + 2 of t2
    assert (stats["step_groups"], stats["steps_in_shared_step_groups"]) == (5, 9)


def test_gigpo_history_key_and_step_weight(tmp_path):
    records, _ = build(tmp_path, "--method", "gigpo", "--gamma", "0.5", "--eps", "0", "--state_key", "history",
                       "--step_weight", "0.5")
    # s3 reached the hall after other words than s0 and s1: by history its hall step is alone (0); s0 and s1's
    # hall steps (.5, 0) -> +1, -1. The first step's group is the same as by observation.
    r11 = math.sqrt(11)
    assert records["t1", 0]["advantages"] == pytest.approx([1 + 0.5 / r11, 1 + 0.5, 1.0])
    assert records["t1", 1]["advantages"] == pytest.approx([-1 - 1.5 / r11, -1 - 0.5])
    assert records["t1", 3]["advantages"] == pytest.approx([1 + 2.5 / r11, 1.0])


def test_ppo_placeholders_and_discounted_returns(tmp_path):
    records, stats = build(tmp_path, "--method", "ppo", "--gamma", "0.5")
    assert records["t1", 0]["advantages"] == [0.0, 0.0, 0.0] and records["t1", 0]["returns"] == [0.25, 0.5, 1.0]
    assert records["t1", 3]["returns"] == [0.5, 1.0] and records["t2", 0]["returns"] == [0.0]
    assert "episodes_zero_advantages" not in stats


def test_step_rewards_are_the_rises_of_the_recorded_step_scores(tmp_path):
    """With meta step_scores (the env's reward after each step) a step's reward is the rise over it: a score that
    grows mid-episode (ScienceWorld) pays where it grows, and a reset to 0 (an answer without Action:) costs."""
    folder = tmp_path / "rollout"
    folder.mkdir()
    steps = [("Action: a", "Observation: 1"), ("Action: b", "Observation: 2"), ("Bad", "Observation: 3"),
             ("Action: c", None)]
    ep = episode("t1", 0, 0.5, steps, step_scores=[0.25, 0.75, 0.0, 0.5])
    (folder / "t1.json").write_text(json.dumps(ep))
    out = tmp_path / "rl.json"
    assert main(["--explore_dir", str(folder), "--output_path", str(out), "--method", "ppo", "--gamma", "1.0"]) == 0
    [record] = json.loads(out.read_text())
    # rewards 0.25, 0.5, -0.75, 0.5: returns from the end
    assert record["returns"] == [0.5, 0.25, -0.25, 0.5]


def test_run_as_documented(tmp_path):
    out = tmp_path / "rl.json"
    proc = subprocess.run([sys.executable, "-m", "scripts.rl_data", "--explore_dir", str(explore_dir(tmp_path)),
                           "--output_path", str(out), "--method", "grpo"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "6 episodes in 2 groups" in proc.stdout and "1 episodes skipped" in proc.stdout
    assert len(json.loads(out.read_text())) == 6


def test_bad_input_is_refused(tmp_path, capsys):
    folder = explore_dir(tmp_path)
    out = str(tmp_path / "rl.json")
    with pytest.raises(SystemExit):  # a gigpo flag with another method does nothing: refused
        main(["--explore_dir", str(folder), "--output_path", out, "--method", "grpo", "--step_weight", "2"])
    assert "--step_weight and --state_key are gigpo's" in capsys.readouterr().err
    bad = json.loads((folder / "t2__s0.json").read_text())
    bad["meta"]["policy_versions"] = "v3"
    (folder / "t2__s0.json").write_text(json.dumps(bad))
    assert main(["--explore_dir", str(folder), "--output_path", out, "--method", "grpo"]) == 2
    assert "t2__s0.json" in capsys.readouterr().err
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "t1__s0.json").write_text(json.dumps(episode("t1", 0, 0.0, [("Action: look", None)],
                                                            terminate_reason="model_error: 500")))
    assert main(["--explore_dir", str(crashed), "--output_path", out, "--method", "grpo"]) == 2
    assert "no usable episode among 1" in capsys.readouterr().err
    assert not Path(out).exists()


def test_records_carry_the_in_context_example_their_prompt_held(tmp_path, capsys):
    """Episodes played with icl_num 1 get their task config's example turns (the prompt the answers were sampled
    in), the same list eval_agent put in it; icl_num 0 and hand-made episodes get none; an unknown task config
    is named."""
    from eval_agent.config import load_task_config
    from eval_agent.prompt import build_messages

    folder = explore_dir(tmp_path)
    for name, icl_num in (("t1__s0.json", 1), ("t1__s2.json", 0)):
        ep = json.loads((folder / name).read_text())
        ep["meta"].update(task_config="alfworld", icl_num=icl_num)
        (folder / name).write_text(json.dumps(ep))
    out = tmp_path / "rl.json"
    assert main(["--explore_dir", str(folder), "--output_path", str(out), "--method", "grpo"]) == 0
    records = {(r["id"], r["sample"]): r for r in json.loads(out.read_text())}
    cfg = load_task_config("alfworld")
    prompt = build_messages("Instruction.", cfg.icl_messages(), "Task t1.", icl_num=1)
    assert [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]}
            for t in records["t1", 0]["context"]] == prompt[2:-1]
    assert records["t1", 2]["context"] == [] and records["t1", 3]["context"] == []
    assert json.loads((tmp_path / "rl.stats.json").read_text())["episodes_with_context"] == 1
    ep = json.loads((folder / "t1__s0.json").read_text())
    ep["meta"]["task_config"] = "no_such_task"
    (folder / "t1__s0.json").write_text(json.dumps(ep))
    assert main(["--explore_dir", str(folder), "--output_path", str(out), "--method", "grpo"]) == 2
    assert "t1__s0.json" in (err := capsys.readouterr().err) and "'no_such_task'" in err
