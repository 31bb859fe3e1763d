"""Several samples per task, the pair rules (expert, self, step) and step-pair construction on the real key-room
env (tests/newtask): the policies below are deterministic stand-ins for the model, used only where the test is
about our own logic (which steps pair, what is chosen and rejected, what the rollouts cost, the cache)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from eval_agent.agents import Agent
from eval_agent.config import import_object, load_task_config
from eval_agent.runner import compute_metrics
from scripts import construct_preference
from scripts.pairs.files import load_expert, load_explored
from scripts.pairs.step import Rollouts, build_step_pairs, prefix_lengths

REPO = Path(__file__).resolve().parent.parent
NEW_TASK = REPO / "tests" / "newtask"
# the key room's own module, imported as the task plugin mechanism imports the modules beside a config
expert_steps = import_object("build_keyroom_sft:expert_steps", NEW_TASK / "keyroom.yaml", "expert_steps")

PROMPT = [{"from": "human", "value": "Instruction."}, {"from": "gpt", "value": "OK"}]


def episode(tid: str, sample: int, reward: float, actions: list[str], success: bool = False, **meta) -> dict:
    turns = PROMPT + [{"from": "human", "value": f"task {tid}"}]
    for a in actions:
        turns += [{"from": "gpt", "value": f"Action: {a}"}, {"from": "human", "value": f"Observation: {a}"}]
    return {"id": tid, "meta": {"reward": reward, "success": success, "finished": True, "terminate_reason": None,
                                "sample": sample, **meta}, "conversations": turns[:-1]}


def write_samples(folder: Path, episodes: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for e in episodes:
        (folder / f"{e['id']}__s{e['meta']['sample']}.json").write_text(json.dumps(e))
    (folder / "metrics.json").write_text("{}")
    return folder


def pairs_cli(tmp_path: Path, *args: str) -> tuple[int, list[dict], dict]:
    out = tmp_path / "pairs.json"
    code = construct_preference.main(["--output_path", str(out), *args])
    if code:
        return code, [], {}
    return code, json.loads(out.read_text()), json.loads((tmp_path / "pairs.stats.json").read_text())


def test_metrics_over_k_samples_give_mean_best_of_k_and_pass_at_k():
    records = [episode("a", 0, 0.0, ["x"]), episode("a", 1, 1.0, ["x"], success=True), episode("a", 2, 0.5, ["x"]),
               episode("b", 0, 0.25, ["x"]), None, episode("b", 2, 0.25, ["x"])]  # one of b's samples is missing
    m = compute_metrics(records, num_tasks=2, samples_per_task=3)
    assert m["average_reward"] == pytest.approx((0 + 1 + 0.5 + 0.25 + 0.25) / 6)
    assert m["best_of_k_reward"] == pytest.approx((1.0 + 0.25) / 2)
    assert m["pass_at_k"] == 0.5 and m["num_missing"] == 1 and m["success_rate"] == pytest.approx(1 / 6)


def test_self_rule_pairs_best_with_worst_sample_and_skips_ties_gaps_and_single_samples(tmp_path):
    explore = write_samples(tmp_path / "explore", [
        episode("spread", 0, 0.2, ["a0"]), episode("spread", 1, 1.0, ["a1", "a1b"]), episode("spread", 2, 0.2, ["a2"]),
        episode("tied", 0, 0.5, ["t0"]), episode("tied", 1, 0.5, ["t1"]),
        episode("close", 0, 0.6, ["c0"]), episode("close", 1, 0.3, ["c1"]),
        episode("alone", 0, 1.0, ["l0"]), episode("alone", 1, 0.0, ["l1"], terminate_reason="env_error: crash")])
    code, pairs, stats = pairs_cli(tmp_path, "--rule", "self", "--explore_dir", str(explore),
                                   "--min_reward_gap", "0.35")
    assert code == 0
    assert [(p["id"], p["kind"], p["rule"]) for p in pairs] == [("spread", "trajectory", "self")]
    pair = pairs[0]
    assert [t["value"] for t in pair["chosen"] if t["from"] == "gpt"] == ["Action: a1", "Action: a1b"]
    assert pair["rejected"][0]["value"] == "Action: a0"  # of two equally bad samples, the first played
    assert (pair["chosen_reward"], pair["rejected_reward"]) == (1.0, 0.2)
    # "close" differs by 0.3 <= the gap; "alone" has one usable sample
    assert stats == {"rule": "self", "pairs": 1, "tie": 2, "single": 1, "incomplete": 1}


def test_expert_rule_pairs_the_expert_with_every_sample(tmp_path):
    expert = tmp_path / "sft.json"
    expert.write_text(json.dumps([{"id": "t", "reward": 1.0, "conversations": episode("t", 0, 1.0, ["e1", "e2"])[
        "conversations"]}]))
    explore = write_samples(tmp_path / "explore", [episode("t", 0, 1.0, ["s0"]), episode("t", 1, 0.0, ["s1"]),
                                                   episode("t", 2, 0.5, ["s2"])])
    code, pairs, stats = pairs_cli(tmp_path, "--explore_dir", str(explore), "--expert_path", str(expert))
    assert code == 0
    assert sorted(p["rejected"][0]["value"] for p in pairs) == ["Action: s1", "Action: s2"]
    assert all(p["chosen"][0]["value"] == "Action: e1" for p in pairs)
    assert (stats["win"], stats["tie"], stats["lose"], stats["pairs"]) == (0, 1, 2, 2)


def test_the_same_sample_twice_is_refused(tmp_path):
    explore = write_samples(tmp_path / "explore", [episode("t", 0, 1.0, ["a"])])
    (explore / "copy.json").write_text(json.dumps(episode("t", 0, 0.0, ["b"])))
    code, _, _ = pairs_cli(tmp_path, "--rule", "self", "--explore_dir", str(explore))
    assert code == 2


def test_prefix_lengths_spread_over_the_trajectory():
    assert prefix_lengths(3, 4) == [0, 1, 2]
    assert prefix_lengths(9, 3) == [0, 4, 8]
    assert prefix_lengths(5, 1) == [0]


class LookAgent(Agent):
    """Never moves: from any point of a game its reward stays what it was (0, or 0.5 once the key is taken)."""

    def __call__(self, messages):
        return "Thought: I look around.\nAction: look"


class ExpertPolicy(Agent):
    """Plays the expert's next step wherever it stands (its steps are never worse than the expert's)."""

    def __call__(self, messages):
        start = max(i for i, m in enumerate(messages) if m["role"] == "user" and m["content"].startswith("Your task"))
        step = sum(m["role"] == "assistant" for m in messages[start:])
        thought, action = expert_steps(messages[start]["content"])[step]
        return f"Thought: {thought}\nAction: {action}"


@pytest.fixture
def keyroom(tmp_path):
    """The key room config, its expert file and the looking agent's explored (losing) episodes of 2 tasks."""
    from eval_agent.runner import run_episode

    cfg = load_task_config(NEW_TASK / "keyroom.yaml")
    tasks = {t.id: t for t in cfg.make_loader().load("train")}
    import subprocess
    expert_path = tmp_path / "keyroom_sft.json"
    subprocess.run([sys.executable, str(NEW_TASK / "build_keyroom_sft.py"), "--out", str(expert_path)], check=True,
                   capture_output=True, cwd=NEW_TASK, timeout=120)
    experts = load_expert(expert_path)
    ids = ["keyroom-train-0", "keyroom-train-1"]
    explore = tmp_path / "explore"
    for tid in ids:
        rec = run_episode(cfg, tasks[tid], LookAgent("look"), cfg.icl_num, cfg.instruction_text(), cfg.icl_messages(),
                          max_steps=6)
        write_samples(explore, [{**rec, "meta": {**rec["meta"], "sample": 0}}])
    return cfg, tasks, {k: v for k, v in experts.items() if k in ids}, load_explored(explore)


def test_step_pairs_where_the_expert_step_gains_reward(keyroom, tmp_path):
    cfg, tasks, experts, explored = keyroom
    rollouts = Rollouts(cfg, LookAgent("look"), tasks, tmp_path / "cache", max_steps=None, num_workers=4)
    pairs, counts = build_step_pairs(experts, explored, rollouts, k=2, margin=0.0, max_prefixes=20,
                                     rejected_extra_rounds=2)
    rollouts.close()
    # looking instead of the expert's step loses value only where the expert takes the key or opens the door
    for tid, (expert, _) in experts.items():
        actions = [t["value"].split("Action: ")[1] for t in expert["conversations"][3:] if t["from"] == "gpt"]
        wanted = [i for i, a in enumerate(actions) if a in ("take key", "open door")]
        got = [p for p in pairs if p["id"] == tid]
        assert [p["step"] for p in got] == wanted
        for p in got:
            t = p["step"]
            assert p["kind"] == "step" and p["prompt"] == expert["conversations"][: 3 + 2 * t]
            assert p["chosen"][0] == expert["conversations"][3 + 2 * t] and p["chosen"][-1]["from"] == "gpt"
            assert p["rejected"][0]["value"].endswith("Action: look")
            assert (p["chosen_value"], p["rejected_value"]) == ((0.5, 0.0) if actions[t] == "take key" else (1.0, 0.5))
            assert sum(x["from"] == "gpt" for x in p["rejected"]) <= sum(x["from"] == "gpt" for x in p["chosen"]) + 2
    assert counts["pairs"] == len(pairs) == 4 and counts["same_step"] == 0
    assert counts["below_margin"] == counts["prefixes"] - 4
    # cost: one own-step rollout per prefix, then k expert-step and k - 1 more agent-step rollouts per candidate;
    # the expert-step rollout 0 at t is the own-step rollout at t + 1 (the same replay), played once
    asked = counts["prefixes"] * (1 + 2 + 1)
    distinct = asked - (counts["prefixes"] - len(experts))
    assert (counts["cost"]["rollouts"], counts["cost"]["played"]) == (distinct, distinct)
    assert counts["cost"]["reused"] == asked - distinct
    assert counts["cost"]["env_steps"] > 0 and counts["cost_per_pair"]["env_steps"] == pytest.approx(
        counts["cost"]["env_steps"] / 4, abs=0.05)

    # a rerun reuses every finished rollout and builds the same pairs
    again = Rollouts(cfg, LookAgent("look"), tasks, tmp_path / "cache", max_steps=None, num_workers=4)
    pairs2, counts2 = build_step_pairs(experts, explored, again, k=2, margin=0.0, max_prefixes=20,
                                       rejected_extra_rounds=2)
    again.close()
    assert pairs2 == pairs and counts2["cost"]["played"] == 0 and counts2["cost"]["reused"] == asked
    assert counts2["cost"]["env_steps"] == counts["cost"]["env_steps"]


def test_no_step_pair_where_the_agent_takes_the_experts_step(keyroom, tmp_path):
    cfg, tasks, experts, explored = keyroom
    rollouts = Rollouts(cfg, ExpertPolicy("expert"), tasks, tmp_path / "cache", max_steps=12, num_workers=2)
    pairs, counts = build_step_pairs(experts, explored, rollouts, k=2, margin=0.0, max_prefixes=3,
                                     rejected_extra_rounds=None)
    rollouts.close()
    assert pairs == [] and counts["same_step"] == counts["prefixes"] == 6
