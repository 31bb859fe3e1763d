"""Summary of an ETO run: reward and success per stage, pair counts, times (JSON, Markdown, PNG).

    python scripts/eto_summary.py outputs/demo     # rebuild the summary of a run folder
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def collect(run_dir: Path) -> dict:
    stages = {}
    for path in sorted((run_dir / "stages").glob("*.json"), key=lambda p: p.stat().st_mtime):
        stages[path.stem] = json.loads(path.read_text())
    rows = []
    for name, rec in stages.items():
        m = rec.get("metrics")
        if m is None:
            continue
        rows.append({"stage": name, "split": "train" if name.startswith("explore") else "test",
                     "tasks": m.get("num_tasks"), "average_reward": m.get("average_reward"),
                     "success_rate": m.get("success_rate"), "seconds": rec.get("seconds")})
    pairs = {name: rec.get("counts") for name, rec in stages.items() if name.startswith("pairs")}
    times = {name: rec.get("seconds") for name, rec in stages.items()}
    test_curve = [(0, r["average_reward"]) for r in rows if r["stage"] == "eval_sft"]
    test_curve += [(int(r["stage"].removeprefix("eval_iter")), r["average_reward"])
                   for r in rows if r["stage"].startswith("eval_iter")]
    return {"run_dir": str(run_dir), "results": rows, "pairs": pairs, "stage_seconds": times,
            "total_seconds": round(sum(t or 0 for t in times.values()), 1), "test_reward_by_iteration": test_curve}


def markdown(summary: dict) -> str:
    lines = ["| stage | split | tasks | avg reward | success | time (s) |", "|---|---|---|---|---|---|"]
    for r in summary["results"]:
        lines.append(f"| {r['stage']} | {r['split']} | {r['tasks']} | {r['average_reward']:.4f} | "
                     f"{r['success_rate']:.4f} | {r['seconds']} |")
    for name, counts in summary["pairs"].items():
        lines.append(f"\n{name}: " + ", ".join(f"{k}={v}" for k, v in (counts or {}).items()))
    other = {k: v for k, v in summary["stage_seconds"].items() if not k.startswith(("eval", "explore"))}
    lines.append("\ntraining/pair stages (s): " + ", ".join(f"{k}={v}" for k, v in other.items()))
    lines.append(f"total stage time: {summary['total_seconds']} s")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [x for x, _ in summary["test_reward_by_iteration"]]
    ys = [y for _, y in summary["test_reward_by_iteration"]]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(xs, ys, marker="o")
    ax.set_xlabel("iteration (0 = SFT)")
    ax.set_ylabel("test average reward")
    ax.set_xticks(xs)
    ax.set_ylim(0, max([1.0] + ys))
    ax.set_title(Path(summary["run_dir"]).name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def write_summary(run_dir: Path) -> dict:
    summary = collect(run_dir)
    summary["markdown"] = markdown(summary)
    _atomic_write(run_dir / "summary.json", json.dumps(summary, indent=1))
    _atomic_write(run_dir / "summary.md", summary["markdown"] + "\n")
    plot(summary, run_dir / "summary.png")
    return summary


if __name__ == "__main__":
    print(write_summary(Path(sys.argv[1]))["markdown"])
