"""The ETO pipeline's stages: the Pipeline object the methods (scripts/pipeline/methods.py) run, and run(), the whole
run from parsed settings to summary (`python -m scripts.eto_pipeline`, run_eto.sh).

The run folder's paths are eval_agent.run_layout's. Every stage runs as a subprocess from the repository root with
its log under <save>/<exp>/logs/<stage>.log; a failed
stage stops the run with its name and log path. Serving processes (controller, model workers) are started per model,
polled until they answer (never a fixed sleep) and stopped on success, failure or Ctrl-C. A finished stage writes
<save>/<exp>/stages/<stage>.json; a rerun with the same exp_name skips finished stages, and an interrupted
evaluation/exploration resumes episode by episode.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from eval_agent.config import TASK_PATH_ENV, load_task_config, task_folders
from eval_agent.envs.base import EPISODE_PROTOCOL
from eval_agent.run_layout import RunLayout, eval_stage, pair_stats_file
from fastchat.records import PROMPT_TURNS, trajectory_record, write_json_atomic
from fastchat.reporting import missing_writers
from fastchat.train import OPTIMIZER_STATE_FILE
from scripts.fetch_data import sha256_of
from scripts.pairs.rule import PAIR_RULES
from scripts.pairs.trajectory import explored_prompt
from scripts.pipeline.backends import SERVING_BACKENDS
from scripts.pipeline.methods import METHODS, run_method
from scripts.pipeline.services import LiveServing, Services, StageFailed, run_logged
from scripts.pipeline.settings import SPEED_ONLY, START_KNOBS, PipelineSettings, accumulation_steps
from scripts.pipeline.summary import write_summary
from scripts.pipeline.tracking import RunTracker
from scripts.rl_data import rl_stats_file

REPO = Path(__file__).resolve().parents[2]


def pg_log_summary(path: Path) -> dict:
    """A policy-gradient update's log (pg_log.json, one dict per optimizer step) summed up: the mean of each
    number over the steps (loss, pg_loss, kl, entropy, clip_fraction, value_loss, mean_advantage), tokens in
    total, and the number of optimizer steps."""
    steps = json.loads(path.read_text())
    numbers = {}
    for step in steps:
        for key, value in step.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                numbers.setdefault(key, []).append(value)
    summary = {key: sum(v) if key == "tokens" else sum(v) / len(v) for key, v in numbers.items()}
    return {**summary, "optimizer_steps": len(steps)}


def train_cost(out: Path) -> dict:
    """What a trainer spent, from the files it writes next to the model: tokens through the model (unpadded,
    x epochs; DPO counts chosen + rejected), optimizer steps and peak memory. A file it did not write gives None."""
    def read(name: str) -> dict:
        path = out / name
        return json.loads(path.read_text()) if path.exists() else {}

    summary, state = read("train_summary.json"), read("trainer_state.json")
    tokens = summary.get("tokens_per_epoch")
    return {"train_tokens": round(tokens * summary["epochs"]) if tokens is not None else None,
            "optimizer_steps": state.get("global_step"), "peak_rss_mib": summary.get("peak_rss_mib"),
            "peak_cuda_mib": summary.get("peak_cuda_mib")}


class Pipeline:
    def __init__(self, args: PipelineSettings):
        self.a = args
        self.layout = RunLayout(Path(args.save_path).resolve() / args.exp_name)
        self.run_dir, self.logs, self.stages = self.layout.root, self.layout.logs_dir, self.layout.stages_dir
        for d in (self.logs, self.stages):
            d.mkdir(parents=True, exist_ok=True)
        self.cfg = load_task_config(args.task, args.task_path)
        self.env = dict(os.environ)
        # stages find the task by name as this process does, from the repository root
        self.env[TASK_PATH_ENV] = os.pathsep.join(str(f) for f in task_folders(args.task_path)[1:])
        if args.gpus:
            self.env["CUDA_VISIBLE_DEVICES"] = args.gpus
        self.services = Services(self.layout, self.env)
        self.tracker = RunTracker(args.report_to, self.layout, args.exp_name)
        import torch  # only to ask whether a GPU is visible (trainers then get --bf16)
        self.cuda = torch.cuda.is_available()
        # a stage's GPU-seconds: its wall time x the GPUs it was given
        self.gpus = (self.world_size() if args.gpus else torch.cuda.device_count()) if self.cuda else 0

    # --- stage bookkeeping -------------------------------------------------
    def done(self, stage: str) -> dict | None:
        path = self.layout.stage_record(stage)
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        if all(Path(p).exists() for p in record.get("outputs", [])):
            return record
        return None

    def finish(self, stage: str, started: float, outputs: list[Path], cost: dict | None = None, **extra) -> dict:
        seconds = round(time.time() - started, 1)
        cost = dict(cost or {})
        if self.gpus:
            cost["gpu_seconds"] = round(seconds * self.gpus, 1)
        record = {"stage": stage, "seconds": seconds, "outputs": [str(p) for p in outputs], "cost": cost, **extra}
        write_json_atomic(self.layout.stage_record(stage), record, indent=1)
        # the point's index: the stage's place in the run, which a resumed run goes on counting
        self.tracker.log_stage(record, step=len(list(self.stages.glob("*.json"))))
        return record

    def run(self, stage: str, cmd: list[str], cwd: Path = REPO) -> None:
        log_path = self.layout.log(stage)
        print(f"[eto] {stage}: running (log: {log_path})", flush=True)
        code = run_logged(cmd, log_path, f"\n$ {' '.join(cmd)}", {**self.env, **self.tracker.stage_env(stage)}, cwd)
        if code != 0:
            raise StageFailed(stage, log_path, code)

    # --- stages --------------------------------------------------------------
    def train_cmd(self, module: str) -> list[str]:
        ngpu = len([g for g in self.a.gpus.split(",") if g.strip()])
        if ngpu > 1:
            return ["torchrun", f"--nproc_per_node={ngpu}", "-m", module]
        return [sys.executable, "-m", module]

    def serving_options(self) -> dict:
        """The serving settings a backend turns into its worker flags (scripts/pipeline/backends.py)."""
        return {"tensor_parallel_size": self.a.tensor_parallel_size, "max_model_len": self.a.max_model_len,
                "gpu_memory_utilization": self.a.gpu_memory_utilization}

    def gpu_list(self) -> list[str]:
        return [g.strip() for g in self.a.gpus.split(",") if g.strip()]

    def world_size(self) -> int:
        return max(1, len(self.gpu_list()))

    def batch_flags(self, global_batch: int, per_device: int) -> list[str]:
        accum = accumulation_steps(global_batch, per_device, self.world_size())
        return ["--per_device_train_batch_size", str(per_device), "--gradient_accumulation_steps", str(accum)]

    def common_train_flags(self) -> list[str]:
        flags = ["--model_max_length", str(self.a.model_max_length), "--save_strategy", "steps",
                 "--save_steps", str(self.a.save_steps), "--report_to", self.a.report_to]
        if self.a.keep_checkpoints:
            flags.append("--keep_checkpoints")
        if self.a.gradient_checkpointing:
            flags.append("--gradient_checkpointing")
        if self.cuda:
            flags.append("--bf16")
        if self.a.lora:
            flags.append("--lora")
        if self.a.deepspeed:
            flags += ["--deepspeed", self.a.deepspeed]
        return flags

    def preflight(self) -> None:
        """Check what the stages will need before the first one runs; report every problem at once."""
        problems = []
        model = Path(self.a.model_path)
        if not (model / "config.json").is_file():
            problems.append(f"model folder {model}: no config.json (models are never downloaded here)")
        data = Path(self.a.sft_data)
        if self.a.sft_data and not data.exists() and (self.cfg.expert_data is None
                                                      or data != self.cfg.expert_data_path()):
            problems.append(f"expert data {data} not found (and no expert_data.build of {self.cfg.path} writes it)")
        problems += self.cfg.env_class().requirements()
        problems += SERVING_BACKENDS.get(self.a.serving).requirements()
        problems += missing_writers(self.a.report_to)
        try:
            probe = self.layout.write_probe
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            problems.append(f"output folder {self.run_dir} is not writable ({e})")
        if (model / "config.json").is_file():
            # every SFT/DPO/RL update stage writes a model about the size of the base model's weights
            weights = sum(f.stat().st_size for f in model.glob("*.safetensors")) or \
                sum(f.stat().st_size for f in model.glob("*.bin"))
            trained = self.a.rl_steps if METHODS.get(self.a.method).rl_algorithm else self.a.iterations
            need = weights * (1 + trained) * 1.1
            free = shutil.disk_usage(self.run_dir).free
            if need > free:
                problems.append(f"{self.run_dir}: {free / 2**30:.1f} GiB free, the models of this run need about "
                                f"{need / 2**30:.1f} GiB")
        if problems:
            raise StageFailed("preflight", self.run_dir, 2, "cannot start:\n" + "\n".join(f"  - {x}" for x in problems))

    def expert_data(self) -> None:
        """Build the task's expert file with its config's expert_data.build when it is missing
        (ScienceWorld's replays take minutes)."""
        data = Path(self.a.sft_data)
        if not self.a.sft_data or data.exists():  # self-play has none
            return
        if self.cfg.expert_data is None or data != self.cfg.expert_data_path():
            raise StageFailed("expert_data", data, 1, f"expert data {data} not found")
        started = time.time()
        self.run("expert_data", self.cfg.expert_build_command(), cwd=self.cfg.path.parent)
        if not data.exists():
            raise StageFailed("expert_data", self.layout.log("expert_data"), 1,
                              f"expert_data.build of {self.cfg.path} wrote no {data}")
        self.finish("expert_data", started, [data])

    def expert_subset(self, records: list[dict]) -> list[dict]:
        """--sft_samples N expert records, spread evenly over the train split's task types (seeded)."""
        from eval_agent.tasks.base import spread_subset, task_type

        types = {t.id: task_type(t) for t in self.cfg.make_loader().load("train")}
        return spread_subset(records, self.a.sft_samples, self.a.subset_seed,
                             kind=lambda rec: types.get(str(rec.get("id")), "other"))

    def expert_records(self) -> list[dict]:
        """The expert trajectories SFT trains on: all, or --sft_samples of them spread over the task types."""
        records = json.loads(Path(self.a.sft_data).read_text())
        return self.expert_subset(records) if self.a.sft_samples else records

    def sft(self, stage: str = "sft", data: Path | None = None) -> Path:
        """SFT of the base model on `data` (default: the expert trajectories)."""
        out = self.layout.model(stage)
        if (rec := self.done(stage)):
            print(f"[eto] {stage}: done already ({rec['seconds']} s), skipping")
            return out
        started = time.time()
        if data is None:
            data = Path(self.a.sft_data)
            if not data.exists():
                raise StageFailed(stage, data, 1, f"expert data {data} not found")
            if self.a.sft_samples:
                data = self.write_data("sft_subset.json", self.expert_records())
        cmd = self.train_cmd("fastchat.train.train") + [
            "--model_name_or_path", self.a.model_path, "--data_path", str(data), "--output_dir", str(out),
            "--num_train_epochs", str(self.a.sft_epochs), "--learning_rate", str(self.a.sft_lr),
            *self.batch_flags(self.a.sft_batch_size, self.a.sft_per_device_batch_size), "--warmup_ratio", "0.03",
            "--lr_scheduler_type", "cosine", *self.common_train_flags()]
        self.run(stage, cmd)
        self.finish(stage, started, [out / "config.json"], cost=train_cost(out),
                    samples=len(json.loads(data.read_text())))
        return out

    # --- a start taken over from another run (--from_run) ---------------------------------------------------
    def start_from_run(self) -> Path:
        """The --from_run run's eval_base (with --eval_base 1), sft and eval_sft become this run's: its SFT model
        is used where it is (recorded by its files' hashes, checked on every rerun) and its evaluation episodes are
        copied into this run, so the summary and the viewer show them and every later evaluation is paired with
        them. Refused unless that run's START_KNOBS equal this run's and it has finished those stages."""
        parent = RunLayout(Path(self.a.from_run))
        before, now = json.loads(parent.settings.read_text()), self.settings()
        differ = settings_differences(before, now, START_KNOBS)
        if differ:
            lines = "\n".join(f"  {k}: {before.get(k)!r} there, {now.get(k)!r} here" for k in differ)
            raise StageFailed("from_run", parent.settings, 2, f"--from_run {parent.root}: that run's start was made "
                              f"with other settings:\n{lines}\ngive this run the same values, or start it on its own")
        for stage in ([eval_stage("base")] if self.a.eval_base else []) + ["sft", eval_stage("sft")]:
            self.take_over(parent, stage)
        return sft_model(self.done("sft"))

    def take_over(self, parent: RunLayout, stage: str) -> None:
        if (rec := self.done(stage)):
            if stage == "sft" and model_hashes(model := sft_model(rec)) != rec["model_sha256"]:
                raise StageFailed(stage, model, 2, f"{model} changed since this run took it over from "
                                  f"{parent.root} (its weights' hashes differ): this run's later stages were built "
                                  "on the old one; --restart this run")
            print(f"[eto] {stage}: taken over from {parent.root} already, skipping")
            return
        path = parent.stage_record(stage)
        record = json.loads(path.read_text()) if path.is_file() else None
        if record is None or not all(Path(p).exists() for p in record.get("outputs", [])):
            raise StageFailed("from_run", path, 2, f"--from_run {parent.root} has not finished stage {stage}: "
                              "finish that run first (rerun its command)")
        started = time.time()
        extra = {"from_run": str(parent.root), "seconds_there": record["seconds"], "cost_there": record.get("cost")}
        if stage == "sft":  # where that run's record says: its own, or the one it took over itself
            model = sft_model(record)
            outputs = [model / "config.json"]
            extra |= {"model_sha256": model_hashes(model), "samples": record.get("samples")}
        else:
            folder = self.layout.episode_dir(stage)
            partial = folder.with_name(folder.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(parent.episode_dir(stage), partial)
            shutil.rmtree(folder, ignore_errors=True)
            partial.rename(folder)
            outputs = [folder / "metrics.json"]
            extra["metrics"] = record["metrics"]
        self.finish(stage, started, outputs, cost={}, **extra)
        print(f"[eto] {stage}: taken over from {parent.root}")

    def write_data(self, name: str, records: list) -> Path:
        path = self.layout.data(name)
        write_json_atomic(path, records, indent=None)
        return path

    def expert_ids(self) -> Path:
        """The ids of the expert trajectories: exploration plays only tasks that can form a pair."""
        return self.write_data("expert_ids.json", [str(rec.get("id")) for rec in
                                                   json.loads(Path(self.a.sft_data).read_text())])

    def episodes(self, stage: str, model: Path, split: str, out: Path, temperature: float,
                 n_tasks: int, workers: int, samples: int = 1) -> dict:
        if (rec := self.done(stage)):
            print(f"[eto] {stage}: done already ({rec['seconds']} s), skipping")
            return rec["metrics"]
        started = time.time()
        name = f"{self.a.exp_name}-{stage}"
        with self.services.serving(model, name, n_workers=workers, stage=stage, batch_size=self.a.worker_batch_size,
                                   gpus=self.gpu_list(), backend=self.a.serving,
                                   options=self.serving_options()) as controller:
            cmd = self.episode_cmd(controller, name, split, out, temperature, n_tasks, self.a.subset_seed, samples)
            if split == "train" and self.a.sft_data:
                cmd += ["--task_ids", str(self.expert_ids())]
            self.run(stage, cmd)
        metrics = json.loads((out / "metrics.json").read_text())
        self.finish(stage, started, [out / "metrics.json"], cost=metrics["cost"], metrics=metrics)
        return metrics

    def episode_cmd(self, controller: str, model_name: str, split: str, out: Path, temperature: float,
                    n_tasks: int, seed: int, samples: int) -> list[str]:
        """eval_agent.main playing `split` against `controller`'s `model_name` into `out`: all tasks, or `n_tasks`
        spread over the task types (chosen with `seed`), `samples` times each."""
        cmd = [sys.executable, "-m", "eval_agent.main", "--agent_config", "fastchat",
               "--controller_address", controller, "--model_name", model_name, "--exp_config", self.a.task,
               "--split", split, "--output_path", str(out), "--num_workers", str(self.a.num_workers),
               "--temperature", str(temperature), "--top_p", str(self.a.top_p),
               "--max_new_tokens", str(self.a.max_new_tokens)]
        if samples > 1:
            cmd += ["--samples_per_task", str(samples)]
        if n_tasks:
            cmd += ["--sample_tasks", str(n_tasks), "--sample_seed", str(seed)]
        if self.a.max_steps:
            cmd += ["--max_steps", str(self.a.max_steps)]
        return cmd

    # --- online RL (grpo, gigpo, ppo: docs/methods.md) -----------------------------------------------------------
    def live_policy(self) -> LiveServing:
        """The RL policy's servers, kept across the run's stages (--explore_workers workers)."""
        return LiveServing(self.services, "policy", f"{self.a.exp_name}-policy", self.a.explore_workers,
                           backend=self.a.serving, batch_size=self.a.worker_batch_size, gpus=self.gpu_list(),
                           options=self.serving_options())

    def rl_episodes(self, stage: str, policy: LiveServing, model: Path, version: int, split: str, temperature: float,
                    n_tasks: int, seed: int, samples: int = 1) -> dict:
        """Episodes of `model` as policy version `version` on the live servers `policy` (pushed the new weights
        first when they serve an older version); the stage records the version and the weight sync."""
        if (rec := self.done(stage)):
            print(f"[eto] {stage}: done already ({rec['seconds']} s), skipping")
            return rec["metrics"]
        started = time.time()
        out = self.layout.episode_dir(stage)
        controller, sync = policy.serve(model, version, stage)
        self.run(stage, self.episode_cmd(controller, policy.model_name, split, out, temperature, n_tasks, seed,
                                         samples))
        metrics = json.loads((out / "metrics.json").read_text())
        self.finish(stage, started, [out / "metrics.json"], cost=metrics["cost"], metrics=metrics,
                    policy_version=version, weight_sync=sync)
        return metrics

    def rl_data(self, stage: str, explored: Path, out: Path, version: int) -> Path:
        """scripts.rl_data: the training records of one RL step from its rollouts (advantages by --method); their
        counts go to the stage record. StageFailed when an episode was played by another policy version."""
        if self.done(stage):
            return out
        started = time.time()
        a = self.a
        cmd = [sys.executable, "-m", "scripts.rl_data", "--explore_dir", str(explored), "--output_path", str(out),
               "--method", a.method, "--gamma", str(a.gamma)]
        if a.method == "gigpo":
            cmd += ["--step_weight", str(a.step_weight)]
        self.run(stage, cmd)
        stats = json.loads(rl_stats_file(out).read_text())
        if stats.get("policy_versions") != [version]:
            raise StageFailed(stage, rl_stats_file(out), 1,
                              f"the rollouts in {explored} came from policy versions {stats.get('policy_versions')}, "
                              f"expected only {version} (on-policy data)")
        self.finish(stage, started, [out], counts=stats)
        return out

    def pg_update(self, stage: str, model: Path, reference: Path, data: Path, algorithm: str,
                  previous_update: Path | None = None) -> Path:
        """One pass of fastchat.train.train_pg over `data` from the policy `model`, KL to `reference`, its optimizer
        going on from `previous_update`'s (one optimizer over the run; not under --deepspeed or --lora, where each
        update starts a fresh one); a rerun after a kill continues from the trainer's last checkpoint. Its per-step
        log (pg_log.json) is summed up in the stage record; the previous update's optimizer file, no longer needed,
        is removed once this one has finished."""
        out = self.layout.model(stage)
        if self.done(stage):
            return out
        started = time.time()
        a = self.a
        cmd = self.train_cmd("fastchat.train.train_pg") + [
            "--model_name_or_path", str(model), "--ref_model_name_or_path", str(reference), "--data_path", str(data),
            "--output_dir", str(out), "--algorithm", algorithm, "--clip_range", str(a.clip_range),
            "--kl_coef", str(a.kl_coef), "--loss_aggregation", a.loss_aggregation,
            "--learning_rate", str(a.rl_learning_rate), "--ppo_epochs", "1", "--lr_scheduler_type", "constant",
            "--rollout_temperature", str(a.temperature),
            *self.batch_flags(a.rl_batch_size, a.rl_per_device_batch_size), *self.common_train_flags()]
        if algorithm == "ppo":  # GAE recovers the step rewards from the returns rl_data discounted with gamma
            cmd += ["--gae_gamma", str(a.gamma)]
        carry_optimizer = previous_update is not None and not (a.deepspeed or a.lora)
        if carry_optimizer:
            cmd += ["--optimizer_state_from", str(previous_update)]
        self.run(stage, cmd)
        log = out / "pg_log.json"
        if not log.is_file():
            raise StageFailed(stage, self.layout.log(stage), 1, f"fastchat.train.train_pg wrote no {log}")
        self.finish(stage, started, [out / "config.json"], cost=train_cost(out), pg=pg_log_summary(log),
                    optimizer_from=str(previous_update) if carry_optimizer else None)
        if carry_optimizer:
            (previous_update / OPTIMIZER_STATE_FILE).unlink(missing_ok=True)
        return out

    def pairs(self, stage: str, explore_dir: Path, out: Path, rule: str = "expert", model: Path | None = None) -> dict:
        """Pairs by the registered pair rule `rule` (scripts.construct_preference, scripts/pairs/rule.py), with the
        values of its pipeline_flags; a served rule's rollouts are played by `model`."""
        if (rec := self.done(stage)):
            return rec["counts"]
        started = time.time()
        pair_rule = PAIR_RULES.get(rule)
        cmd = [sys.executable, "-m", "scripts.construct_preference", "--rule", rule,
               "--explore_dir", str(explore_dir), "--output_path", str(out), "--task", self.a.task]
        if not PAIR_RULES.is_builtin(rule):  # the builder's process registers it by importing its module
            cmd += ["--plugin", PAIR_RULES.module_of(rule)]
        if self.a.sft_data:
            cmd += ["--expert_path", self.a.sft_data]
        cmd += pair_rule.pipeline_flags(self.a)
        if not pair_rule.served:
            self.run(stage, cmd)
        else:
            name = f"{self.a.exp_name}-{stage}"
            with self.services.serving(model, name, n_workers=self.a.explore_workers, stage=stage,
                                       batch_size=self.a.worker_batch_size, gpus=self.gpu_list(),
                                       backend=self.a.serving, options=self.serving_options()) as controller:
                self.run(stage, cmd + ["--model_name", name, "--controller_address", controller])
        counts = json.loads(pair_stats_file(out).read_text())
        cost = counts.get("cost", {})
        return self.finish(stage, started, [out], cost={f: cost.get(f) for f in
                                                       ("env_steps", "prompt_tokens", "completion_tokens")},
                           counts=counts)["counts"]

    def kept_trajectories(self, stage: str, explore_dir: Path, with_expert: bool) -> Path:
        """RFT data: the explored trajectories with reward >= --rft_threshold (each distinct one once), after
        the expert trajectories when `with_expert`."""
        out = self.layout.data(f"{stage}.json")
        if (rec := self.done(stage)):
            return out
        started = time.time()
        from eval_agent.runner import is_complete, read_result

        kept, seen, played = [], set(), 0
        for path in sorted(explore_dir.glob("*.json")):
            rec = None if path.name.startswith("metrics") else read_result(path)
            if not is_complete(rec):
                continue
            played += 1
            key = json.dumps(rec["conversations"])
            if float(rec["meta"].get("reward") or 0.0) >= self.a.rft_threshold and key not in seen:
                seen.add(key)
                turns = rec["conversations"]  # the task turn in the expert data's form, as the SFT data has it
                turns = explored_prompt(turns, self.cfg) + turns[PROMPT_TURNS:]
                kept.append(trajectory_record(rec["id"], turns, reward=rec["meta"]["reward"]))
        if not kept and not with_expert:
            raise StageFailed(stage, explore_dir, 1, f"no explored trajectory reached reward {self.a.rft_threshold}: "
                                                     "nothing to fine-tune on (more --samples_per_task or "
                                                     "--train_tasks, or a lower --rft_threshold)")
        records = (self.expert_records() if with_expert else []) + kept
        self.write_data(out.name, records)
        counts = {"episodes": played, "kept": len(kept), "expert": len(records) - len(kept)}
        print(f"[eto] {stage}: kept {len(kept)} of {played} explored trajectories")
        self.finish(stage, started, [out], counts=counts)
        return out

    def dpo(self, stage: str, model: Path, pairs: Path, it: int, extra: tuple[str, ...] = ()) -> Path:
        out = self.layout.model(stage)
        if self.done(stage):
            return out
        started = time.time()
        lr = self.a.dpo_lrs[min(it - 1, len(self.a.dpo_lrs) - 1)]
        beta = self.a.dpo_betas[min(it - 1, len(self.a.dpo_betas) - 1)]
        cmd = self.train_cmd("fastchat.train.train_dpo") + [
            "--model_name_or_path", str(model), "--data_path", str(pairs), "--output_dir", str(out),
            "--beta", str(beta), "--learning_rate", str(lr), "--num_train_epochs", str(self.a.dpo_epochs),
            *self.batch_flags(self.a.dpo_batch_size, self.a.dpo_per_device_batch_size),
            "--lr_scheduler_type", "constant_with_warmup", "--warmup_ratio", str(self.a.dpo_warmup_ratio),
            "--precompute_ref_logps", *extra, *self.common_train_flags()]
        self.run(stage, cmd)
        self.finish(stage, started, [out / "config.json"], cost=train_cost(out), lr=lr, beta=beta)
        return out

    def settings(self) -> dict:
        """What makes this run this run: every setting but the speed-only ones, the expert data's hash and the
        version of the episode rules."""
        data = Path(self.a.sft_data)
        settings = {**dataclasses.asdict(self.a), "episode_protocol": EPISODE_PROTOCOL,
                    "sft_data_sha256": sha256_of(data) if self.a.sft_data and data.exists() else None}
        return json.loads(json.dumps(settings, default=str))

    def record_settings(self) -> None:
        """Refuse to continue a run folder that holds another run's work; else (re)write settings.json."""
        path = self.layout.settings
        now = self.settings()
        if path.exists():
            before = json.loads(path.read_text())
            keys = sorted((set(before) | set(now)) - set(SPEED_ONLY))
            differ = [k for k in settings_differences(before, now, keys)
                      if not (k == "sft_data_sha256" and before.get(k) is None)]  # built since
            if differ:
                lines = "\n".join(f"  {k}: {before.get(k)!r} then, {now.get(k)!r} now" for k in differ)
                raise StageFailed("settings", path, 2,
                                  f"{self.run_dir} holds a run with other settings:\n{lines}\nuse another exp_name, "
                                  "or --restart to delete that run and start over")
        write_json_atomic(path, now, indent=1)

    def main(self) -> int:
        a = self.a
        print(f"[eto] task={a.task} exp={a.exp_name} model={a.model_path} outputs={self.run_dir}")
        self.record_settings()
        self.preflight()
        self.expert_data()
        self.record_settings()  # with the hash of expert data built just now
        run_method(self)
        summary = write_summary(self.run_dir)
        print(summary["markdown"])
        print(f"[eto] summary: {self.layout.summary_json}, {self.layout.summary_md}, {self.layout.summary_png}")
        print(f"[eto] see the run (stages, episodes, pairs): python -m eval_agent.viewer {self.run_dir}")
        return 0


def settings_differences(before: dict, now: dict, keys) -> list[str]:
    """The keys whose recorded value `before` differs from `now`'s. A knob added since `before` was recorded, left
    at its default, is no difference: it changes nothing of that run."""
    defaults = {f.name: f.default for f in dataclasses.fields(PipelineSettings)}
    return [k for k in keys if before.get(k) != now.get(k)
            and not (k not in before and k in defaults and now.get(k) == defaults[k])]


def sft_model(record: dict) -> Path:
    """The model folder of an sft stage record (its output is the folder's config.json)."""
    return Path(record["outputs"][0]).parent


def model_hashes(folder: Path) -> dict[str, str]:
    """sha256 of each weights file of a model folder."""
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("pytorch_model*.bin"))
    return {f.name: sha256_of(f) for f in files}


def run(args: PipelineSettings) -> int:
    """The whole run for parsed settings (scripts.pipeline.settings.parse_args); the exit status."""
    if args.restart:
        shutil.rmtree(Path(args.save_path).resolve() / args.exp_name, ignore_errors=True)
    pipeline = Pipeline(args)
    # SIGTERM behaves like Ctrl-C: unwind, stopping every process we started.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return pipeline.main()
    except StageFailed as e:
        print(f"[eto] FAILED at stage '{e.stage}' (exit {e.code}); log: {e.log}" + (f"\n{e.detail}" if e.detail else ""),  # noqa: E501
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("[eto] interrupted; finished stages are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        pipeline.services.stop_all()
        pipeline.tracker.close()
        shutil.rmtree(pipeline.layout.tmp, ignore_errors=True)
