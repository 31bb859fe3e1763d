"""Build the RL data file of one rollout step from explored episodes: GRPO, GiGPO or PPO (docs/rl.md#rl-data).

    python -m scripts.rl_data --explore_dir outputs/run/rollout_step1 --output_path data/rl_step1.json --method grpo
    python -m scripts.rl_data --explore_dir D --output_path F --method gigpo [--gamma 0.95] [--step_weight 1.0] \\
        [--state_key observation|history]
    python -m scripts.rl_data --explore_dir D --output_path F --method ppo [--gamma 1.0]

--explore_dir holds the episode files eval_agent writes (<id>__s<k>.json per sample with --samples_per_task K;
metrics files are ignored), read as the pair builder reads them (scripts/pairs/files.py): episodes ended by an
infrastructure failure (env crash, model server error) or without any action are skipped and counted. The K
episodes of a task id form its group. One record per episode (fastchat/train/train_pg.py reads them):

    {"id", "sample", "group" (the task id), "reward" (meta.reward), "policy_version" (the max of meta
     "policy_versions", null without), "conversations" (the episode's, as stored), "context" (the in-context
     example turns the episode's prompt held: its task config's (meta "task_config", found as eval_agent finds
     tasks, with $ETO_TASK_PATH or --task_path) when meta "icl_num" > 0, else none; the trainer puts them back
     between "OK" and the task so that it scores the answers in the prompt they were sampled in), "advantages" and
     "returns" (one float per gpt turn after the prompt: every token of gpt turn i gets advantages[i])}

Per-step rewards: the rise of the episode's reward over each agent step (meta "step_scores": the env's reward after
each step, so they add up to the final reward; ScienceWorld's progress score and WebShop/ALFWorld's final reward
alike). Episode files from before step scores were recorded: 0 at every step but the last, which gets the reward.
  grpo: advantages[i] = the episode's GRPO advantage (its reward normalised within its group) at every turn.
  gigpo: the GRPO advantage + --step_weight x the step's GiGPO advantage (its discounted return normalised within
    the task's steps taken from the same state, --state_key saying what "the same state" is).
  ppo: advantages are 0 placeholders; the trainer computes GAE from the returns with its value head (its
    --gae_gamma must be this --gamma to recover the step rewards from the returns).
returns: the discounted return of each step with --gamma, for every method.

The records go to --output_path and their counts (episodes, groups, groups whose rewards are all equal, reward mean
and std, steps) to <output>.stats.json beside it, both written atomically.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from eval_agent.config import ConfigError, load_task_config
from eval_agent.run_layout import pair_stats_file
from fastchat.records import PROMPT_TURNS, RecordError, messages_to_turns, write_json_atomic
from fastchat.train.advantages import discounted_returns, gigpo_step_advantages, grpo_advantages
from scripts.pairs.files import InputError, load_explored

METHODS = ("grpo", "gigpo", "ppo")
DEFAULT_GAMMA = {"grpo": 1.0, "gigpo": 0.95, "ppo": 1.0}  # gigpo: GiGPO's (Feng et al. 2025)
STATE_KEYS = ("observation", "history")


def rl_stats_file(output_path: Path) -> Path:
    """The counts beside the records, named as the pair builder's: rl_step1.json -> rl_step1.stats.json."""
    return pair_stats_file(output_path)


def agent_turns(turns: list[dict]) -> list[int]:
    """The indexes of the gpt turns after the prompt: the agent's steps."""
    return [i for i in range(PROMPT_TURNS, len(turns)) if turns[i]["from"] == "gpt"]


def step_rewards(record: dict) -> list[float]:
    """Each agent step's reward: the rise of the episode's reward over the step (meta "step_scores", the env's
    reward after each step; they add up to the final reward). Episode files written before step scores were
    recorded: 0 at every step but the last, which gets the final reward."""
    steps = len(agent_turns(record["conversations"]))
    scores = record["meta"].get("step_scores")
    if isinstance(scores, list) and len(scores) == steps and steps:
        return [float(b) - float(a) for a, b in zip([0.0] + scores[:-1], scores)]
    return [0.0] * (steps - 1) + [float(record["meta"]["reward"])]


def state_key(turns: list[dict], i: int, kind: str) -> str:
    """What identifies the state gpt turn i acted on. observation: the text of the last human turn before it (the
    task text for the first step); history: every turn before it."""
    if kind == "observation":
        return next(t["value"] for t in reversed(turns[:i]) if t["from"] == "human")
    return json.dumps([[t["from"], t["value"]] for t in turns[:i]], ensure_ascii=False)


def policy_version(record: dict, where: str) -> int | None:
    versions = record["meta"].get("policy_versions")
    if not versions:
        return None
    if not isinstance(versions, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in versions):
        raise InputError(f"{where}: meta field 'policy_versions' must be a list of integers, got {versions!r}")
    return max(versions)


class PromptContext:
    """The in-context example turns of each task config an episode names, loaded once per config."""

    def __init__(self, task_path: list[str] = ()):
        self.task_path, self.loaded = list(task_path), {}

    def __call__(self, meta: dict, where: str) -> list[dict]:
        name = meta.get("task_config")
        if not meta.get("icl_num") or name is None:  # no example in the prompt, or a hand-made episode
            return []
        if name not in self.loaded:
            try:
                self.loaded[name] = messages_to_turns(load_task_config(name, self.task_path).icl_messages())
            except ConfigError as e:
                raise InputError(f"{where}: meta field 'task_config' {name!r}: {e}") from None
        return self.loaded[name]


def build(explored: dict, method: str, gamma: float, step_weight: float = 1.0, key_kind: str = "observation",
          eps: float = 1e-6, context: PromptContext | None = None) -> tuple[list[dict], dict]:
    """`explored` as scripts.pairs.files.load_explored loads it; (records, stats). `context` finds the in-context
    example turns of each episode's prompt (default: from the task configs eval_agent finds)."""
    context = context or PromptContext()
    records, skipped, identical, step_group_sizes = [], 0, 0, []
    for key, samples in explored.items():
        usable = sorted(((rec, where) for rec, where in samples if rec is not None),
                        key=lambda s: s[0]["meta"].get("sample", 0))
        skipped += len(samples) - len(usable)
        if not usable:
            continue
        rewards = [float(rec["meta"]["reward"]) for rec, _ in usable]
        identical += min(rewards) == max(rewards)
        episode_adv = grpo_advantages(rewards, eps)
        if method == "gigpo":
            steps = [[(state_key(rec["conversations"], i, key_kind), r)
                      for i, r in zip(agent_turns(rec["conversations"]), step_rewards(rec))] for rec, _ in usable]
            step_adv = gigpo_step_advantages(steps, gamma, eps)
            keys = [k for episode in steps for k, _ in episode]
            step_group_sizes += [keys.count(k) for k in dict.fromkeys(keys)]
        for k, (rec, where) in enumerate(usable):
            n = len(agent_turns(rec["conversations"]))
            if method == "grpo":
                advantages = [episode_adv[k]] * n
            elif method == "gigpo":
                advantages = [episode_adv[k] + step_weight * a for a in step_adv[k]]
            else:
                advantages = [0.0] * n
            records.append({"id": rec["id"], "sample": rec["meta"].get("sample", 0), "group": rec["id"],
                            "reward": rewards[k], "policy_version": policy_version(rec, where),
                            "conversations": rec["conversations"], "context": context(rec["meta"], where),
                            "advantages": advantages,
                            "returns": discounted_returns(step_rewards(rec), gamma)})
    if not records:
        raise InputError(f"no usable episode among {skipped} (all ended by an infrastructure failure or without "
                         "any action, or the folder holds no episode files)")
    rewards = [r["reward"] for r in records]
    mean = sum(rewards) / len(rewards)
    stats = {
        "method": method, "gamma": gamma, "eps": eps,
        **({"step_weight": step_weight, "state_key": key_kind} if method == "gigpo" else {}),
        "episodes": len(records), "skipped": skipped,
        "groups": len({str(r["group"]) for r in records}),
        "groups_identical_rewards": identical,  # no GRPO signal; GiGPO's step advantages may still have some
        "mean_reward": mean, "std_reward": math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards)),
        "mean_steps": sum(len(r["advantages"]) for r in records) / len(records),
        "episodes_with_context": sum(bool(r["context"]) for r in records),
        "policy_versions": sorted({r["policy_version"] for r in records if r["policy_version"] is not None}),
    }
    if method != "ppo":  # ppo's advantages are all placeholders
        stats["episodes_zero_advantages"] = sum(not any(r["advantages"]) for r in records)
    if method == "gigpo":
        stats["step_groups"] = len(step_group_sizes)
        stats["steps_in_shared_step_groups"] = sum(n for n in step_group_sizes if n > 1)
    return records, stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--explore_dir", required=True, type=Path,
                   help="folder of episode files (<id>__s<k>.json per sample) of one rollout step")
    p.add_argument("--output_path", required=True, type=Path, help="the RL data file to write (a JSON list)")
    p.add_argument("--method", required=True, choices=METHODS,
                   help="grpo: the episode's group-relative advantage at every step; gigpo: that + --step_weight x "
                        "the step's advantage within its state group; ppo: advantage placeholders (0), the trainer "
                        "computes GAE from the returns")
    p.add_argument("--gamma", type=float, default=None,
                   help="discount of the step returns, in [0, 1] (default: "
                        + ", ".join(f"{m} {g}" for m, g in DEFAULT_GAMMA.items()) + ")")
    p.add_argument("--step_weight", type=float, default=None,
                   help="gigpo only: weight of the step advantage added to the episode advantage (default 1.0)")
    p.add_argument("--state_key", choices=STATE_KEYS, default=None,
                   help="gigpo only: what makes two steps' states the same: observation (default; GiGPO's anchor "
                        "state: the text of the observation the step acted on) or history (every turn before it)")
    p.add_argument("--task_path", action="append", default=[], metavar="DIR",
                   help="more folders of task configs, where the episodes' task config is found (as eval_agent's)")
    p.add_argument("--eps", type=float, default=1e-6,
                   help="added to the std when normalising advantages (grpo, gigpo)")
    a = p.parse_args(argv)
    if a.method != "gigpo" and (a.step_weight is not None or a.state_key is not None):
        p.error(f"--step_weight and --state_key are gigpo's; --method {a.method} does not use them")
    gamma = DEFAULT_GAMMA[a.method] if a.gamma is None else a.gamma
    if not 0.0 <= gamma <= 1.0:
        p.error(f"--gamma must be in [0, 1], got {gamma}")
    if a.eps < 0:
        p.error(f"--eps must be >= 0, got {a.eps}")
    try:
        records, stats = build(load_explored(a.explore_dir), a.method, gamma,
                               1.0 if a.step_weight is None else a.step_weight, a.state_key or "observation", a.eps,
                               PromptContext(a.task_path))
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json_atomic(a.output_path, records)
    write_json_atomic(rl_stats_file(a.output_path), stats)
    print(f"{stats['episodes']} episodes in {stats['groups']} groups written to {a.output_path} ({a.method}, gamma "
          f"{gamma}); mean reward {stats['mean_reward']:.3f}; {stats['groups_identical_rewards']} groups with equal "
          f"rewards; {stats['skipped']} episodes skipped (infrastructure failure or no action)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
