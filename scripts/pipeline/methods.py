"""The loop of each method, on the pipeline's stages (scripts/pipeline/stages.py); docs/methods.md says what each does.

    eto  base -> SFT -> eval -> (explore -> expert pairs -> DPO -> eval) x iterations
    ipr  as eto, plus step-level pairs valued by Monte-Carlo rollouts; DPO on trajectory pairs + step pairs + SFT
    rft  base -> SFT -> eval -> (explore K -> keep successes -> SFT of the base on expert + kept -> eval) x iterations
    bon  base -> SFT -> eval -> eval with K samples per test task (best-of-K)
    eto --self_play 1: base explores K -> SFT of the base on its own successes -> eval ->
         (explore K -> self pairs -> DPO -> eval) x iterations
    grpo, gigpo, ppo (online RL)  base -> SFT -> eval -> (rollouts K on a batch of train tasks -> RL data ->
         policy-gradient update -> new weights into the running workers) x rl_steps, eval every eval_every steps

Each method registers itself at the end of this module with its defaults; `--method NAME` asks METHODS for it, and
so do the settings (its K, whether it has a self-play variant) and the summary (its best-of-K evaluation). Adding a
method: its loop (a function of the Pipeline, built from the stages below), its tests, and one line:

    METHODS.register(Method("mine", mine, samples_per_task=2), __name__)

A module outside the package registers the same way once imported, before the settings are parsed (the methods
run in the pipeline's own process).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from eval_agent.run_layout import (
    EVAL,
    EXPLORE,
    RL_DATA,
    ROLLOUT,
    UPDATE,
    eval_stage,
    iteration,
    iteration_stage,
    pairs_stage,
    rl_step_stage,
)
from fastchat.records import PROMPT_TURNS, pair_record, read_json, trajectory
from scripts.registry import Registry


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable[[Any], None]  # the loop, on a Pipeline
    samples_per_task: int = 1  # K when --samples_per_task is 0
    self_play_samples_per_task: int | None = None  # K of its --self_play 1 variant (None: it has none)
    # its own test evaluation that samples K times per task and is judged by each task's best sample (eval_<name>)
    best_of_k_evaluation: str | None = None
    # online RL: the policy-gradient trainer's --algorithm (fastchat.train.train_pg: grpo, ppo); None: not RL
    rl_algorithm: str | None = None


METHODS: Registry[Method] = Registry("method", lambda: [__name__])


def run_method(p) -> None:
    METHODS.get(p.a.method).run(p)


def default_samples_per_task(method: str, self_play: bool) -> int:
    """K when --samples_per_task is 0: the method's own, or its self-play variant's."""
    entry = METHODS.get(method)
    return entry.self_play_samples_per_task if self_play else entry.samples_per_task


def self_play_methods() -> list[str]:
    return [name for name, m in METHODS.entries().items() if m.self_play_samples_per_task is not None]


# -- the stages the loops are made of ---------------------------------------------------------------------

def evaluate(p, name: str, model: Path, temperature: float = 0.0, samples: int = 1) -> None:
    """Stage eval_<name>: the test tasks, played by `model`."""
    stage = eval_stage(name)
    p.episodes(stage, model, "test", p.layout.episode_dir(stage), temperature, p.a.test_tasks, p.a.eval_workers,
               samples=samples)


def explore(p, it: int, model: Path, temperature: float, samples: int) -> Path:
    """Stage explore_iter<it>: the train tasks, played by `model`; its folder of episodes."""
    stage = iteration_stage(EXPLORE, it)
    folder = p.layout.episode_dir(stage)
    p.episodes(stage, model, "train", folder, temperature, p.a.train_tasks, p.a.explore_workers, samples=samples)
    return folder


def start(p) -> Path:
    """eval_base (with --eval_base 1), then the starting model (SFT on the expert data, or self-play's) and
    eval_sft; with --from_run, those of that run."""
    a = p.a
    if a.from_run:
        return p.start_from_run()
    if a.eval_base:
        evaluate(p, "base", Path(a.model_path))
    model = self_play_start(p) if a.self_play else p.sft()
    evaluate(p, "sft", model)
    return model


def self_play_start(p) -> Path:
    """No expert data: the base model explores with K samples and is fine-tuned on its own successes (RFT)."""
    a = p.a
    explored = explore(p, 0, Path(a.model_path), a.temperature, a.samples_per_task)
    return p.sft("sft", p.kept_trajectories(iteration_stage("rft_data", 0), explored, with_expert=False))


def exploration_temperature(a) -> float:
    """K > 1 samples at --temperature; one sample per task at --explore_temperature (greedy, as the original)."""
    return a.temperature if a.samples_per_task > 1 else a.explore_temperature


# -- the methods ------------------------------------------------------------------------------------------

def dpo_loop(p, step_pairs: bool) -> None:
    """eto (trajectory pairs), ipr (step_pairs: also step pairs and the expert trajectories as SFT samples)."""
    a = p.a
    model = start(p)
    for it in range(1, a.iterations + 1):
        explored = explore(p, it, model, exploration_temperature(a), a.samples_per_task)
        pairs = p.layout.pairs_file(it)
        pairs.parent.mkdir(parents=True, exist_ok=True)
        counts = p.pairs(pairs_stage(it), explored, pairs, rule="self" if a.self_play else "expert")
        extra: tuple[str, ...] = ()
        if step_pairs:
            pairs, counts, extra = ipr_data(p, it, model, explored, pairs, counts)
        if counts["pairs"] == 0:
            print(f"[eto] iteration {it}: no pairs (the agent matched the expert everywhere, or its samples "
                  "tied); stopping the loop here")
            break
        model = p.dpo(iteration_stage("dpo", it), model, pairs, it, extra)
        evaluate(p, iteration(it), model)


def ipr_data(p, it: int, model: Path, explored: Path, trajectory_pairs: Path, counts: dict):
    """Step pairs from the current model's rollouts, then one training file: trajectory pairs, step pairs and
    the explored tasks' expert trajectories as SFT samples; the DPO flags that weight them."""
    a = p.a
    step_pairs = p.layout.pairs_file(it, "step")
    step_counts = p.pairs(pairs_stage(it, "step"), explored, step_pairs, rule="step", model=model)
    ids = {json.loads(f.read_text()).get("id") for f in explored.glob("*.json") if not f.name.startswith("metrics")}
    experts = [pair_record(r["id"], "sft", r["conversations"][:PROMPT_TURNS], trajectory(r["conversations"]))
               for r in p.expert_records() if r.get("id") in ids]
    mixed = read_json(trajectory_pairs, list) + read_json(step_pairs, list)
    path = p.write_data(f"{iteration_stage('ipr', it)}.json", mixed + experts)
    total = {"pairs": len(mixed), "trajectory_pairs": counts["pairs"], "step_pairs": step_counts["pairs"],
             "sft_samples": len(experts)}
    return path, total, ("--step_weight", str(a.step_weight), "--sft_weight", str(a.sft_weight))


def rft(p) -> None:
    """Each iteration: SFT of the base model on the expert trajectories + the explored ones that reached
    --rft_threshold."""
    a = p.a
    model = start(p)
    for it in range(1, a.iterations + 1):
        explored = explore(p, it, model, exploration_temperature(a), a.samples_per_task)
        kept = p.kept_trajectories(iteration_stage("rft_data", it), explored, with_expert=True)
        model = p.sft(iteration_stage("sft", it), kept)
        evaluate(p, iteration(it), model)


def bon(p) -> None:
    model = start(p)
    evaluate(p, "bon", model, p.a.temperature, p.a.samples_per_task)


# -- online RL -------------------------------------------------------------------------------------------

def rl_batch_seed(subset_seed: int, step: int) -> int:
    """The seed of step `step`'s batch of train tasks: another batch each step, the same on a rerun."""
    return subset_seed * 100_003 + step


def rl(p) -> None:
    """grpo, gigpo, ppo: SFT and eval_sft, then per step s: rollout_step<s> (the current policy plays K samples of
    --rl_tasks_per_step train tasks, a new seeded batch each step, drawn from all train tasks: RL needs no expert
    trajectory), rl_data_step<s> (advantages by the method), update_step<s> (one policy-gradient pass from the
    current policy, KL to the SFT model); eval_step<s> every --eval_every steps and after the last. The policy's
    servers stay up across the steps and take each new policy's weights in place (LiveServing)."""
    a = p.a
    algorithm = METHODS.get(a.method).rl_algorithm
    reference = model = start(p)
    policy = p.live_policy()
    try:
        for step in range(1, a.rl_steps + 1):
            stage = rl_step_stage(ROLLOUT, step)
            p.rl_episodes(stage, policy, model, step - 1, "train", a.temperature, a.rl_tasks_per_step,
                          rl_batch_seed(a.subset_seed, step), a.samples_per_task)
            data = p.rl_data(rl_step_stage(RL_DATA, step), p.layout.episode_dir(stage), p.layout.rl_data(step),
                             version=step - 1)
            model = p.pg_update(rl_step_stage(UPDATE, step), model, reference, data, algorithm,
                                previous_update=model if step > 1 else None)
            if step == a.rl_steps or (a.eval_every and step % a.eval_every == 0):
                p.rl_episodes(rl_step_stage(EVAL, step), policy, model, step, "test", 0.0, a.test_tasks,
                              a.subset_seed)
    finally:
        policy.close()


METHODS.register(Method("eto", lambda p: dpo_loop(p, step_pairs=False), self_play_samples_per_task=4), __name__)
METHODS.register(Method("ipr", lambda p: dpo_loop(p, step_pairs=True)), __name__)
METHODS.register(Method("rft", rft, samples_per_task=4), __name__)
METHODS.register(Method("bon", bon, samples_per_task=4, best_of_k_evaluation="bon"), __name__)
METHODS.register(Method("grpo", rl, samples_per_task=4, rl_algorithm="grpo"), __name__)
METHODS.register(Method("gigpo", rl, samples_per_task=4, rl_algorithm="grpo"), __name__)  # GiGPO's data, GRPO's loss
METHODS.register(Method("ppo", rl, samples_per_task=4, rl_algorithm="ppo"), __name__)
