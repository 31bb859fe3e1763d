"""The interface every agent environment implements.

An environment plays one task. `reset()` returns the first observation (the task
text shown to the agent); `step(model_output)` parses the model's answer for
`Action: ...`, executes it and returns `(observation, reward, done, info)`.
Subclasses implement only `_reset()` and `_act(action)`; parsing, step counting,
the step limit and the episode state live here, so every environment treats
malformed output the same way.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

# As in the original ETO code: the action is the text after the *first* "Action:" (case-sensitive),
# to the end of the answer. `first_line_only` keeps only the rest of that line (env option
# `action_first_line_only: true`, a documented deviation). The original's ALFWorld pattern allows no
# space after the colon; its WebShop and ScienceWorld patterns need one (envs set `action_pattern`).
ACTION_PATTERN = r"Action:\s?(.*)"
ACTION_PATTERN_WITH_SPACE = r"Action: (.*)"
MAX_ACTION_CHARS = 500

# The version of the episode rules (what the agent sees, what runs, how it is scored). Episode files and run
# settings record it; a rerun does not reuse episodes of another version. 1: until 2026-12 (commit 9a1dceb);
# 2: the original's first observations, action handling, reward reset and success in all three envs.
EPISODE_PROTOCOL = 2

# The original's observation for an answer without "Action:", word for word (the step counts). Its ALFWorld env
# has a text of its own (AlfWorldEnv.invalid_format_observation).
INVALID_FORMAT_OBSERVATION = "Observation: Invalid format. The input must contains 'Action: '"
TOO_LONG_OBSERVATION = (f"Observation: Invalid action. The action after 'Action: ' is longer than "
                        f"{MAX_ACTION_CHARS} characters. Nothing happened.")
EMPTY_ACTION_OBSERVATION = "Observation: Invalid action. Nothing follows 'Action: '. Nothing happened."


# What became of one agent step (info["outcome"], episodes' meta.step_outcomes): no "Action:" in the answer; an
# action not sent to the simulator (empty or too long); sent and refused by it; sent and carried out; sent, and
# the env cannot tell.
INVALID_FORMAT, NOT_RUN, REJECTED, RAN, UNKNOWN = "invalid_format", "not_run", "rejected", "ran", "unknown"
STEP_OUTCOMES = (INVALID_FORMAT, NOT_RUN, REJECTED, RAN, UNKNOWN)


def parse_action(model_output: str, first_line_only: bool = False, pattern: str = ACTION_PATTERN) -> str | None:
    """Return the action in `model_output` ("" when "Action:" is followed by nothing), or None when
    there is no "Action:" at all. The thought before it is kept in the history but never executed."""
    match = re.search(pattern, (model_output or "").strip(), re.DOTALL)
    if match is None:
        return None
    action = match.group(1)  # as the original: spaces after "Action: " stay (WebShop's parser sees them)
    if first_line_only:
        action = action.split("\n", 1)[0].rstrip()
    return action


_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # all control characters but tab and newline


def simulator_safe(text: str) -> str:
    """`text` as a simulator can take it: lone surrogates (not UTF-8) become "?", control characters (NUL,
    terminal escapes) are dropped. Model output is untrusted."""
    return _CONTROL_RE.sub("", text.encode("utf-8", errors="replace").decode("utf-8"))


def invalid_action_observation(action: str | None, invalid_format: str = INVALID_FORMAT_OBSERVATION) -> str | None:
    """The observation for an answer we do not execute, or None when `action` may run."""
    if action is None:
        return invalid_format
    if not action:
        return EMPTY_ACTION_OBSERVATION
    if len(action) > MAX_ACTION_CHARS:
        return TOO_LONG_OBSERVATION
    return None


@dataclass
class State:
    steps: int = 0
    reward: float = 0.0
    finished: bool = False
    success: bool = False
    terminate_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BaseEnv(ABC):
    """One episode of one task. Not thread-safe: use one instance per concurrent episode.

    Reward, as in the original's three envs: the reward `_act` reports replaces the episode's when it is higher or
    when none has been reported yet (so a first score below 0 stays), and an answer without "Action:" sets it back
    to 0. `success` is what `_act` says (the original's notion, which differs per env); metrics add a strict
    "solved" (reward 1.0).
    """

    action_pattern = ACTION_PATTERN
    invalid_format_observation = INVALID_FORMAT_OBSERVATION

    def __init__(self, task: Any, max_steps: int, action_first_line_only: bool = False, success_reward: float = 1.0,
                 **env_options: Any):
        self.task = task
        self.success_reward = float(success_reward)  # the task config's; read by envs without a success signal
        self.action_first_line_only = bool(action_first_line_only)
        self.max_steps = int(max_steps)
        self.env_options = env_options
        self.state = State()
        self._rewarded = False

    def reset(self) -> str:
        self.state = State()
        self._rewarded = False  # the original's reward starts as None: the first reported one is taken as it is
        return self._reset()

    def step(self, model_output: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self.state.finished:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        self.state.steps += 1
        action = parse_action(model_output, self.action_first_line_only, self.action_pattern)
        if action is not None:
            action = simulator_safe(action)
        invalid = invalid_action_observation(action, self.invalid_format_observation)
        if invalid is not None:
            observation = invalid
            outcome = INVALID_FORMAT if action is None else NOT_RUN
            info: dict[str, Any] = {"action": action, "valid_format": False, "outcome": outcome}
            if action is None:  # the original: an answer without "Action:" resets the reward
                self.state.reward, self._rewarded = 0.0, True
        else:
            observation, reward, done, success = self._act(action)
            if not self._rewarded or float(reward) > self.state.reward:
                self.state.reward, self._rewarded = float(reward), True
            rejected = self.action_rejected(observation)
            outcome = UNKNOWN if rejected is None else REJECTED if rejected else RAN
            info = {"action": action, "valid_format": True, "outcome": outcome}
            if done:
                self._finish(success=success, reason="success" if success else "done")
        if not self.state.finished and self.state.steps >= self.max_steps:
            self._finish(success=False, reason="max_steps")
        return observation, self.state.reward, self.state.finished, info

    def score_at_reset(self) -> float:
        """The simulator's score before the first step (ScienceWorld's reset move can score): where step scores
        rise from (read by the behaviour statistics only; not a reward)."""
        return 0.0

    def action_rejected(self, observation: str) -> bool | None:
        """Whether the simulator refused the action `_act` just ran (it did not carry it out), from its
        observation or state; None where the env cannot tell (read by the behaviour statistics only)."""
        return None

    def terminate(self, reason: str) -> None:
        """End the episode from outside (timeout, context overflow, model error)."""
        self._finish(success=False, reason=reason)

    def _finish(self, success: bool, reason: str) -> None:
        self.state.finished = True
        self.state.success = bool(success)
        self.state.terminate_reason = reason

    def close(self) -> None:
        """Release simulator resources."""

    @staticmethod
    def expert_task_text(first_observation: str) -> str:
        """An episode's first observation as the task turn of this env's expert records (pairs and RFT data put
        explored episodes in the expert data's form); the same text unless an env's expert data differs."""
        return first_observation

    @classmethod
    def requirements(cls) -> list[str]:
        """What this machine lacks to run the env (checked before a pipeline starts); [] when nothing."""
        return []

    @abstractmethod
    def _reset(self) -> str:
        """Start the task; return the first observation (task text, no banner)."""

    @abstractmethod
    def _act(self, action: str) -> tuple[str, float, bool, bool]:
        """Execute one parsed action: (observation, the episode's score now, done, success)."""
