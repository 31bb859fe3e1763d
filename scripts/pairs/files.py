"""The pair builder's files: the expert and explored records it reads, loaded and checked, and where its counts go.

Expert file: a JSON list of trajectory records with "reward" (fastchat.records). Explored folder: one episode record
per task and sample as eval_agent writes it (<id>.json, or <id>__s<k>.json with --samples_per_task K; metrics files
are ignored). Malformed or mismatched input raises InputError naming the file and the record.
"""
from __future__ import annotations

from pathlib import Path

from eval_agent.runner import is_infrastructure_failure
from fastchat.records import PROMPT_TURNS, RecordError, read_json, record_where


class InputError(RecordError):
    """Malformed or mismatched input; the message names the file and the record."""


def check_record(rec, where: str, reward, need_trajectory: bool = True) -> bool:
    """Refuse a malformed record; return whether it holds a trajectory after the prompt."""
    if not isinstance(rec, dict):
        raise InputError(f"{where}: expected an object, got {type(rec).__name__}")
    if "id" not in rec:
        raise InputError(f"{where}: missing field 'id'")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)):
        raise InputError(f"{where}: reward must be a number, got {reward!r}")
    turns = rec.get("conversations")
    if not isinstance(turns, list):
        raise InputError(f"{where}: field 'conversations' must be a list of turns")
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("from") not in ("human", "gpt") or not isinstance(t.get("value"), str):
            raise InputError(f"{where}: conversations[{i}] must be {{'from': 'human'|'gpt', 'value': str}}")
    if turns and [t["from"] for t in turns[:PROMPT_TURNS]] != ["human", "gpt", "human"]:
        raise InputError(f"{where}: the first three turns must be human (instruction), gpt (OK), human (task)")
    has_trajectory = len(turns) > PROMPT_TURNS and turns[PROMPT_TURNS]["from"] == "gpt"
    if need_trajectory and not has_trajectory:
        raise InputError(f"{where}: field 'conversations' needs the instruction, OK and task turns followed by "
                         "the trajectory, starting with a gpt turn")
    return has_trajectory


def load_expert(path: Path) -> dict:
    """{task id: (record, where)} of an expert file."""
    experts = {}
    for i, rec in enumerate(read_json(path, list, "SFT records")):
        where = record_where(path, i, rec)
        check_record(rec, where, rec.get("reward") if isinstance(rec, dict) else None)
        key = str(rec["id"])
        if key in experts:
            raise InputError(f"{where}: duplicate id {rec['id']!r}")
        experts[key] = (rec, where)
    return experts


def load_explored(folder: Path) -> dict[str, list]:
    """{task id: [(record, where) per sample]}; a record is None when its episode cannot form a pair."""
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    explored: dict[str, list] = {}
    seen: dict[tuple[str, int], str] = {}
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith("metrics"):  # metrics.json, metrics_part<i>_of_<n>.json
            continue
        rec = read_json(path)
        where = record_where(path, record=rec)
        meta = rec.get("meta") if isinstance(rec, dict) else None
        if not isinstance(meta, dict):
            raise InputError(f"{where}: missing object field 'meta' (with 'reward')")
        complete = check_record(rec, where, meta.get("reward"), need_trajectory=False)
        key, sample = str(rec["id"]), meta.get("sample", 0)
        if (key, sample) in seen:
            raise InputError(f"{where}: id {rec['id']!r} sample {sample} also in {seen[key, sample]}")
        seen[key, sample] = where
        # an episode cut short by the infrastructure (env crash, model server error) says nothing about the policy
        if is_infrastructure_failure(meta.get("terminate_reason")) or not complete:
            rec = None
        explored.setdefault(key, []).append((rec, where))
    return explored
