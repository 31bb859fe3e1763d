"""Prompt assembly: what the model sees.

The instruction, an "OK" reply, the 1-shot example (a few user/assistant turns), then the task and the episode
so far. The instruction and example files live in this folder (instructions/, icl_examples/; a task config names
them, eval_agent.config loads them). What is stored of a conversation is fastchat.records' format.
"""
from __future__ import annotations

from pathlib import Path

from fastchat.records import OK_REPLY

PROMPT_DIR = Path(__file__).resolve().parent  # the built-in tasks' instruction and example files


def build_messages(instruction: str, icl_messages: list[dict[str, str]], task_text: str,
                   icl_num: int = 1) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": OK_REPLY}]
    if icl_num > 0:
        messages += [dict(m) for m in icl_messages]
    messages.append({"role": "user", "content": task_text})
    return messages
