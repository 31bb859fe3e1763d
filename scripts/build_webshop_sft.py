"""Build WebShop expert trajectories (SFT data) with the goal-aware oracle.

    python -m scripts.build_webshop_sft [--split train] [--num_goals 2000] [--min_reward 0.7]
                                        [--out data/webshop_sft.json]

Plays the oracle (webshop.oracle) through eval_agent's WebShop env on the first N goals of the split, keeps
trajectories with reward >= --min_reward (WebShop's own filter for its demonstrations) and writes them atomically as
a JSON list of {"id", "conversations", "reward"} in the project's SFT format. Prints the reward distribution.

If the official ETO file data/eto_sft/webshop_sft.json exists it is converted to our format
(scripts.convert_eto_sft; --rebuild, a split other than train or fewer --num_goals than the train split has
build ours instead, and so does a refused file, e.g. when our shop has synthetic goals only). --min_reward applies to
our build only.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path

from eval_agent.config import load_task_config
from eval_agent.paths import data_dir, webshop_data_dir
from fastchat.records import record_turns, trajectory_record, write_json_atomic
from scripts.convert_eto_sft import official_path, try_official
from webshop.oracle import load_query_map, oracle_plan


def play(env, plan) -> tuple[list[dict[str, str]], float]:
    """Run the plan through the env; return the turns after the task text and the final reward."""
    turns, reward = [], 0.0
    for i, (thought, action) in enumerate(plan):
        answer = f"Thought: {thought}\nAction: {action}"
        observation, reward, done, info = env.step(answer)
        if not info["valid_format"]:
            raise RuntimeError(f"oracle produced an unparsable answer: {answer!r}")
        turns.append({"from": "gpt", "value": answer})
        if done:
            break
        turns.append({"from": "human", "value": observation})
    return turns, reward


def build(split: str, num_goals: int | None, min_reward: float) -> tuple[list[dict], list[float], int]:
    cfg = load_task_config("webshop")
    tasks = cfg.make_loader().load(split)[:num_goals]
    env_class, instruction = cfg.env_class(), cfg.instruction_text()
    query_map = load_query_map(webshop_data_dir() / "goal_query_map.json")
    records, rewards, unfound = [], [], 0
    for task in tasks:
        env = env_class(task, max_steps=cfg.max_steps, **cfg.env_options)
        task_text = env.reset()
        plan = oracle_plan(env.env.shop, env.env.shop.goals[task.data["goal_idx"]], query_map)
        if plan is None or len(plan) > cfg.max_steps:
            unfound += 1
            continue
        turns, reward = play(env, plan)
        rewards.append(reward)
        if reward >= min_reward:
            records.append(trajectory_record(task.id, record_turns(instruction, task_text) + turns, reward=reward))
    return records, rewards, unfound


def distribution(rewards: list[float]) -> str:
    bins = Counter(min(int(r * 10), 9) for r in rewards)
    rows = [f"  [{b / 10:.1f}, {(b + 1) / 10:.1f}{']' if b == 9 else ')'}: {bins[b]}" for b in range(10) if bins[b]]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="train", choices=["train", "dev", "test"])
    parser.add_argument("--num_goals", type=int, default=2000, help="first N goals of the split (0 = all)")
    parser.add_argument("--min_reward", type=float, default=0.7)
    parser.add_argument("--out", type=Path, default=None, help="default: data/webshop_sft.json")
    parser.add_argument("--rebuild", action="store_true", help="build ours even if the official file exists")
    args = parser.parse_args(argv)
    out = args.out or data_dir() / "webshop_sft.json"
    if not args.rebuild and args.split == "train" and official_path("webshop").exists():
        train_goals = len(load_task_config("webshop").make_loader().load("train"))
        if try_official("webshop", out, whole_train_split=not args.num_goals or args.num_goals >= train_goals):
            return 0
    records, rewards, unfound = build(args.split, args.num_goals or None, args.min_reward)
    if not rewards:
        print("no trajectory was played", file=sys.stderr)
        return 1
    write_json_atomic(out, records, indent=1)
    print(f"goals played: {len(rewards)} (target not found: {unfound})")
    print(f"reward mean {statistics.mean(rewards):.4f}, median {statistics.median(rewards):.4f}, "
          f"min {min(rewards):.4f}, reward 1.0: {sum(r >= 1.0 for r in rewards)}")
    print("reward distribution:\n" + distribution(rewards))
    print(f"kept {len(records)} trajectories with reward >= {args.min_reward} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
