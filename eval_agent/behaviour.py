"""What the agent did in a set of episodes, beside its reward: how its steps ended (no "Action:", an action not run,
one the simulator refused, one it carried out), how often an action repeated the step before, how many episodes
raised their score at some step (ScienceWorld's partial credit), how the episodes ended and the verbs of the
actions carried out.

Read from episode files: `meta.step_outcomes` (envs.base STEP_OUTCOMES) and `meta.reset_score` (the score before
the first step), both recorded since 2026-12 (an older episode's steps count as "unknown" and its scores rise from
0), `meta.step_scores`, `meta.terminate_reason` and the agent's turns (the last `steps` assistant turns are the
steps' answers).
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

from eval_agent.envs.base import INVALID_FORMAT, NOT_RUN, RAN, REJECTED, STEP_OUTCOMES, UNKNOWN, parse_action

TOP_VERBS = 5
VERB_RE = re.compile(r"[A-Za-z][A-Za-z-]*")  # "go to desk 1" -> go, "click[Buy Now]" -> click
# what each field of behaviour() means (summary and study tables say it in their notes)
DEFINITIONS = {
    "steps_per_episode": "agent steps per episode",
    "invalid_format": f"share of steps whose answer has no 'Action:' ({INVALID_FORMAT})",
    "not_run": f"share of steps whose action was empty or too long to send ({NOT_RUN})",
    "rejected": f"share of steps whose action the simulator refused ({REJECTED})",
    "ran": f"share of steps whose action the simulator carried out ({RAN})",
    "unknown": f"share of steps sent to an env that cannot tell whether it refused them ({UNKNOWN})",
    "repeated": "share of sent actions equal to the action of the step before",
    "score_rose": "share of episodes whose score rose above the score at reset at some step",
    "score_rises": "steps that raised the score, per episode",
}


def step_answers(record: dict) -> list[str]:
    """The agent's answers of an episode's steps, in order."""
    steps = int(record.get("meta", {}).get("steps") or 0)
    answers = [turn["value"] for turn in record.get("conversations", []) if turn.get("from") == "gpt"]
    return answers[len(answers) - steps:] if steps else []


def score_rises(scores: list[float], start: float = 0.0) -> int:
    """Steps after which the score is above every earlier one and above `start`, the score before the first step
    (ScienceWorld's reset move scores on some tasks: those points are no step's)."""
    best, rises = start, 0
    for score in scores:
        if score > best:
            best, rises = score, rises + 1
    return rises


def behaviour(records: Iterable[dict]) -> dict:
    """The statistics of DEFINITIONS over `records` (episode files), plus counts: episodes, steps, outcome counts,
    how episodes ended, and the most common verbs of the actions carried out."""
    outcomes: Counter = Counter()
    ended: Counter = Counter()
    verbs: Counter = Counter()
    episodes = steps = sent = repeated = rose = rises = 0
    for record in records:
        meta = record.get("meta", {})
        n = int(meta.get("steps") or 0)
        episodes, steps = episodes + 1, steps + n
        ended[meta.get("terminate_reason") or "unfinished"] += 1
        recorded = meta.get("step_outcomes")
        kinds = list(recorded) if recorded is not None and len(recorded) == n else [UNKNOWN] * n
        outcomes.update(kinds)
        previous = None
        for kind, answer in zip(kinds, step_answers(record)):
            action = parse_action(answer, first_line_only=True)
            action = action.strip() if action else None
            if kind in (REJECTED, RAN, UNKNOWN) and action:
                sent += 1
                repeated += action == previous
                verb = VERB_RE.match(action)
                if kind != REJECTED and verb:
                    verbs[verb.group().lower()] += 1
            previous = action
        count = score_rises(meta.get("step_scores") or [], meta.get("reset_score") or 0.0)
        rose, rises = rose + (count > 0), rises + count
    share = (lambda count, total: round(count / total, 4) if total else None)
    return {"episodes": episodes, "steps": steps,
            "steps_per_episode": share(steps, episodes),
            **{kind: share(outcomes[kind], steps) for kind in STEP_OUTCOMES},
            "repeated": share(repeated, sent),
            "score_rose": share(rose, episodes), "score_rises": share(rises, episodes),
            "outcome_counts": {kind: outcomes[kind] for kind in STEP_OUTCOMES},
            "ended": dict(sorted(ended.items())),
            "top_verbs": [[verb, count] for verb, count in verbs.most_common(TOP_VERBS)]}
