"""Summary of an ETO run: reward and success per stage with 95% bootstrap intervals, the paired
differences between consecutive test evaluations, pair counts, times and what each stage cost (JSON,
Markdown, PNG).

    python -m scripts.eto_summary outputs/demo     # rebuild the summary of a run folder

Intervals: percentile bootstrap over tasks (10,000 resamples, fixed seed). A paired difference
(e.g. SFT - base) compares the same test tasks in both stages: its interval resamples the per-task
differences, and the counts say on how many tasks the later stage scored higher / lower.

The run folder's paths are eval_agent.run_layout's; a method's best-of-K evaluation (bon's eval_bon) is judged by its
best sample, as the method's registration (scripts/pipeline/methods.py) says.

Costs (summary["costs"]): per stage and in total, from the stage records (stages/<stage>.json): wall seconds,
GPU-seconds (wall x GPUs given, when CUDA is available), for evaluations and explorations the sums over their
episodes (model calls, prompt and generated tokens, env steps, episode seconds), for training stages the tokens
through the model, optimizer steps and peak memory. The total sums each field; its peak memory is the largest.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from eval_agent.run_layout import EPISODE_KINDS, RunLayout, eval_stage, is_pairs_stage, iteration_number, split_of
from eval_agent.runner import read_result, sum_costs
from fastchat.records import write_json_atomic, write_text_atomic
from scripts.pipeline.methods import METHODS

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
TEST_STAGE_LABELS = {eval_stage("base"): "base", eval_stage("sft"): "SFT"}
BEST_OF_K_LABEL = "best-of-K"
COST_LABELS = {"wall_seconds": "wall s", "gpu_seconds": "GPU s", "model_calls": "model calls",
               "prompt_tokens": "prompt tokens", "completion_tokens": "generated tokens", "env_steps": "env steps",
               "episode_seconds": "episode s (sum)", "train_tokens": "train tokens",
               "optimizer_steps": "optimizer steps", "peak_rss_mib": "peak RSS MiB", "peak_cuda_mib": "peak GPU MiB"}


def bootstrap_interval(values: list[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`."""
    if not values:
        return (0.0, 0.0)
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return (lo, hi)


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


def per_task(folder: Path) -> dict[str, dict]:
    """{task id: {"reward", "success", "best_reward", "any_success"}} from an evaluation folder's per-task files
    (unreadable ones left out); a task played K times gets its samples' mean reward and success, the best
    sample's reward and whether any sample succeeded."""
    samples: dict[str, list[dict]] = {}
    for path in sorted(folder.glob("*.json")):
        rec = None if path.name.startswith("metrics") else read_result(path)
        if rec is not None and "id" in rec:
            samples.setdefault(str(rec["id"]), []).append(rec["meta"])
    out = {}
    for task, metas in samples.items():
        rewards = [float(m.get("reward") or 0.0) for m in metas]
        successes = [float(bool(m.get("success"))) for m in metas]
        out[task] = {"reward": sum(rewards) / len(rewards), "success": sum(successes) / len(successes),
                     "best_reward": max(rewards), "any_success": max(successes)}
    return out


def costs(stages: dict[str, dict]) -> dict:
    """The cost table: a row per stage (None where a field does not apply) and the total."""
    rows = []
    for name, rec in stages.items():
        cost = {"wall_seconds": rec.get("seconds"), **rec.get("cost", {})}
        rows.append({"stage": name, **{f: cost.get(f) for f in COST_LABELS}})
    peak = [f for f in COST_LABELS if f.startswith("peak")]
    total = sum_costs([{f: r[f] for f in COST_LABELS if f not in peak} for r in rows])
    total.update({f: max((r[f] for r in rows if r[f] is not None), default=None) for f in peak})
    return {"labels": COST_LABELS, "stages": rows, "total": {f: total.get(f) for f in COST_LABELS}}


def collect(run_dir: Path) -> dict:
    layout, best_of_k = RunLayout(run_dir), best_of_k_stages()
    stages = {path.stem: json.loads(path.read_text()) for path in layout.stage_records()}
    rows, tasks_by_stage = [], {}
    for name, rec in stages.items():
        m = rec.get("metrics")
        if m is None:
            continue
        results = per_task(layout.episode_dir(name))
        n = m.get("num_tasks") or len(results)
        # a task without a result file counts as 0, as in the stage's own metrics
        rewards = [r["reward"] for r in results.values()] + [0.0] * max(0, n - len(results))
        successes = [r["success"] for r in results.values()] + [0.0] * max(0, n - len(results))
        split = split_of(name)
        row = {"stage": name, "split": split, "tasks": n, "average_reward": m.get("average_reward"),
               "reward_ci95": list(bootstrap_interval(rewards)), "success_rate": m.get("success_rate"),
               "success_ci95": list(bootstrap_interval(successes)), "seconds": rec.get("seconds")}
        if m.get("samples_per_task", 1) > 1:
            missing = [0.0] * max(0, n - len(results))
            row.update(samples_per_task=m["samples_per_task"], best_of_k_reward=m.get("best_of_k_reward"),
                       best_of_k_ci95=list(bootstrap_interval([r["best_reward"] for r in results.values()] + missing)),
                       pass_at_k=m.get("pass_at_k"),
                       pass_at_k_ci95=list(bootstrap_interval([r["any_success"] for r in results.values()] + missing)))
        rows.append(row)
        if split == "test":  # best-of-K sampling is judged by its best sample
            tasks_by_stage[name] = {t: r["best_reward" if name in best_of_k else "reward"]
                                    for t, r in results.items()}
    test_stages = [r["stage"] for r in rows if r["split"] == "test"]
    order = sorted(test_stages, key=_test_order)
    differences = [{"after": b, "before": a, "label": f"{_label(b, best_of_k)} - {_label(a, best_of_k)}",
                    **paired_difference(tasks_by_stage[a], tasks_by_stage[b])} for a, b in zip(order, order[1:])]
    pairs = {name: rec.get("counts") for name, rec in stages.items() if is_pairs_stage(name)}
    times = {name: rec.get("seconds") for name, rec in stages.items()}
    by_name = {r["stage"]: r for r in rows}
    best = {"average_reward": "best_of_k_reward", "reward_ci95": "best_of_k_ci95"}
    curve = [{"stage": s, "label": _label(s, best_of_k), **{k: by_name[s][best[k] if s in best_of_k else k]
                                                            for k in best}} for s in order]
    return {"run": run_dir.name, "results": rows, "paired_differences": differences, "pairs": pairs,
            "stage_seconds": times, "total_seconds": round(sum(t or 0 for t in times.values()), 1),
            "test_reward_by_stage": curve, "costs": costs(stages)}


def _test_order(stage: str) -> float:
    """base, SFT, iter1, iter2, ..., then any other evaluation (bon: the SFT agent sampled K times)."""
    if stage in TEST_STAGE_LABELS:
        return list(TEST_STAGE_LABELS).index(stage) - len(TEST_STAGE_LABELS)
    it = iteration_number(stage)
    return float("inf") if it is None else it


def _label(stage: str, best_of_k: set[str]) -> str:
    if stage in best_of_k:
        return BEST_OF_K_LABEL
    return TEST_STAGE_LABELS.get(stage) or stage.removeprefix(eval_stage(""))


def _ci(ci) -> str:
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def markdown(summary: dict) -> str:
    lines = ["| stage | split | tasks | avg reward | 95% CI | success | 95% CI | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary["results"]:
        lines.append(f"| {r['stage']} | {r['split']} | {r['tasks']} | {r['average_reward']:.4f} | "
                     f"{_ci(r['reward_ci95'])} | {r['success_rate']:.4f} | {_ci(r['success_ci95'])} | {r['seconds']} |")
    sampled = [r for r in summary["results"] if r.get("samples_per_task", 1) > 1]
    if sampled:
        lines += ["", "| stage | samples per task | best-of-K reward | 95% CI | pass@K | 95% CI |", "|---|---|---|---|---|---|"]  # noqa: E501
        for r in sampled:
            lines.append(f"| {r['stage']} | {r['samples_per_task']} | {r['best_of_k_reward']:.4f} | "
                         f"{_ci(r['best_of_k_ci95'])} | {r['pass_at_k']:.4f} | {_ci(r['pass_at_k_ci95'])} |")
    if summary["paired_differences"]:
        lines += ["", "| paired difference (same test tasks) | tasks | mean reward diff | 95% CI | better | worse | same |",  # noqa: E501
                  "|---|---|---|---|---|---|---|"]
        for d in summary["paired_differences"]:
            lines.append(f"| {d['label']} | {d['tasks']} | {d['mean']:+.4f} | {_ci(d['ci95'])} | {d['better']} | "
                         f"{d['worse']} | {d['same']} |")
    for name, counts in summary["pairs"].items():
        lines.append(f"\n{name}: " + ", ".join(f"{k}={v}" for k, v in (counts or {}).items()))
    other = {k: v for k, v in summary["stage_seconds"].items() if not k.startswith(EPISODE_KINDS)}
    lines.append("\ntraining/pair stages (s): " + ", ".join(f"{k}={v}" for k, v in other.items()))
    lines.append(f"total stage time: {summary['total_seconds']} s")
    table = summary["costs"]
    shown = [f for f, v in table["total"].items() if v is not None]  # fields no stage reports are left out
    lines += ["", "| cost | " + " | ".join(table["labels"][f] for f in shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for row in [*table["stages"], {**table["total"], "stage": "**total**"}]:
        lines.append(f"| {row['stage']} | " + " | ".join(_amount(row[f]) for f in shown) + " |")
    return "\n".join(lines)


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
    ys = [c["average_reward"] for c in curve]
    err = [[y - c["reward_ci95"][0] for y, c in zip(ys, curve)], [c["reward_ci95"][1] - y for y, c in zip(ys, curve)]]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4)
    ax.set_xticks(xs, [c["label"] for c in curve])
    ax.set_xlabel("stage")
    ax.set_ylabel("test average reward (95% CI)")
    ax.set_ylim(0, max([0.05] + [c["reward_ci95"][1] * 1.15 for c in curve]))
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

