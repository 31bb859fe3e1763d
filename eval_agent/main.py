"""Evaluate (or explore with) an LLM agent on a benchmark split.

    python -m eval_agent.main --agent_config fastchat --model_name SmolLM2-135M-Instruct \
        --exp_config alfworld --split test --num_workers 8

One JSON per task goes to --output_path (default outputs/<model>/<task><exp_name>/<split>),
written atomically; a rerun skips tasks already done unless --override, and redoes those that
ended on an infrastructure failure (model_error, env_error). At the end the average
reward and success rate of the shard are printed and saved as metrics.json (metrics_part<i>_of_<n>.json
for a shard of --part_num > 1).

Exit status: 0 when every episode of the shard has a result, 1 when some ended on an infrastructure
failure (rerun to complete them), 2 for bad arguments or configs.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

from eval_agent.agents import Agent, load_agent_config, make_agent
from eval_agent.agents.base import MAX_NEW_TOKENS, TEMPERATURE, TOP_P
from eval_agent.config import TASK_PATH_ENV, ConfigError, describe_tasks, load_task_config
from eval_agent.envs.base import EPISODE_PROTOCOL
from eval_agent.runner import (
    EnvPool,
    compute_metrics,
    is_complete,
    is_infrastructure_failure,
    read_result,
    run_episode,
    task_filename,
)
from eval_agent.tasks.base import shard, spread_subset
from fastchat.records import write_json_atomic
from fastchat.reporting import Progress

log = logging.getLogger("eval_agent")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agent_config", default="fastchat",
                   help="agent config: a name in --agent_path (default eval_agent/configs/model) or a JSON path")
    p.add_argument("--agent_path", default=None, help="folder of agent configs")
    p.add_argument("--exp_config", default="webshop",
                   help=f"task: a task name ({describe_tasks()}; more with --task_path) or a YAML path")
    # --exp_path: the original ETO's name for it
    p.add_argument("--task_path", "--exp_path", action="append", default=[], metavar="DIR",
                   help=f"also find task configs in DIR (repeatable; after eval_agent/configs/task, before "
                        f"${TASK_PATH_ENV}'s folders)")
    p.add_argument("--exp_name", default="", help="suffix of the default output folder, e.g. _sft")
    p.add_argument("--model_name", default=None, help="model name served by the controller (overrides the config)")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument("--part_num", type=int, default=1, help="split the tasks into this many shards")
    p.add_argument("--part_idx", type=int, default=0, help="which shard to run (0-based; -1 = 0)")
    p.add_argument("--output_path", default=None, help="folder for the per-task JSON files and metrics")
    p.add_argument("--num_workers", type=int, default=1, help="episodes run concurrently (one env each)")
    p.add_argument("--max_tasks", type=int, default=None, help="run only the first N tasks of the shard")
    p.add_argument("--sample_tasks", type=int, default=None,
                   help="run a fixed, seeded subset of N tasks of the shard, spread evenly over the task types")
    p.add_argument("--sample_seed", type=int, default=0, help="seed of --sample_tasks (default 0)")
    p.add_argument("--task_ids", default=None,
                   help="JSON file with a list of task ids: play only these tasks of the split (before sampling)")
    p.add_argument("--max_steps", type=int, default=None, help="lower every episode's step limit (small runs)")
    # generation knobs: None = the agent config's, else the agent's default (eval_agent/agents/base.py)
    p.add_argument("--temperature", type=float, default=None,
                   help=f"sampling temperature, 0 = greedy (default: the agent config's, else {TEMPERATURE})")
    p.add_argument("--top_p", type=float, default=None,
                   help=f"nucleus sampling (default: the agent config's, else {TOP_P})")
    p.add_argument("--samples_per_task", type=int, default=1,
                   help="play each task K times (sample k -> <id>__s<k>.json; use --temperature > 0); metrics add "
                        "best-of-K reward and pass@K")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help=f"tokens per answer (default: the agent config's, else {MAX_NEW_TOKENS})")
    p.add_argument("--icl_num", type=int, default=None, help="in-context examples (default: the task config's)")
    p.add_argument("--controller_address", default=None, help="FastChat controller URL (fastchat agent)")
    p.add_argument("--verbose", action="store_true", help="log every model answer and observation")
    p.add_argument("--debug", action="store_true",
                   help="debug logging, one episode at a time, and env exceptions stop the run with a traceback")
    p.add_argument("--override", action="store_true", help="redo tasks that already have a result file")
    args = p.parse_args(argv)
    if args.part_idx == -1:
        args.part_idx = 0
    if args.part_num < 1 or not 0 <= args.part_idx < args.part_num:
        p.error(f"need --part_num >= 1 and 0 <= --part_idx < --part_num, got {args.part_num} and {args.part_idx}")
    if args.num_workers < 1:
        p.error("--num_workers must be >= 1")
    if args.max_tasks is not None and args.max_tasks < 0:
        p.error("--max_tasks must be >= 0")
    if args.sample_tasks is not None and args.sample_tasks < 1:
        p.error("--sample_tasks must be >= 1")
    if args.samples_per_task < 1:
        p.error("--samples_per_task must be >= 1")
    if args.icl_num is not None and args.icl_num < 0:
        p.error("--icl_num must be >= 0")
    if args.max_steps is not None and args.max_steps < 1:
        p.error("--max_steps must be >= 1")
    return args


def default_output_path(model_name: str, task_name: str, exp_name: str, split: str) -> Path:
    return Path("outputs") / model_name.strip("/").replace("/", "_") / f"{task_name}{exp_name}" / split


def metrics_filename(part_num: int, part_idx: int) -> str:
    return "metrics.json" if part_num == 1 else f"metrics_part{part_idx}_of_{part_num}.json"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.debug else logging.WARNING)
    if args.debug:
        args.num_workers = 1
    try:
        return run(args)
    except ConfigError as e:
        log.error("%s", e)
        return 2


def run(args: argparse.Namespace, agent: Agent | None = None, envs: EnvPool | None = None) -> int:
    """Run the shard described by `args`. `agent` replaces the one built from --agent_config;
    `envs` lends already started envs. Lent agents and envs are left open."""
    cfg = load_task_config(args.exp_config, args.task_path)
    own_agent = agent is None
    if agent is None:
        agent_path, agent_raw = load_agent_config(args.agent_config, args.agent_path)
        overrides: dict[str, Any] = {"model_name": args.model_name, "temperature": args.temperature,
                                     "top_p": args.top_p, "max_new_tokens": args.max_new_tokens}
        if args.controller_address:
            overrides["controller_address"] = args.controller_address
        agent = make_agent(agent_path, agent_raw, **overrides)
        agent_class = agent_raw["agent_class"]
    else:
        agent_class = type(agent).__name__
    icl_num = cfg.icl_num if args.icl_num is None else args.icl_num

    tasks = shard(cfg.make_loader().load(args.split), args.part_num, args.part_idx)
    if args.task_ids:
        tasks = only_ids(tasks, Path(args.task_ids), cfg.name, args.split)
    if args.sample_tasks is not None:
        tasks = spread_subset(tasks, args.sample_tasks, args.sample_seed)
    if args.max_tasks is not None:
        tasks = tasks[: args.max_tasks]
    k_samples = args.samples_per_task
    names = [task_filename(t.id, k, k_samples) for t in tasks for k in range(k_samples)]
    if len(set(names)) != len(names):
        raise ConfigError(f"{cfg.path}: task ids map to clashing file names; ids must stay distinct after "
                          "replacing characters other than letters, digits, '.', '-' and '_'")
    out_dir = Path(args.output_path) if args.output_path else default_output_path(
        agent.model_name, cfg.name, args.exp_name, args.split)
    out_dir.mkdir(parents=True, exist_ok=True)
    if k_samples > 1 and not agent.temperature:
        log.warning("--samples_per_task %d with temperature 0: greedy samples of a task are alike", k_samples)

    episodes = [(task, k) for task in tasks for k in range(k_samples)]
    records: dict[tuple[str, int], dict[str, Any] | None] = {(t.id, k): None for t, k in episodes}
    todo, outdated = [], 0
    for (task, k), name in zip(episodes, names):
        existing = None if args.override else read_result(out_dir / name)
        if is_complete(existing) and existing["meta"].get("episode_protocol") == EPISODE_PROTOCOL:
            records[task.id, k] = existing
        else:
            outdated += is_complete(existing)
            todo.append((task, k, name))
    if outdated:
        log.warning("%s: %d finished episodes were played under another episode protocol (not %d); they are played "
                    "again", out_dir, outdated, EPISODE_PROTOCOL)
    log.info("%s/%s: %d tasks%s in shard %d/%d, %d already done, %d to run -> %s", cfg.name, args.split, len(tasks),
             f" x {k_samples} samples" if k_samples > 1 else "", args.part_idx, args.part_num,
             len(episodes) - len(todo), len(todo), out_dir)

    instruction, icl_messages = cfg.instruction_text(), cfg.icl_messages()
    run_meta = {"split": args.split, "task_config": cfg.name, "model_name": agent.model_name, "icl_num": icl_num,
                "agent_class": agent_class, "temperature": agent.temperature,
                "top_p": agent.top_p, "max_new_tokens": agent.max_new_tokens, "max_steps_cap": args.max_steps,
                "samples_per_task": k_samples, "episode_protocol": EPISODE_PROTOCOL,
                "sample_tasks": args.sample_tasks, "sample_seed": args.sample_seed}

    own_envs = envs is None
    envs = envs or EnvPool(cfg)

    def play(task, k, name):
        record = run_episode(cfg, task, agent, icl_num, instruction, icl_messages, envs=envs,
                             max_steps=args.max_steps, verbose=args.verbose, raise_errors=args.debug)
        record["meta"].update(run_meta, sample=k)
        if _json_safe(task.data):
            record["meta"]["task"] = task.data
        write_json_atomic(out_dir / name, record)
        return k, record

    with logging_redirect_tqdm(), ThreadPoolExecutor(max_workers=args.num_workers) as pool, \
            Progress(len(todo), f"{cfg.name}/{args.split}", "episodes") as bar:
        futures = [pool.submit(play, task, k, name) for task, k, name in todo]
        reward_sum, num_played = 0.0, 0
        try:
            for future in as_completed(futures):
                k, record = future.result()
                records[record["id"], k] = record
                meta = record["meta"]
                if is_infrastructure_failure(meta["terminate_reason"]):
                    log.warning("task %s failed: %s", record["id"], meta["terminate_reason"])
                reward_sum, num_played = reward_sum + meta["reward"], num_played + 1
                bar.update(avg_reward=f"{reward_sum / num_played:.3f}")
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        finally:
            if own_envs:
                envs.close_all()
            if own_agent:
                agent.close()

    metrics = compute_metrics(list(records.values()), len(tasks), k_samples)
    metrics.update(run_meta, part_num=args.part_num, part_idx=args.part_idx, output_path=str(out_dir))
    write_json_atomic(out_dir / metrics_filename(args.part_num, args.part_idx), metrics)
    print(f"{cfg.name}/{args.split} ({metrics['num_tasks']} tasks): average reward {metrics['average_reward']:.4f}, "
          f"success (the original's) {metrics['success_rate']:.4f}, solved {metrics['solved_rate']:.4f}, "
          + (f"best-of-{k_samples} reward {metrics['best_of_k_reward']:.4f}, pass@{k_samples} "
             f"{metrics['pass_at_k']:.4f}, " if k_samples > 1 else "") + "infrastructure failures "
          f"{metrics['num_infrastructure_failures']} -> {out_dir}")
    if metrics["num_infrastructure_failures"] or metrics["num_missing"]:
        print(f"some episodes failed ({metrics['infrastructure_failures']}); rerun the same command to complete "
              "them", file=sys.stderr)
        return 1
    return 0


def only_ids(tasks: list, path: Path, task_name: str, split: str) -> list:
    try:
        wanted = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--task_ids {path}: cannot read a JSON list of ids ({e})") from None
    if not isinstance(wanted, list):
        raise ConfigError(f"--task_ids {path}: expected a JSON list of task ids")
    wanted = {str(i) for i in wanted}
    kept = [t for t in tasks if t.id in wanted]
    if not kept:
        raise ConfigError(f"--task_ids {path}: none of its {len(wanted)} ids (e.g. {sorted(wanted)[:3]}) is a "
                          f"{task_name}/{split} task (ids look like {[t.id for t in tasks[:3]]})")
    return kept


def _json_safe(data: Any) -> bool:
    try:
        json.dumps(data)
        return True
    except (TypeError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(main())
