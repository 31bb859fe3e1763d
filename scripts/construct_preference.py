"""Build DPO pairs from exploration outputs: the expert rule (ETO's), the self rule (no expert) or step pairs.

    python scripts/construct_preference.py --explore_dir outputs/explore/webshop \\
        --expert_path data/webshop_sft.json --output_path data/webshop_pairs.json --task webshop
    python scripts/construct_preference.py --rule self --explore_dir D --output_path P --task webshop
    python scripts/construct_preference.py --rule step --explore_dir D --expert_path E --output_path P \\
        --task alfworld --controller_address http://127.0.0.1:21001 --model_name M [--rollouts 3]

--explore_dir holds one <id>.json per task as eval_agent writes it (or <id>__s<k>.json per sample with
--samples_per_task K; metrics.json is ignored). Rule `expert` (default, as the original): the expert trajectory
with the same id is compared with each agent sample: the higher reward is chosen and the lower rejected; ties
give no pair. Rule `self`: among a task's K samples, the highest reward is chosen and the lowest rejected, when
they differ by more than --min_reward_gap. Rule `step`: IPR-style step-level pairs, valued by Monte-Carlo
rollouts of the current model through the real env (scripts/step_pairs.py says how).

A pair is {"id", "kind", "rule", "prompt", "chosen", "rejected", ...} where the prompt is the first three turns
(instruction, "OK", task; for step pairs also the expert's first steps), which must be the same on both sides,
and chosen/rejected are the rest, starting at the first gpt turn and ending at the last gpt turn (trailing
observations are never trained on). --task NAME applies the task config's rule for a losing trajectory, as the
original does: WebShop and ScienceWorld keep at most the chosen side's number of rounds (gpt turns) + 5,
ALFWorld keeps it whole (`rejected_extra_rounds` in the config; --rejected_extra_rounds K overrides it).
--max_rejected_turns N caps every rejected trajectory at N gpt turns. Each pair records the cap applied and the
rejected side's full length. Episodes ended by an infrastructure failure (env crash, model server error) or
without any action are skipped and counted. Counts are printed and written to <output>.stats.json beside the
pairs (with the rollouts' env steps and tokens for step pairs); every output is written atomically.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_pairs, beside this script

from eval_agent.config import TASK_PATH_ENV, ConfigError, describe_tasks, load_task_config  # noqa: E402
from eval_agent.runner import is_infrastructure_failure, write_json_atomic  # noqa: E402

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


def load_explored(folder: Path) -> dict[str, list]:
    """{task id: [(record, where) per sample]}; a record is None when its episode cannot form a pair."""
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    explored: dict[str, list] = {}
    seen: dict[tuple[str, int], str] = {}
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
        key, sample = str(rec["id"]), meta.get("sample", 0)
        if (key, sample) in seen:
            raise InputError(f"{where}: id {rec['id']!r} sample {sample} also in {seen[key, sample]}")
        seen[key, sample] = where
        # an episode cut short by the infrastructure (env crash, model server error) says nothing about the policy
        if is_infrastructure_failure(meta.get("terminate_reason")) or not complete:
            rec = None
        explored.setdefault(key, []).append((rec, where))
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


def _pair(key: str, prompt: list[dict], better: dict, worse: dict, rewards: tuple[float, float], rule: str,
          outcome: str, cap: int | None) -> dict:
    return {"id": key, "kind": "trajectory", "rule": rule, "prompt": prompt,
            "chosen": _trajectory(better["conversations"]), "rejected": _trajectory(worse["conversations"], cap),
            "chosen_reward": rewards[0], "rejected_reward": rewards[1], "outcome": outcome,
            "rejected_cap_rounds": cap, "rejected_rounds_total": _rounds(worse["conversations"]),
            # which sample of the task each side is (None: the expert's), to find its episode file
            "chosen_sample": better.get("meta", {}).get("sample"),
            "rejected_sample": worse.get("meta", {}).get("sample")}


def _cap(chosen: dict, max_rejected_turns: int | None, extra_rounds: int | None) -> int | None:
    caps = [max_rejected_turns] if max_rejected_turns is not None else []
    if extra_rounds is not None:
        caps.append(_rounds(chosen["conversations"]) + extra_rounds)
    return min(caps) if caps else None


def build_pairs(experts: dict, explored: dict, max_rejected_turns: int | None = None,
                ignore_prompt_mismatch: bool = False, rejected_extra_rounds: int | None = None,
                rule: str = "expert", min_reward_gap: float = 0.0) -> tuple[list[dict], dict]:
    """Rule `expert`: the expert trajectory vs each agent sample of its task (a losing agent trajectory keeps at
    most the expert's rounds + `rejected_extra_rounds`). Rule `self`: among a task's samples, the best vs the
    worst when their rewards differ by more than `min_reward_gap` (the worst keeps at most the best's rounds +
    `rejected_extra_rounds`); no expert needed."""
    if rule == "self":
        return _self_pairs(explored, max_rejected_turns, rejected_extra_rounds, min_reward_gap)
    pairs = []
    counts = {"win": 0, "tie": 0, "lose": 0, "no_expert": 0, "incomplete": 0}
    for key, samples in explored.items():
        for agent, agent_where in samples:
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
            if outcome == "win":
                pairs.append(_pair(key, prompt, agent, expert, (agent_reward, expert_reward), "expert", outcome,
                                   _cap(agent, max_rejected_turns, None)))
            else:
                pairs.append(_pair(key, prompt, expert, agent, (expert_reward, agent_reward), "expert", outcome,
                                   _cap(expert, max_rejected_turns, rejected_extra_rounds)))
    complete = [k for k, samples in explored.items() if any(rec is not None for rec, _ in samples)]
    if complete and counts["no_expert"] == sum(rec is not None for s in explored.values() for rec, _ in s):
        raise InputError(f"no expert trajectory matches any of the {len(complete)} explored task ids "
                         f"(e.g. {', '.join(sorted(complete)[:3])}; expert ids look like "
                         f"{', '.join(sorted(experts)[:3])}): is the expert file for this task and in our id format?")
    return pairs, counts


def _self_pairs(explored: dict, max_rejected_turns: int | None, extra_rounds: int | None,
                min_reward_gap: float) -> tuple[list[dict], dict]:
    pairs = []
    counts = {"pairs": 0, "tie": 0, "single": 0, "incomplete": 0}
    for key, samples in explored.items():
        usable = [rec for rec, _ in samples if rec is not None]
        counts["incomplete"] += len(samples) - len(usable)
        if len(usable) < 2:
            counts["single"] += 1
            continue
        ranked = sorted(usable, key=lambda r: float(r["meta"]["reward"]))  # stable: the first-played on ties
        worst, best = ranked[0], ranked[-1]
        rewards = (float(best["meta"]["reward"]), float(worst["meta"]["reward"]))
        if rewards[0] - rewards[1] <= min_reward_gap or rewards[0] == rewards[1]:
            counts["tie"] += 1
            continue
        counts["pairs"] += 1
        pairs.append(_pair(key, best["conversations"][:PROMPT_TURNS], best, worst, rewards, "self", "self",
                           _cap(best, max_rejected_turns, extra_rounds)))
    return pairs, counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--explore_dir", required=True, type=Path, help="folder of per-task agent outputs")
    p.add_argument("--expert_path", type=Path, default=None,
                   help="expert SFT file (JSON list with rewards); needed by the expert and step rules")
    p.add_argument("--output_path", required=True, type=Path)
    p.add_argument("--rule", choices=["expert", "self", "step"], default="expert",
                   help="expert: expert vs each agent sample; self: best vs worst of a task's samples (no expert); "
                        "step: step-level pairs by Monte-Carlo rollouts (needs --controller_address, --model_name)")
    p.add_argument("--min_reward_gap", type=float, default=0.0,
                   help="self rule: pair only when best - worst reward exceeds this")
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
    step = p.add_argument_group("step rule (scripts/step_pairs.py)")
    step.add_argument("--controller_address", default=None, help="FastChat controller serving the current model")
    step.add_argument("--model_name", default=None, help="model name at the controller")
    step.add_argument("--rollouts", type=int, default=3, help="Monte-Carlo rollouts per step value (K)")
    step.add_argument("--margin", type=float, default=0.0, help="pair when value(expert) - value(agent) > margin")
    step.add_argument("--max_prefixes", type=int, default=4, help="expert steps tried per task (spread out)")
    step.add_argument("--rollout_temperature", type=float, default=0.7, help="sampling temperature of rollouts")
    step.add_argument("--num_workers", type=int, default=8, help="rollouts run concurrently")
    step.add_argument("--max_steps", type=int, default=None, help="lower the rollouts' episode step limit")
    step.add_argument("--max_new_tokens", type=int, default=None)
    step.add_argument("--cache_dir", type=Path, default=None,
                      help="rollout episode files (default: <output_path>.rollouts); a rerun reuses them")
    a = p.parse_args(argv)
    if a.max_rejected_turns is not None and a.max_rejected_turns < 1:
        p.error("--max_rejected_turns must be at least 1")
    if a.rule != "self" and a.expert_path is None:
        p.error(f"--rule {a.rule} needs --expert_path")
    if a.rule == "step" and not (a.task and a.controller_address and a.model_name):
        p.error("--rule step needs --task, --controller_address and --model_name (the rollouts play the env)")
    if a.rollouts < 1 or a.max_prefixes < 1:
        p.error("--rollouts and --max_prefixes must be >= 1")
    cfg = None
    if a.task:
        try:
            cfg = load_task_config(a.task, a.task_path)
        except ConfigError as e:
            p.error(str(e))
    extra = a.rejected_extra_rounds if a.rejected_extra_rounds is not None else (
        cfg.rejected_extra_rounds if cfg else None)
    if extra is not None and extra < 0:
        p.error("--rejected_extra_rounds must be >= 0")
    try:
        explored = load_explored(a.explore_dir)
        experts = load_expert(a.expert_path) if a.expert_path else {}
        if a.rule == "step":
            pairs, counts = _step_pairs(a, cfg, experts, explored, extra)
        else:
            pairs, counts = build_pairs(experts, explored, a.max_rejected_turns, a.ignore_prompt_mismatch, extra,
                                        a.rule, a.min_reward_gap)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = {"rule": a.rule, "pairs": len(pairs), **counts}
    write_json_atomic(a.output_path, pairs)
    write_json_atomic(stats_path(a.output_path), counts)
    if a.rule == "expert":
        print(f"win {counts['win']} / tie {counts['tie']} / lose {counts['lose']} (agent vs expert)"
              + (f"; {counts['no_expert']} explored episodes without an expert trajectory" if counts["no_expert"]
                 else "")
              + (f"; {counts['incomplete']} episodes skipped (infrastructure failure or no action)"
                 if counts["incomplete"] else ""))
    else:
        print(", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("rule", "pairs")))
    capped = sum(p["rejected_rounds_total"] > (p["rejected_cap_rounds"] or 10**9) for p in pairs)
    print(f"{len(pairs)} pairs written to {a.output_path} (rule {a.rule})"
          + (f"; {capped} rejected trajectories cut at the chosen side's rounds + {extra}" if extra is not None
             else ""))
    return 0


def stats_path(output_path: Path) -> Path:
    """Where the pair counts (and, for step pairs, the rollouts' cost) are written beside the pairs."""
    return output_path.with_name(output_path.stem + ".stats.json")


def _step_pairs(a, cfg, experts: dict, explored: dict, extra: int | None):
    from step_pairs import Rollouts, agent_for, build_step_pairs

    tasks = {str(t.id): t for t in cfg.make_loader().load("train")}
    agent = agent_for(a.controller_address, a.model_name, a.rollout_temperature, a.max_new_tokens)
    cache = a.cache_dir or a.output_path.with_name(a.output_path.stem + ".rollouts")
    rollouts = Rollouts(cfg, agent, tasks, cache, a.max_steps, a.num_workers)
    try:
        return build_step_pairs(experts, explored, rollouts, a.rollouts, a.margin, a.max_prefixes, extra)
    finally:
        rollouts.close()
        agent.close()


if __name__ == "__main__":
    sys.exit(main())
