"""eval_agent.behaviour: what the agent did (step outcomes, repeats, score rises, ends, verbs), on hand-made episode
files with hand-computed values, and its tables in a run's summary and a study's table."""
from __future__ import annotations

import pytest

from eval_agent.behaviour import behaviour, score_rises, step_answers
from scripts.pipeline.summary import behaviour_table


def episode(answers: list[str], outcomes: list[str] | None, scores: list[float], reason: str) -> dict:
    turns = [{"from": "human", "value": "instruction"}, {"from": "gpt", "value": "OK"},
             {"from": "human", "value": "task"}]
    for i, answer in enumerate(answers):
        turns += [{"from": "gpt", "value": answer}] + ([{"from": "human", "value": f"Observation: {i}"}]
                                                      if i < len(answers) - 1 else [])
    meta = {"steps": len(answers), "step_scores": scores, "terminate_reason": reason}
    if outcomes is not None:
        meta["step_outcomes"] = outcomes
    return {"id": "t", "conversations": turns, "meta": meta}


EPISODES = [
    # no Action:, then the same action twice (refused, then carried out), then an empty one
    episode(["I think so.", "Thought: a\nAction: open door", "Action: open door", "Action: "],
            ["invalid_format", "rejected", "ran", "not_run"], [0.0, 0.0, 0.25, 0.25], "max_steps"),
    # two actions carried out; the score rises twice, falls, and comes back to a level already reached
    episode(["Action: go to kitchen", "Action: Take key\nThought: more text", "Action: go to hall"],
            ["ran", "ran", "ran"], [0.1, 0.5, 0.2], "success"),
    # written before step outcomes were recorded
    episode(["Action: look"], None, [0.0], "done"),
]


def test_behaviour_of_hand_made_episodes():
    got = behaviour(EPISODES)
    # 8 steps: 1 invalid format, 1 not run, 1 rejected, 4 ran, 1 unknown
    assert (got["episodes"], got["steps"], got["steps_per_episode"]) == (3, 8, pytest.approx(8 / 3, abs=1e-4))
    assert got["outcome_counts"] == {"invalid_format": 1, "not_run": 1, "rejected": 1, "ran": 4, "unknown": 1}
    assert (got["invalid_format"], got["rejected"], got["ran"], got["unknown"]) == (0.125, 0.125, 0.5, 0.125)
    # sent actions: open door, open door (repeat), go to kitchen, Take key, go to hall, look -> 1 of 6 repeats
    assert got["repeated"] == pytest.approx(1 / 6, abs=1e-4)
    # rises: episode 1 once (0.25), episode 2 twice (0.1, 0.5), episode 3 never
    assert (got["score_rose"], got["score_rises"]) == (pytest.approx(2 / 3, abs=1e-4), 1.0)
    assert got["ended"] == {"done": 1, "max_steps": 1, "success": 1}
    # verbs of the actions carried out (and unknown), first line only, lower case; the refused one not counted
    assert got["top_verbs"] == [["go", 2], ["open", 1], ["take", 1], ["look", 1]]


def test_answers_are_the_last_steps_turns_and_rises_need_a_new_best():
    assert step_answers(EPISODES[1]) == ["Action: go to kitchen", "Action: Take key\nThought: more text",
                                         "Action: go to hall"]
    assert score_rises([0.0, -1.0, 0.5, 0.5, 0.25, 0.75]) == 2
    # ScienceWorld: the reset's points (0.08) are reported at the first step, and again after an answer without
    # "Action:" set the reward to 0: neither is a rise
    assert score_rises([0.08, 0.0, 0.08, 0.25], start=0.08) == 1
    assert behaviour([])["steps_per_episode"] is None


def test_behaviour_table_shows_the_columns_some_row_has():
    lines = behaviour_table([("eval_sft", behaviour(EPISODES[:2])), ("eval_base", None)])
    header, rule, row = lines[1], lines[2], lines[3]
    assert "unknown" not in header and "invalid format" in header and "eval_base" not in "\n".join(lines)
    assert row.startswith("| eval_sft | 2 | 3.50 | 0.14 | 0.14 | 0.14 | 0.57 |")
    assert rule.count("---") == header.count("|") - 1
    assert lines[-1].startswith("steps per episode: agent steps per episode; invalid format: ")
