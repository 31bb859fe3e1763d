"""Environment speed: mean reset and step latency per environment.

    python bench/bench_envs.py --env alfworld [--games 6]
    python bench/bench_envs.py --env all

Each environment has one function `bench_<env>(args) -> dict`; it prints its table and
the results go to bench/results/envs_<env>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def mean_ms(samples_s: list[float]) -> float:
    return round(statistics.mean(samples_s) * 1000, 1) if samples_s else float("nan")


def bench_alfworld(args) -> dict:
    """AlfWorldEnv (worker process, one PDDL translation per game) against the packages' default
    in-process use (textworld.start + reset with AlfredTWEnv's infos), replaying expert actions
    of `--games` train games, one or more per task type."""
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos

    from eval_agent.envs.alfworld_env import AlfWorldEnv
    from eval_agent.paths import alfworld_data_dir
    from eval_agent.tasks.alfworld import TASK_TYPES, AlfWorldLoader

    train = AlfWorldLoader().load("train")
    tasks = [next(t for t in train[i * 7:] if t.data["task_type"] == TASK_TYPES[i % len(TASK_TYPES)])
             for i in range(args.games)]
    rows = {"ours": {"reset": [], "reset_again": [], "step": []}, "package": {"reset": [], "step": []}}
    for task in tasks:
        game = alfworld_data_dir() / task.data["game_file"]
        actions = [t["value"] for t in json.loads(game.with_name("gt_traj.json").read_text())[1::2]]

        env = AlfWorldEnv(task, max_steps=100)
        t = time.perf_counter()
        env.reset()
        rows["ours"]["reset"].append(time.perf_counter() - t)
        for action in actions:
            t = time.perf_counter()
            env.step(f"Action: {action}")
            rows["ours"]["step"].append(time.perf_counter() - t)
        t = time.perf_counter()
        env.reset()  # same game again: the worker keeps it loaded
        rows["ours"]["reset_again"].append(time.perf_counter() - t)
        env.close()

        infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
        t = time.perf_counter()
        default = textworld.start(str(game), request_infos=infos, wrappers=[AlfredDemangler(), AlfredInfos])
        default.reset()
        rows["package"]["reset"].append(time.perf_counter() - t)
        for action in actions:
            t = time.perf_counter()
            default.step(action)
            rows["package"]["step"].append(time.perf_counter() - t)
        default.close()

    result = {
        "games": [t.id for t in tasks],
        "steps": len(rows["ours"]["step"]),
        "ours": {k: mean_ms(v) for k, v in rows["ours"].items()},
        "package": {k: mean_ms(v) for k, v in rows["package"].items()},
    }
    result["reset_speedup"] = round(result["package"]["reset"] / result["ours"]["reset"], 2)
    result["step_ratio_ours_over_package"] = round(result["ours"]["step"] / result["package"]["step"], 2)
    print(f"ALFWorld, {len(tasks)} games, {result['steps']} expert steps (mean ms)")
    print(f"{'':28}{'reset':>10}{'step':>10}")
    print(f"{'AlfWorldEnv':28}{result['ours']['reset']:>10}{result['ours']['step']:>10}")
    print(f"{'AlfWorldEnv, same game again':28}{result['ours']['reset_again']:>10}{'':>10}")
    print(f"{'package default (in-process)':28}{result['package']['reset']:>10}{result['package']['step']:>10}")
    print(f"reset speedup {result['reset_speedup']}x; step ours/package {result['step_ratio_ours_over_package']}")
    return result


BENCHES = {"alfworld": bench_alfworld}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", choices=[*BENCHES, "all"], default="all")
    parser.add_argument("--games", type=int, default=6, help="ALFWorld: games to replay")
    args = parser.parse_args(argv)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    for name, bench in BENCHES.items():
        if args.env not in (name, "all"):
            continue
        result = {"env": name, "machine": platform.platform(), **bench(args)}
        path = RESULTS_DIR / f"envs_{name}.json"
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
