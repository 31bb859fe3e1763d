"""The loop of each method, on the pipeline's stages (scripts/eto_pipeline.py); README "Methods" says what each does.

    eto  base -> SFT -> eval -> (explore -> expert pairs -> DPO -> eval) x iterations
    ipr  as eto, plus step-level pairs valued by Monte-Carlo rollouts; DPO on trajectory pairs + step pairs + SFT
    rft  base -> SFT -> eval -> (explore K -> keep successes -> SFT of the base on expert + kept -> eval) x iterations
    bon  base -> SFT -> eval -> eval with K samples per test task (best-of-K)
    eto --self_play 1: base explores K -> SFT of the base on its own successes -> eval ->
         (explore K -> self pairs -> DPO -> eval) x iterations
"""
from __future__ import annotations

import json
from pathlib import Path

from construct_preference import PROMPT_TURNS, _trajectory


def run_method(p) -> None:
    a = p.a
    k = a.samples_per_task
    if a.eval_base:
        p.episodes("eval_base", Path(a.model_path), "test", p.run_dir / "eval" / "base", 0.0, a.test_tasks,
                   a.eval_workers)
    model = self_play_start(p) if a.self_play else p.sft()
    p.episodes("eval_sft", model, "test", p.run_dir / "eval" / "sft", 0.0, a.test_tasks, a.eval_workers)
    if a.method == "bon":
        p.episodes("eval_bon", model, "test", p.run_dir / "eval" / "bon", a.temperature, a.test_tasks,
                   a.eval_workers, samples=k)
        return
    for it in range(1, a.iterations + 1):
        explore = p.run_dir / "explore" / f"iter{it}"
        p.episodes(f"explore_iter{it}", model, "train", explore, a.temperature if k > 1 else a.explore_temperature,
                   a.train_tasks, a.explore_workers, samples=k)
        if a.method == "rft":
            model = p.sft(f"sft_iter{it}", p.kept_trajectories(f"rft_data_iter{it}", explore, with_expert=True))
        else:
            pairs = p.run_dir / "pairs" / f"iter{it}.json"
            pairs.parent.mkdir(parents=True, exist_ok=True)
            counts = p.pairs(f"pairs_iter{it}", explore, pairs, rule="self" if a.self_play else "expert")
            extra: tuple[str, ...] = ()
            if a.method == "ipr":
                pairs, counts, extra = ipr_data(p, it, model, explore, pairs, counts)
            if counts["pairs"] == 0:
                print(f"[eto] iteration {it}: no pairs (the agent matched the expert everywhere, or its samples "
                      "tied); stopping the loop here")
                break
            model = p.dpo(f"dpo_iter{it}", model, pairs, it, extra)
        p.episodes(f"eval_iter{it}", model, "test", p.run_dir / "eval" / f"iter{it}", 0.0, a.test_tasks,
                   a.eval_workers)


def self_play_start(p) -> Path:
    """No expert data: the base model explores with K samples and is fine-tuned on its own successes (RFT)."""
    a = p.a
    explore = p.run_dir / "explore" / "iter0"
    p.episodes("explore_iter0", Path(a.model_path), "train", explore, a.temperature, a.train_tasks,
               a.explore_workers, samples=a.samples_per_task)
    return p.sft("sft", p.kept_trajectories("rft_data_iter0", explore, with_expert=False))


def ipr_data(p, it: int, model: Path, explore: Path, trajectory_pairs: Path, counts: dict):
    """Step pairs from the current model's rollouts, then one training file: trajectory pairs, step pairs and
    the explored tasks' expert trajectories as SFT samples; the DPO flags that weight them."""
    a = p.a
    step_pairs = p.run_dir / "pairs" / f"iter{it}_step.json"
    step_counts = p.pairs(f"step_pairs_iter{it}", explore, step_pairs, rule="step", model=model)
    explored = {json.loads(f.read_text()).get("id") for f in explore.glob("*.json")
                if not f.name.startswith("metrics")}
    experts = [{"id": r["id"], "kind": "sft", "prompt": r["conversations"][:PROMPT_TURNS],
                "chosen": _trajectory(r["conversations"])} for r in p.expert_records() if r.get("id") in explored]
    mixed = json.loads(trajectory_pairs.read_text()) + json.loads(step_pairs.read_text())
    path = p.write_data(f"ipr_iter{it}.json", mixed + experts)
    total = {"pairs": len(mixed), "trajectory_pairs": counts["pairs"], "step_pairs": step_counts["pairs"],
             "sft_samples": len(experts)}
    return path, total, ("--step_weight", str(a.step_weight), "--sft_weight", str(a.sft_weight))
