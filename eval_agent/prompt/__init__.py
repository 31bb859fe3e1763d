"""Prompt assembly and the conversation record format.

What the model sees: the instruction, an "OK" reply, the 1-shot example (a few
user/assistant turns), then the task and the episode so far.

What is stored (SFT data, episode outputs, DPO pairs): FastChat-style turns
`{"from": "human"|"gpt", "value": ...}` starting with the instruction, "OK" and
the task; the example is left out (it is fixed by the task config), so expert
and agent records line up turn for turn.
"""
from __future__ import annotations

from typing import Any

ROLE_TO_FROM = {"user": "human", "assistant": "gpt"}
FROM_TO_ROLE = {v: k for k, v in ROLE_TO_FROM.items()}
OK_REPLY = "OK"
PROMPT_TURNS = 3  # instruction, "OK", task


def build_messages(instruction: str, icl_messages: list[dict[str, str]], task_text: str,
                   icl_num: int = 1) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": OK_REPLY}]
    if icl_num > 0:
        messages += [dict(m) for m in icl_messages]
    messages.append({"role": "user", "content": task_text})
    return messages


def record_turns(instruction: str, task_text: str) -> list[dict[str, str]]:
    """The first three stored turns of every record."""
    return [{"from": "human", "value": instruction}, {"from": "gpt", "value": OK_REPLY},
            {"from": "human", "value": task_text}]


def turns_to_messages(turns: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for i, t in enumerate(turns):
        if t.get("from") not in FROM_TO_ROLE or not isinstance(t.get("value"), str):
            raise ValueError(f"turn {i}: expected {{'from': 'human'|'gpt', 'value': str}}, got {str(t)[:120]}")
        out.append({"role": FROM_TO_ROLE[t["from"]], "content": t["value"]})
    return out


def messages_to_turns(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"from": ROLE_TO_FROM[m["role"]], "value": m["content"]} for m in messages]
