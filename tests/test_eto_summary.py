"""The run summary's uncertainty: bootstrap intervals over tasks and paired differences between stages."""
from __future__ import annotations

import json
import random
from pathlib import Path

from scripts.pipeline.summary import bootstrap_interval, paired_difference, write_summary


def plain_bootstrap(values, resamples=20_000, seed=123):
    """An independent percentile bootstrap, written out plainly."""
    rng = random.Random(seed)
    means = []
    for _ in range(resamples):
        sample = [rng.choice(values) for _ in values]
        means.append(sum(sample) / len(sample))
    means.sort()
    return means[int(0.025 * resamples)], means[int(0.975 * resamples)]


def test_bootstrap_interval_matches_a_plain_computation():
    rewards = [0.0, 0.0, 0.1, 0.25, 0.0, 0.5, 0.08, 0.0, 0.33, 1.0, 0.0, 0.17]
    lo, hi = bootstrap_interval(rewards)
    plain_lo, plain_hi = plain_bootstrap(rewards)
    mean = sum(rewards) / len(rewards)
    assert lo < mean < hi
    assert abs(lo - plain_lo) < 0.02 and abs(hi - plain_hi) < 0.02  # Monte Carlo error of 10k resamples
    assert bootstrap_interval([0.3] * 7) == (0.3, 0.3)  # no spread, no width
    assert bootstrap_interval(rewards) == (lo, hi)  # seeded: the same summary every time


def test_paired_difference_uses_the_same_tasks_and_counts_flips():
    before = {"a": 0.0, "b": 0.5, "c": 0.2, "d": 0.0, "only-before": 1.0}
    after = {"a": 0.3, "b": 0.25, "c": 0.2, "d": 0.1, "only-after": 0.0}
    d = paired_difference(before, after)
    diffs = [0.3, -0.25, 0.0, 0.1]
    assert d["tasks"] == 4 and abs(d["mean"] - sum(diffs) / 4) < 1e-12
    assert (d["better"], d["worse"], d["same"]) == (2, 1, 1)
    plain = plain_bootstrap(diffs)
    assert abs(d["ci95"][0] - plain[0]) < 0.03 and abs(d["ci95"][1] - plain[1]) < 0.03


def _stage(run: Path, stage: str, folder: str, rewards: dict[str, float]) -> None:
    out = run / folder
    out.mkdir(parents=True)
    for tid, r in rewards.items():
        (out / f"{tid}.json").write_text(json.dumps({"id": tid, "meta": {"reward": r, "success": r == 1.0}}))
    metrics = {"num_tasks": len(rewards), "average_reward": sum(rewards.values()) / len(rewards),
               "success_rate": sum(r == 1.0 for r in rewards.values()) / len(rewards)}
    (run / "stages").mkdir(exist_ok=True)
    (run / "stages" / f"{stage}.json").write_text(json.dumps({"stage": stage, "seconds": 1.0, "metrics": metrics}))


def test_summary_files_carry_intervals_and_differences(tmp_path):
    run = tmp_path / "run"
    base = {"t1": 0.0, "t2": 0.0, "t3": 0.0, "t4": 0.0}
    sft = {"t1": 0.2, "t2": 0.0, "t3": 1.0, "t4": 0.1}
    it1 = {"t1": 0.3, "t2": 0.0, "t3": 0.5, "t4": 0.1}
    _stage(run, "eval_base", "eval/base", base)
    _stage(run, "eval_sft", "eval/sft", sft)
    _stage(run, "explore_iter1", "explore/iter1", {"x": 0.0})
    _stage(run, "eval_iter1", "eval/iter1", it1)
    summary = write_summary(run)
    rows = {r["stage"]: r for r in summary["results"]}
    assert rows["eval_base"]["reward_ci95"] == [0.0, 0.0]
    assert rows["eval_sft"]["reward_ci95"][0] <= 0.325 <= rows["eval_sft"]["reward_ci95"][1]
    assert [d["label"] for d in summary["paired_differences"]] == ["SFT - base", "iter1 - SFT"]
    first, second = summary["paired_differences"]
    assert abs(first["mean"] - 0.325) < 1e-12 and (first["better"], first["worse"], first["same"]) == (3, 0, 1)
    assert abs(second["mean"] - (-0.4 / 4)) < 1e-12 and (second["better"], second["worse"]) == (1, 1)
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["paired_differences"] == json.loads(json.dumps(summary["paired_differences"]))
    assert [c["label"] for c in on_disk["test_reward_by_stage"]] == ["base", "SFT", "iter1"]
    md = (run / "summary.md").read_text()
    assert "| SFT - base | 4 | +0.3250 |" in md and "95% CI" in md
    assert (run / "summary.png").stat().st_size > 1000
    assert str(tmp_path) not in (run / "summary.json").read_text()  # no machine paths: results get committed
