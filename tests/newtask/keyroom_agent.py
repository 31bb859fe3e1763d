"""A stand-in model for the test: plays the expert from the task text, so eval_agent.main runs without a server."""
from __future__ import annotations

from build_keyroom_sft import expert_steps

from eval_agent.agents import Agent


class ExpertAgent(Agent):
    def __call__(self, messages: list[dict[str, str]]) -> str:
        # the task is the last user message that states one (the 1-shot example states another before it)
        start = max(i for i, m in enumerate(messages) if m["role"] == "user" and m["content"].startswith("Your task"))
        step = sum(m["role"] == "assistant" for m in messages[start:])
        thought, action = expert_steps(messages[start]["content"])[step]
        return f"Thought: {thought}\nAction: {action}"
