"""The stored record format: conversation turns, trajectory records, pair records, and how they are read and written.

Every layer shares it: the agent (eval_agent) writes episode records, the expert-data builders and the pair rules
(scripts/) write trajectory and pair records, the trainers (fastchat.train) read them. It lives here, in the lower
layer, so that serving and training never depend on the agent package. Standard library only.

Turns are FastChat-style `{"from": "human"|"gpt", "value": str}` (chat messages `{"role": "user"|"assistant",
"content"}` in the model's view). Every stored conversation starts with PROMPT_TURNS turns: the instruction, the
"OK" reply and the task; the 1-shot example the model also sees is left out (it is fixed by the task config), so
expert and agent records line up turn for turn. What follows is the trajectory: gpt turns (the agent's answers)
and human turns (observations).

- A trajectory record: {"id", "conversations", **fields}; expert (SFT) records carry "reward" (and their task's
  data), episode records "meta" (reward, success, steps, terminate reason, cost).
- A pair record (a DPO file's entry): {"id", "kind", "prompt", "chosen", "rejected", **fields}, kind one of KINDS;
  the prompt ends with the task (a step pair's also holds the expert's first steps), chosen and rejected start at
  a gpt turn and end at one; an sft record (prompt + chosen, trained with the language-model loss) has no
  rejected side.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

ROLE_TO_FROM = {"user": "human", "assistant": "gpt"}
FROM_TO_ROLE = {v: k for k, v in ROLE_TO_FROM.items()}
OK_REPLY = "OK"
PROMPT_TURNS = 3  # instruction, "OK", task
# a trajectory pair, a step pair (both trained with the DPO loss, each with its own weight) or an SFT sample
KINDS = ("trajectory", "step", "sft")


class RecordError(ValueError):
    """A record file that cannot be used; the message names the file (and the record and field where it applies)."""


# -- turns ------------------------------------------------------------------------------------------

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


def trajectory(turns: list[dict], max_gpt_turns: int | None = None) -> list[dict]:
    """Turns after the prompt, up to the last gpt turn (or the max_gpt_turns-th): trailing observations are never
    trained on."""
    rest = turns[PROMPT_TURNS:]
    gpt_positions = [i for i, t in enumerate(rest) if t["from"] == "gpt"]
    if max_gpt_turns is not None:
        gpt_positions = gpt_positions[:max_gpt_turns]
    return rest[: gpt_positions[-1] + 1]


def rounds(turns: list[dict]) -> int:
    """The number of gpt turns after the prompt."""
    return sum(t["from"] == "gpt" for t in turns[PROMPT_TURNS:])


# -- records ----------------------------------------------------------------------------------------

def trajectory_record(task_id: Any, conversations: list[dict], **fields: Any) -> dict:
    """{"id", "conversations", **fields} (see the module docstring for the fields of each use)."""
    return {"id": task_id, "conversations": conversations, **fields}


def pair_record(task_id: Any, kind: str, prompt: list[dict], chosen: list[dict], rejected: list[dict] | None = None,
                **fields: Any) -> dict:
    """{"id", "kind", "prompt", "chosen", "rejected", **fields}; an sft record has no "rejected"."""
    if kind not in KINDS:
        raise ValueError(f"pair kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if (rejected is None) != (kind == "sft"):
        raise ValueError(f"a {kind} record {'has no' if kind == 'sft' else 'needs a'} rejected side")
    sides = {"chosen": chosen} if kind == "sft" else {"chosen": chosen, "rejected": rejected}
    return {"id": task_id, "kind": kind, "prompt": prompt, **sides, **fields}


def record_where(path: str | Path, index: int | None = None, record: Any = None) -> str:
    """How a message names a record: "<file>: record <i> (id=<id>)", or "<file> (id=<id>)" for a file that holds
    one record."""
    rid = record.get("id") if isinstance(record, dict) else None
    where = f"{path}: record {index}" if index is not None else f"{path}"
    return where + (f" (id={rid!r})" if rid is not None else "")


# -- files ------------------------------------------------------------------------------------------

def read_json(path: str | Path, expect: type | None = None, what: str = "") -> Any:
    """The JSON value in `path`. RecordError naming the file when it is missing or unreadable, is not valid JSON, or
    (with `expect`, e.g. list) holds another type (`what` says of what, e.g. "records")."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RecordError(f"{path}: cannot read ({e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecordError(f"{path}: not valid JSON ({e})") from None
    if expect is not None and not isinstance(data, expect):
        kind = {list: "list", dict: "object"}.get(expect, expect.__name__)
        raise RecordError(f"{path}: expected a JSON {kind}{' of ' + what if what else ''}, got {type(data).__name__}")
    return data


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers never see half a file, and a crash
    leaves the old file or the new one. The file is 0644 like any other output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # a lone surrogate (broken model output) cannot be UTF-8: it is written as its escape, which JSON reads back
        # as the same string
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8", errors="backslashreplace"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: Any, indent: int | None = 2) -> None:
    """The one JSON writer of every package (episode files, expert data, pairs, stage records, summaries, trainer
    summaries, benchmark results), atomic as write_text_atomic."""
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=indent))
