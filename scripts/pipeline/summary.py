"""Summary of an ETO run: per stage the metrics of eval_agent.metrics (average reward, the original's success,
solved, steps, per task type, best-of-K and pass@K) with 95% bootstrap intervals, the paired differences between
consecutive test evaluations, pair counts, times and what each stage cost (JSON, Markdown, PNG).

    python -m scripts.eto_summary outputs/demo     # rebuild the summary of a run folder

A stage's metrics are computed from its episode files, so a run whose metrics.json predates a metric gets it too;
a run folder without its episode files shows the stage's recorded metrics (no intervals, "-" for what they lack).
Intervals: percentile bootstrap over tasks (eval_agent.metrics). A paired difference (e.g. SFT - base) compares
the same test tasks in both stages: its interval resamples the per-task differences, and the counts say on how
many tasks the later stage scored higher / lower. Each row also says what the agent did (eval_agent.behaviour:
how its steps ended, repeated actions, score rises, how episodes ended, the verbs of its actions).

The run folder's paths are eval_agent.run_layout's; a method's best-of-K evaluation (bon's eval_bon) is judged by its
best sample, as the method's registration (scripts/pipeline/methods.py) says.

Costs (summary["costs"]): per stage and in total, from the stage records (stages/<stage>.json): wall seconds,
GPU-seconds (wall x GPUs given, when CUDA is available), for evaluations and explorations the sums over their
episodes (model calls, prompt and generated tokens, env steps, episode seconds), for training stages the tokens
through the model, optimizer steps and peak memory. The total sums each field; its peak memory is the largest.

Online RL (summary["rl_log"]): a row per step from its stage records: the rollouts' reward mean and std (the RL
data's counts), success and solved (of the rollouts), the update's means over its optimizer steps of KL, entropy,
clip fraction and value loss (PPO) and its trained tokens (pg_log.json), the rollouts' generated tokens and env
steps, the step's seconds (rollout + RL data + update) and the test reward of the step's evaluation, if any.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from eval_agent.behaviour import DEFINITIONS as BEHAVIOUR_DEFINITIONS
from eval_agent.behaviour import behaviour
from eval_agent.metrics import DEFINITIONS, bootstrap_interval, per_task, summarise
from eval_agent.run_layout import (
    EPISODE_KINDS,
    EVAL,
    RL_DATA,
    ROLLOUT,
    UPDATE,
    RunLayout,
    eval_stage,
    is_pairs_stage,
    iteration_number,
    rl_step_number,
    rl_step_stage,
    split_of,
)
from eval_agent.runner import read_episodes, sum_costs
from fastchat.records import write_json_atomic, write_text_atomic
from scripts.pipeline.methods import METHODS

TEST_STAGE_LABELS = {eval_stage("base"): "base", eval_stage("sft"): "SFT"}
BEST_OF_K_LABEL = "best-of-K"
# a row's fields from the stage's metrics; with K > 1 samples per task also SAMPLED_FIELDS
ROW_FIELDS = ("average_reward", "success_rate", "num_success", "solved_rate", "num_solved", "average_steps",
              "average_steps_solved")
SAMPLED_FIELDS = ("samples_per_task", "avg_at_k", "best_of_k_reward", "pass_at_k")
# a row's interval fields: the metric each is the interval of (the names summaries have always had)
CI_FIELDS = {"reward_ci95": "average_reward", "success_ci95": "success_rate", "solved_ci95": "solved_rate",
             "steps_ci95": "average_steps", "steps_solved_ci95": "average_steps_solved"}
SAMPLED_CI_FIELDS = {"best_of_k_ci95": "best_of_k_reward", "pass_at_k_ci95": "pass_at_k"}
COST_LABELS = {"wall_seconds": "wall s", "gpu_seconds": "GPU s", "model_calls": "model calls",
               "prompt_tokens": "prompt tokens", "completion_tokens": "generated tokens", "env_steps": "env steps",
               "episode_seconds": "episode s (sum)", "train_tokens": "train tokens",
               "optimizer_steps": "optimizer steps", "peak_rss_mib": "peak RSS MiB", "peak_cuda_mib": "peak GPU MiB"}


def paired_difference(before: dict[str, float], after: dict[str, float]) -> dict:
    """after - before on the tasks both stages played: mean, 95% interval, tasks better / worse / same."""
    common = sorted(set(before) & set(after))
    diffs = [after[t] - before[t] for t in common]
    return {"tasks": len(common), "mean": sum(diffs) / len(diffs) if diffs else 0.0,
            "ci95": list(bootstrap_interval(diffs)), "better": sum(d > 0 for d in diffs),
            "worse": sum(d < 0 for d in diffs), "same": sum(d == 0 for d in diffs)}


def best_of_k_stages() -> set[str]:
    """The evaluations that sample K times per test task and are judged by each task's best sample (eval_bon)."""
    return {eval_stage(m.best_of_k_evaluation) for m in METHODS.entries().values() if m.best_of_k_evaluation}


def stage_row(name: str, metrics: dict, folder: Path, best_of_k: bool) -> tuple[dict, dict[str, float]]:
    """A stage's row of the results table, and {task id: reward} of its tasks for the paired differences (the
    mean over its samples, or the best sample's for a best-of-K evaluation)."""
    records = list(read_episodes(folder).values())
    if records:
        stats = summarise(records, metrics.get("num_tasks"), metrics.get("samples_per_task"))
        tasks, _ = per_task(records, stats["num_tasks"], stats["samples_per_task"])
        # keys that are not ids: tasks without a record, records without an id
        rewards = {t: r["best_reward"] if best_of_k else r["reward"] / r["slots"] for t, r in tasks.items()
                   if isinstance(t, str)}
    else:  # a run folder without its episode files (a committed study): the stage's own metrics
        stats, rewards = metrics, {}
    acted = behaviour(records) if records else None
    ci = stats.get("ci95") or {}
    sampled = (stats.get("samples_per_task") or 1) > 1
    row = {"stage": name, "split": split_of(name), "tasks": stats.get("num_tasks"),
           **{f: stats.get(f) for f in ROW_FIELDS + (SAMPLED_FIELDS if sampled else ())},
           **{f: ci.get(m) for f, m in (CI_FIELDS | (SAMPLED_CI_FIELDS if sampled else {})).items()},
           "by_task_type": stats.get("by_task_type") or {}, "behaviour": acted}
    return row, rewards


def costs(stages: dict[str, dict]) -> dict:
    """The cost table: a row per stage (None where a field does not apply) and the total."""
    rows = []
    for name, rec in stages.items():
        cost = {"wall_seconds": rec.get("seconds"), **rec.get("cost", {})}
        rows.append({"stage": name, **{f: cost.get(f) for f in COST_LABELS}})
    return {"labels": COST_LABELS, "stages": rows, "total": cost_total(rows)}


def cost_total(rows: list[dict]) -> dict:
    """Cost rows (COST_LABELS fields) together: each field summed, the peaks' maximum; None where no row has it."""
    peak = [f for f in COST_LABELS if f.startswith("peak")]
    total = sum_costs([{f: r.get(f) for f in COST_LABELS if f not in peak} for r in rows])
    total.update({f: max((r[f] for r in rows if r.get(f) is not None), default=None) for f in peak})
    return {f: total.get(f) for f in COST_LABELS}


def collect(run_dir: Path) -> dict:
    layout, best_of_k = RunLayout(run_dir), best_of_k_stages()
    stages = {path.stem: json.loads(path.read_text()) for path in layout.stage_records()}
    rows, tasks_by_stage = [], {}
    for name, rec in stages.items():
        if rec.get("metrics") is None:
            continue
        row, rewards = stage_row(name, rec["metrics"], layout.episode_dir(name), name in best_of_k)
        rows.append({**row, "seconds": rec.get("seconds")})
        if row["split"] == "test":
            tasks_by_stage[name] = rewards
    test_stages = [r["stage"] for r in rows if r["split"] == "test"]
    order = sorted(test_stages, key=_test_order)
    differences = [{"after": b, "before": a, "label": f"{_label(b, best_of_k)} - {_label(a, best_of_k)}",
                    **paired_difference(tasks_by_stage[a], tasks_by_stage[b])} for a, b in zip(order, order[1:])]
    pairs = {name: rec.get("counts") for name, rec in stages.items() if is_pairs_stage(name)}
    times = {name: rec.get("seconds") for name, rec in stages.items()}
    by_name = {r["stage"]: r for r in rows}
    best = {"average_reward": "best_of_k_reward", "reward_ci95": "best_of_k_ci95"}
    curve = [{"stage": s, "label": _label(s, best_of_k), **{k: by_name[s].get(best[k] if s in best_of_k else k)
                                                            for k in best}} for s in order]
    return {"run": run_dir.name, "definitions": DEFINITIONS, "results": rows, "paired_differences": differences,
            "pairs": pairs, "stage_seconds": times, "total_seconds": round(sum(t or 0 for t in times.values()), 1),
            "test_reward_by_stage": curve, "costs": costs(stages), "rl_log": rl_log(stages),
            # stages another run made (--from_run): their time and cost are that run's, counted there
            "taken_over": {name: rec["from_run"] for name, rec in stages.items() if rec.get("from_run")}}


def rl_log(stages: dict[str, dict]) -> list[dict]:
    """A row per online-RL step that has a stage record (see the module docstring); None where a stage has not
    run or does not report the field."""
    rows = []
    for step in sorted({n for name in stages if (n := rl_step_number(name)) is not None}):
        rollout, data, update, evaluation = (stages.get(rl_step_stage(kind, step)) or {}
                                             for kind in (ROLLOUT, RL_DATA, UPDATE, EVAL))
        metrics, counts, pg = rollout.get("metrics") or {}, data.get("counts") or {}, update.get("pg") or {}
        cost = rollout.get("cost") or {}
        seconds = [rec["seconds"] for rec in (rollout, data, update) if rec.get("seconds") is not None]
        rows.append({"step": step, "policy_version": rollout.get("policy_version"),
                     "episodes": counts.get("episodes"), "reward_mean": counts.get("mean_reward"),
                     "reward_std": counts.get("std_reward"), "success": metrics.get("success_rate"),
                     "solved": metrics.get("solved_rate"),
                     **{f: pg.get(f) for f in ("kl", "entropy", "clip_fraction", "value_loss", "loss")},
                     "train_tokens": pg.get("tokens"), "optimizer_steps": pg.get("optimizer_steps"),
                     "generated_tokens": cost.get("completion_tokens"), "env_steps": cost.get("env_steps"),
                     "seconds": round(sum(seconds), 1) if seconds else None,
                     "weight_sync_seconds": (rollout.get("weight_sync") or {}).get("seconds"),
                     "eval_reward": (evaluation.get("metrics") or {}).get("average_reward")})
    return rows


# the RL log's columns: (field, heading); value loss only when a step reports it (PPO)
RL_COLUMNS = (("step", "RL step"), ("policy_version", "policy"), ("episodes", "episodes"),
              ("reward_mean", "reward mean"), ("reward_std", "reward std"), ("success", "success"),
              ("solved", "solved"), ("kl", "KL"), ("entropy", "entropy"), ("clip_fraction", "clip fraction"),
              ("value_loss", "value loss"), ("train_tokens", "train tokens"), ("generated_tokens", "generated tokens"),
              ("env_steps", "env steps"), ("seconds", "time (s)"), ("eval_reward", "test avg reward"))
RL_AMOUNTS = {"step", "policy_version", "episodes", "train_tokens", "generated_tokens", "env_steps", "seconds"}


def rl_table(rows: list[dict]) -> list[str]:
    columns = [(f, h) for f, h in RL_COLUMNS if f != "value_loss" or any(r["value_loss"] is not None for r in rows)]
    lines = ["", "| " + " | ".join(h for _, h in columns) + " |", "|---" * len(columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_amount(r[f]) if f in RL_AMOUNTS else _num(r[f]) for f, _ in columns) + " |")
    return lines


def _test_order(stage: str) -> float:
    """base, SFT, iter1, iter2, ... (or RL's step1, step2, ...), then any other evaluation (bon: the SFT agent
    sampled K times)."""
    if stage in TEST_STAGE_LABELS:
        return list(TEST_STAGE_LABELS).index(stage) - len(TEST_STAGE_LABELS)
    it = iteration_number(stage)
    if it is None:
        it = rl_step_number(stage)
    return float("inf") if it is None else it


def _label(stage: str, best_of_k: set[str]) -> str:
    if stage in best_of_k:
        return BEST_OF_K_LABEL
    return TEST_STAGE_LABELS.get(stage) or stage.removeprefix(eval_stage(""))


def _num(value, places: int = 4) -> str:
    return "-" if value is None else f"{value:.{places}f}"


def _ci(ci) -> str:
    return "-" if not ci else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def markdown(summary: dict) -> str:
    lines = ["| stage | split | tasks | avg reward | 95% CI | success | 95% CI | solved | 95% CI | steps | "
             "steps (solved) | time (s) |", "|---" * 12 + "|"]
    for r in summary["results"]:
        lines.append(f"| {r['stage']} | {r['split']} | {r['tasks']} | {_num(r['average_reward'])} | "
                     f"{_ci(r['reward_ci95'])} | {_num(r['success_rate'])} | {_ci(r['success_ci95'])} | "
                     f"{_num(r['solved_rate'])} | {_ci(r['solved_ci95'])} | {_amount(r['average_steps'])} | "
                     f"{_amount(r['average_steps_solved'])} | {r['seconds']} |")
    lines += ["", f"success: {summary['definitions']['success_rate']}. solved: "
                  f"{summary['definitions']['solved_rate']}."]
    sampled = [r for r in summary["results"] if (r.get("samples_per_task") or 1) > 1]
    if sampled:
        lines += ["", "| stage | samples per task | avg@K | best-of-K reward | 95% CI | pass@K (solved) | 95% CI |",
                  "|---" * 7 + "|"]
        for r in sampled:
            lines.append(f"| {r['stage']} | {r['samples_per_task']} | {_num(r['avg_at_k'])} | "
                         f"{_num(r['best_of_k_reward'])} | {_ci(r['best_of_k_ci95'])} | {_num(r['pass_at_k'])} | "
                         f"{_ci(r['pass_at_k_ci95'])} |")
    lines += by_type_table(summary["results"])
    lines += behaviour_table([(r["stage"], r.get("behaviour")) for r in summary["results"]])
    if summary["paired_differences"]:
        lines += ["", "| paired difference (same test tasks) | tasks | mean reward diff | 95% CI | better | worse | same |",  # noqa: E501
                  "|---|---|---|---|---|---|---|"]
        for d in summary["paired_differences"]:
            lines.append(f"| {d['label']} | {d['tasks']} | {d['mean']:+.4f} | {_ci(d['ci95'])} | {d['better']} | "
                         f"{d['worse']} | {d['same']} |")
    if summary.get("rl_log"):
        lines += rl_table(summary["rl_log"])
    for name, counts in summary["pairs"].items():
        lines.append(f"\n{name}: " + ", ".join(f"{k}={v}" for k, v in (counts or {}).items()))
    other = {k: v for k, v in summary["stage_seconds"].items() if not k.startswith(EPISODE_KINDS)}
    lines.append("\ntraining/pair stages (s): " + ", ".join(f"{k}={v}" for k, v in other.items()))
    lines.append(f"total stage time: {summary['total_seconds']} s")
    for parent in sorted(set(summary.get("taken_over", {}).values())):
        taken = [stage for stage, run in summary["taken_over"].items() if run == parent]
        lines.append(f"taken over from run {Path(parent).name} (--from_run; their time and cost are that run's): "
                     + ", ".join(taken))
    table = summary["costs"]
    shown = [f for f, v in table["total"].items() if v is not None]  # fields no stage reports are left out
    lines += ["", "| cost | " + " | ".join(table["labels"][f] for f in shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for row in [*table["stages"], {**table["total"], "stage": "**total**"}]:
        lines.append(f"| {row['stage']} | " + " | ".join(_amount(row[f]) for f in shown) + " |")
    return "\n".join(lines)


BEHAVIOUR_COLUMNS = ("steps_per_episode", "invalid_format", "not_run", "rejected", "ran", "unknown", "repeated",
                     "score_rose", "score_rises")


def behaviour_table(rows: list[tuple[str, dict | None]]) -> list[str]:
    """What the agent did in each evaluation or exploration (eval_agent.behaviour), with the columns' meanings;
    columns no row has (e.g. "unknown" steps) are left out."""
    rows = [(name, acted) for name, acted in rows if acted]
    if not rows:
        return []
    shown = [c for c in BEHAVIOUR_COLUMNS if c == "steps_per_episode" or any(a.get(c) for _, a in rows)]
    lines = ["", "| behaviour | episodes | " + " | ".join(c.replace("_", " ") for c in shown) + " | actions carried "
             "out (top verbs) |", "|---" * (len(shown) + 3) + "|"]
    for name, acted in rows:
        verbs = ", ".join(f"{verb} {count}" for verb, count in acted.get("top_verbs") or []) or "-"
        lines.append(f"| {name} | {acted['episodes']} | " + " | ".join(_num(acted.get(c), 2) for c in shown)
                     + f" | {verbs} |")
    lines += ["", "; ".join(f"{c.replace('_', ' ')}: {BEHAVIOUR_DEFINITIONS[c]}" for c in shown) + "."]
    return lines


def by_type_table(results: list[dict]) -> list[str]:
    """Average reward per task type (rows) and test evaluation (columns, in stage order), when the tasks have
    several types."""
    tests = sorted((r for r in results if r["split"] == "test"), key=lambda r: _test_order(r["stage"]))
    kinds = sorted({kind for r in tests for kind in r["by_task_type"]})
    if len(kinds) < 2:
        return []
    lines = ["", "| task type | " + " | ".join(f"{r['stage']} avg reward (tasks)" for r in tests) + " |",
             "|---" * (len(tests) + 1) + "|"]
    for kind in kinds:
        cells = [r["by_task_type"].get(kind) for r in tests]
        lines.append(f"| {kind} | " + " | ".join("-" if c is None else f"{c['average_reward']:.4f} ({c['tasks']})"
                                                 for c in cells) + " |")
    return lines


def _amount(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = summary["test_reward_by_stage"]
    xs = list(range(len(curve)))
    ys = [c["average_reward"] or 0.0 for c in curve]
    cis = [c["reward_ci95"] or [y, y] for y, c in zip(ys, curve)]  # a stage without its episode files: no bar
    err = [[y - ci[0] for y, ci in zip(ys, cis)], [ci[1] - y for y, ci in zip(ys, cis)]]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4)
    ax.set_xticks(xs, [c["label"] for c in curve])
    ax.set_xlabel("stage")
    ax.set_ylabel("test average reward (95% CI)")
    # a ScienceWorld score can be negative, and the average with it
    ax.set_ylim(min([0.0] + [ci[0] * 1.15 for ci in cis]), max([0.05] + [ci[1] * 1.15 for ci in cis]))
    notes = [f"{d['label']}: {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
             for d in summary["paired_differences"]]
    ax.set_title(summary["run"] + ("\n" + "; ".join(notes) if notes else ""), fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def write_summary(run_dir: Path) -> dict:
    layout = RunLayout(run_dir)
    summary = collect(run_dir)
    summary["markdown"] = markdown(summary)
    write_json_atomic(layout.summary_json, summary, indent=1)
    write_text_atomic(layout.summary_md, summary["markdown"] + "\n")
    plot(summary, layout.summary_png)
    return summary

