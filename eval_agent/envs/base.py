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

# The last "Action:" in the answer wins; the action is the rest of that line.
_ACTION_RE = re.compile(r"Action\s*:\s*(.*)", re.IGNORECASE)
MAX_ACTION_CHARS = 500

INVALID_FORMAT_OBSERVATION = (
    "Invalid format: your answer must end with a line 'Action: <action>'. "
    "Nothing happened."
)


def parse_action(model_output: str) -> str | None:
    """Return the action in `model_output`, or None when there is none.

    The thought before the action is kept in the history by the caller but never executed.
    """
    if not model_output:
        return None
    matches = _ACTION_RE.findall(model_output)
    if not matches:
        return None
    action = matches[-1].strip().strip("`").strip()
    if not action or len(action) > MAX_ACTION_CHARS:
        return None
    return action


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
    """One episode of one task. Not thread-safe: use one instance per concurrent episode."""

    def __init__(self, task: Any, max_steps: int, **env_options: Any):
        self.task = task
        self.max_steps = int(max_steps)
        self.env_options = env_options
        self.state = State()

    def reset(self) -> str:
        self.state = State()
        return self._reset()

    def step(self, model_output: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self.state.finished:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        self.state.steps += 1
        action = parse_action(model_output)
        if action is None:
            observation = INVALID_FORMAT_OBSERVATION
            info: dict[str, Any] = {"action": None, "valid_format": False}
        else:
            observation, reward, done, success = self._act(action)
            self.state.reward = max(self.state.reward, float(reward))
            info = {"action": action, "valid_format": True}
            if done:
                self._finish(success=success, reason="success" if success else "done")
        if not self.state.finished and self.state.steps >= self.max_steps:
            self._finish(success=False, reason="max_steps")
        return observation, self.state.reward, self.state.finished, info

    def terminate(self, reason: str) -> None:
        """End the episode from outside (timeout, context overflow, model error)."""
        self._finish(success=False, reason=reason)

    def _finish(self, success: bool, reason: str) -> None:
        self.state.finished = True
        self.state.success = bool(success)
        self.state.terminate_reason = reason

    def close(self) -> None:
        """Release simulator resources."""

    @abstractmethod
    def _reset(self) -> str:
        """Start the task; return the first observation (task text, no banner)."""

    @abstractmethod
    def _act(self, action: str) -> tuple[str, float, bool, bool]:
        """Execute one parsed action: (observation, reward so far in [0, 1], done, success)."""
