"""Build ETO's DPO pairs from exploration outputs and the expert SFT trajectories.

    python scripts/construct_preference.py --explore_dir outputs/explore/webshop \\
        --expert_path data/webshop_sft.json --output_path data/webshop_pairs.json --task webshop

For every task explored by the agent (one <id>.json per task in --explore_dir, as written by
eval_agent; metrics.json is ignored) the expert trajectory with the same id is compared with
the agent's: the higher reward is chosen and the lower rejected; ties give no pair. A pair is
{"id", "prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "outcome"} where the
prompt is the first three turns (instruction, "OK", task), which must be the same in both
trajectories, and chosen/rejected are the rest, starting at the first gpt turn and ending at the
last gpt turn (trailing observations are never trained on). --task NAME applies the task config's
rule for a losing agent trajectory, as the original does: WebShop and ScienceWorld keep at most the
expert's number of rounds (gpt turns) + 5, ALFWorld keeps it whole (`rejected_extra_rounds` in the
config; --rejected_extra_rounds K overrides it). --max_rejected_turns N caps every rejected
trajectory at N gpt turns. Each pair records the cap applied and the rejected side's full length. Episodes ended by an infrastructure failure
(env crash, model server error) or without any action are skipped and counted. Prints win/tie/lose counts (win: the agent beat
the expert) and the number of pairs; the output is written atomically.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from eval_agent.config import TASK_PATH_ENV, ConfigError, describe_tasks, load_task_config
from eval_agent.runner import is_infrastructure_failure

PROMPT_TURNS = 3  # instruction, "OK", task


class InputError(ValueError):
    """Malformed or mismatched input; the message names the file and the record."""


def _check_record(rec, where: str, reward, need_trajectory: bool = True) -> bool:
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
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of SFT records")
    experts = {}
    for i, rec in enumerate(data):
        where = f"{path}: record {i}" + (f" (id={rec.get('id')!r})" if isinstance(rec, dict) else "")
        _check_record(rec, where, rec.get("reward") if isinstance(rec, dict) else None)
        key = str(rec["id"])
        if key in experts:
            raise InputError(f"{where}: duplicate id {rec['id']!r}")
        experts[key] = (rec, where)
    return experts


def load_explored(folder: Path) -> dict:
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    explored = {}
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith("metrics"):  # metrics.json, metrics_part<i>_of_<n>.json
            continue
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: cannot read JSON ({e})") from None
        where = f"{path}" + (f" (id={rec.get('id')!r})" if isinstance(rec, dict) else "")
        meta = rec.get("meta") if isinstance(rec, dict) else None
        if not isinstance(meta, dict):
            raise InputError(f"{where}: missing object field 'meta' (with 'reward')")
        complete = _check_record(rec, where, meta.get("reward"), need_trajectory=False)
        key = str(rec["id"])
        if key in explored:
            raise InputError(f"{where}: id {rec['id']!r} also in {explored[key][1]}")
        # an episode cut short by the infrastructure (env crash, model server error) says nothing about the policy
        if is_infrastructure_failure(meta.get("terminate_reason")) or not complete:
            rec = None
        explored[key] = (rec, where)
    return explored


def _trajectory(turns: list[dict], max_gpt_turns: int | None = None) -> list[dict]:
    """Turns after the prompt, up to the last gpt turn (or the max_gpt_turns-th)."""
    rest = turns[PROMPT_TURNS:]
    gpt_positions = [i for i, t in enumerate(rest) if t["from"] == "gpt"]
    if max_gpt_turns is not None:
        gpt_positions = gpt_positions[:max_gpt_turns]
    return rest[: gpt_positions[-1] + 1]


def _rounds(turns: list[dict]) -> int:
    return sum(t["from"] == "gpt" for t in turns[PROMPT_TURNS:])


def build_pairs(experts: dict, explored: dict, max_rejected_turns: int | None = None,
                ignore_prompt_mismatch: bool = False,
                rejected_extra_rounds: int | None = None) -> tuple[list[dict], dict]:
    """`rejected_extra_rounds`: a losing agent trajectory keeps at most the expert's rounds + this many."""
    pairs = []
    counts = {"win": 0, "tie": 0, "lose": 0, "no_expert": 0, "incomplete": 0}
    for key, (agent, agent_where) in explored.items():
        if agent is None:
            counts["incomplete"] += 1
            continue
        if key not in experts:
            counts["no_expert"] += 1
            continue
        expert, expert_where = experts[key]
        prompt = expert["conversations"][:PROMPT_TURNS]
        if agent["conversations"][:PROMPT_TURNS] != prompt and not ignore_prompt_mismatch:
            raise InputError(f"{agent_where}: its first three turns differ from the expert's ({expert_where}); "
                             "were they produced with the same instruction and task text? "
                             "(--ignore_prompt_mismatch uses the expert's)")
        agent_reward, expert_reward = float(agent["meta"]["reward"]), float(expert["reward"])
        if agent_reward == expert_reward:
            counts["tie"] += 1
            continue
        outcome = "win" if agent_reward > expert_reward else "lose"
        counts[outcome] += 1
        better, worse = (agent, expert) if outcome == "win" else (expert, agent)
        caps = [max_rejected_turns] if max_rejected_turns is not None else []
        if outcome == "lose" and rejected_extra_rounds is not None:
            caps.append(_rounds(expert["conversations"]) + rejected_extra_rounds)
        cap = min(caps) if caps else None
        pairs.append({
            "id": agent["id"], "prompt": prompt,
            "chosen": _trajectory(better["conversations"]),
            "rejected": _trajectory(worse["conversations"], cap),
            "chosen_reward": max(agent_reward, expert_reward), "rejected_reward": min(agent_reward, expert_reward),
            "outcome": outcome, "rejected_cap_rounds": cap, "rejected_rounds_total": _rounds(worse["conversations"]),
        })
    complete = [k for k, (rec, _) in explored.items() if rec is not None]
    if complete and counts["no_expert"] == len(complete):
        raise InputError(f"no expert trajectory matches any of the {len(complete)} explored task ids "
                         f"(e.g. {', '.join(sorted(complete)[:3])}; expert ids look like "
                         f"{', '.join(sorted(experts)[:3])}): is the expert file for this task and in our id format?")
    return pairs, counts


def atomic_write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--explore_dir", required=True, type=Path, help="folder of per-task agent outputs")
    p.add_argument("--expert_path", required=True, type=Path, help="expert SFT file (JSON list with rewards)")
    p.add_argument("--output_path", required=True, type=Path)
    p.add_argument("--max_rejected_turns", type=int, default=None,
                   help="keep at most this many gpt turns of the rejected trajectory")
    p.add_argument("--task", default=None,
                   help=f"task name ({describe_tasks()}; more with --task_path): applies its "
                        "rejected-trajectory rule (rejected_extra_rounds)")
    p.add_argument("--task_path", action="append", default=[], metavar="DIR",
                   help=f"also find task configs in DIR (repeatable; before ${TASK_PATH_ENV}'s folders)")
    p.add_argument("--rejected_extra_rounds", type=int, default=None,
                   help="a losing agent trajectory keeps at most the expert's rounds + K (overrides --task's)")
    p.add_argument("--ignore_prompt_mismatch", action="store_true",
                   help="pair tasks whose first three turns differ (the expert's prompt is used)")
    a = p.parse_args(argv)
    if a.max_rejected_turns is not None and a.max_rejected_turns < 1:
        p.error("--max_rejected_turns must be at least 1")
    extra = a.rejected_extra_rounds
    if extra is None and a.task:
        try:
            extra = load_task_config(a.task, a.task_path).rejected_extra_rounds
        except ConfigError as e:
            p.error(str(e))
    if extra is not None and extra < 0:
        p.error("--rejected_extra_rounds must be >= 0")
    try:
        pairs, counts = build_pairs(load_expert(a.expert_path), load_explored(a.explore_dir),
                                    a.max_rejected_turns, a.ignore_prompt_mismatch, extra)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    atomic_write_json(a.output_path, pairs)
    print(f"win {counts['win']} / tie {counts['tie']} / lose {counts['lose']} (agent vs expert)"
          + (f"; {counts['no_expert']} explored tasks without an expert trajectory" if counts["no_expert"] else "")
          + (f"; {counts['incomplete']} episodes skipped (infrastructure failure or no action)"
             if counts["incomplete"] else ""))
    capped = sum(p["rejected_rounds_total"] > (p["rejected_cap_rounds"] or 10**9) for p in pairs)
    print(f"{len(pairs)} pairs written to {a.output_path}"
          + (f" ({capped} rejected trajectories cut at the expert's rounds + {extra})" if extra is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
