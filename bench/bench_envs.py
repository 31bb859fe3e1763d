"""Environment latency: mean step and reset latency per environment.

    python -m bench.bench_envs --env sciworld [--tasks 4]
    python -m bench.bench_envs --env alfworld [--games 6]

Each environment has its own bench_<env>() function returning rows
(name, mean ms, n, note); main() prints them as a table and writes
bench/results/envs_<env>.json.

sciworld: our env (ScienceWorldEnv in eval_agent.envs.sciworld_env: one load per
reset, step = simulator step + score + completion flag) against the package's
default API (load() + reset(), and step(), which also fetches look, inventory,
task text and the full valid-action list). Both replay the same gold paths on the
same JVM, interleaved task by task, so the ratio is measured side by side.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from fastchat.records import write_json_atomic

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Short-to-medium gold paths from four task families (train variations).
SCIWORLD_TASKS = [("find-animal", 0), ("use-thermometer", 45), ("chemistry-mix", 8),
                  ("measure-melting-point-known-substance", 167), ("test-conductivity", 59)]


def _mean_ms(samples: list[float]) -> float:
    return 1000 * statistics.mean(samples) if samples else float("nan")


def bench_sciworld(args) -> list[dict]:
    from eval_agent.envs.sciworld_env import ScienceWorldEnv, simplification_string
    from eval_agent.tasks.base import Task

    def task(name, variation):
        return Task(f"bench-{name}-{variation}", "train",
                    {"task_name": name, "variation": variation, "max_steps": 10_000})

    started = time.perf_counter()
    env = ScienceWorldEnv(task(*SCIWORLD_TASKS[0]), max_steps=10_000)
    package = env.simulator  # the package's ScienceWorldEnv on the same JVM
    jvm_start_s = time.perf_counter() - started
    ours_step, pkg_step, ours_reset, pkg_reset = [], [], [], []
    try:
        for name, variation in SCIWORLD_TASKS[: args.tasks]:
            env.switch_task(task(name, variation))
            gold = env.gold_actions()
            for _ in range(args.repeats):
                t = time.perf_counter()
                env.reset()
                ours_reset.append(time.perf_counter() - t)
                for action in gold:
                    t = time.perf_counter()
                    _, _, done, _ = env.step(f"Action: {action}")
                    ours_step.append(time.perf_counter() - t)
                    if done:
                        break
                assert env.state.success, f"gold path of {name}-{variation} failed in our env"

                t = time.perf_counter()
                package.load(name, variation, simplification_string(name))
                package.reset()
                pkg_reset.append(time.perf_counter() - t)
                for action in gold[: env.state.steps]:
                    t = time.perf_counter()
                    package.step(action)
                    pkg_step.append(time.perf_counter() - t)
    finally:
        env.close()
    step_ratio = _mean_ms(pkg_step) / _mean_ms(ours_step)
    reset_ratio = _mean_ms(pkg_reset) / _mean_ms(ours_reset)
    return [
        {"name": "sciworld step, ours", "mean_ms": _mean_ms(ours_step), "n": len(ours_step), "note": ""},
        {"name": "sciworld step, package default", "mean_ms": _mean_ms(pkg_step), "n": len(pkg_step),
         "note": f"{step_ratio:.1f}x ours"},
        {"name": "sciworld reset, ours", "mean_ms": _mean_ms(ours_reset), "n": len(ours_reset), "note": ""},
        {"name": "sciworld reset, package load+reset", "mean_ms": _mean_ms(pkg_reset), "n": len(pkg_reset),
         "note": f"{reset_ratio:.1f}x ours"},
        {"name": "sciworld JVM start", "mean_ms": 1000 * jvm_start_s, "n": 1, "note": "once per env instance"},
    ]


def bench_alfworld(args) -> list[dict]:
    """AlfWorldEnv (game in a worker process, one PDDL translation per game) against the packages'
    default in-process use (textworld.start + reset with the infos ALFWorld's AlfredTWEnv requests),
    both replaying the experts' actions of `--games` train games (all six task types), game by game."""
    import os

    from eval_agent.envs.alfworld_env import AlfWorldEnv
    from eval_agent.paths import alfworld_data_dir
    from eval_agent.tasks.alfworld import TASK_TYPES, AlfWorldLoader

    # importing alfworld sets $ALFWORLD_DATA to ~/.cache/alfworld when unset: pin it to ours first
    os.environ.setdefault("ALFWORLD_DATA", str(alfworld_data_dir()))
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos

    train = AlfWorldLoader().load("train")
    tasks = [next(t for t in train[i * 7:] if t.data["task_type"] == TASK_TYPES[i % len(TASK_TYPES)])
             for i in range(args.games)]
    ours_reset, ours_again, ours_step, pkg_reset, pkg_step = [], [], [], [], []
    for task in tasks:
        game = alfworld_data_dir() / task.data["game_file"]
        actions = [t["value"] for t in json.loads(game.with_name("gt_traj.json").read_text())[1::2]]

        env = AlfWorldEnv(task, max_steps=10_000)
        t = time.perf_counter()
        env.reset()
        ours_reset.append(time.perf_counter() - t)
        for action in actions:
            t = time.perf_counter()
            env.step(f"Action: {action}")
            ours_step.append(time.perf_counter() - t)
        assert env.state.success, f"expert actions of {task.id} did not win in our env"
        t = time.perf_counter()
        env.reset()  # the same game again: the worker keeps it loaded
        ours_again.append(time.perf_counter() - t)
        env.close()

        infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
        t = time.perf_counter()
        package = textworld.start(str(game), request_infos=infos, wrappers=[AlfredDemangler(), AlfredInfos])
        package.reset()
        pkg_reset.append(time.perf_counter() - t)
        for action in actions:
            t = time.perf_counter()
            package.step(action)
            pkg_step.append(time.perf_counter() - t)
        package.close()
    reset_ratio = _mean_ms(pkg_reset) / _mean_ms(ours_reset)
    step_ratio = _mean_ms(pkg_step) / _mean_ms(ours_step)
    return [
        {"name": "alfworld step, ours", "mean_ms": _mean_ms(ours_step), "n": len(ours_step), "note": ""},
        {"name": "alfworld step, package default", "mean_ms": _mean_ms(pkg_step), "n": len(pkg_step),
         "note": f"{step_ratio:.2f}x ours"},
        {"name": "alfworld reset, ours (load+reset)", "mean_ms": _mean_ms(ours_reset), "n": len(ours_reset),
         "note": "first game of a worker includes its start"},
        {"name": "alfworld reset, ours, same game again", "mean_ms": _mean_ms(ours_again), "n": len(ours_again),
         "note": ""},
        {"name": "alfworld reset, package load+reset", "mean_ms": _mean_ms(pkg_reset), "n": len(pkg_reset),
         "note": f"{reset_ratio:.1f}x ours"},
    ]


BENCHES = {"sciworld": bench_sciworld, "alfworld": bench_alfworld}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", required=True, choices=sorted(BENCHES))
    p.add_argument("--tasks", type=int, default=4, help="sciworld: how many tasks' gold paths to replay")
    p.add_argument("--repeats", type=int, default=2, help="sciworld: replays per task")
    p.add_argument("--games", type=int, default=6, help="alfworld: how many train games' expert actions to replay")
    args = p.parse_args(argv)
    rows = BENCHES[args.env](args)
    print(f"{'measure':<40} {'mean ms':>10} {'n':>6}  note")
    for r in rows:
        print(f"{r['name']:<40} {r['mean_ms']:>10.2f} {r['n']:>6}  {r['note']}")
    out = RESULTS_DIR / f"envs_{args.env}.json"
    write_json_atomic(out, {"env": args.env, "args": vars(args), "machine": platform.platform(),
                            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
