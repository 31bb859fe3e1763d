"""The ETO pipeline's settings: flags, environment variables, presets and the global-batch rule.

    python scripts/eto_pipeline.py --help      # every flag, its environment variable and its default
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from eto_services import gpu_groups

from eval_agent.config import TASK_PATH_ENV, ConfigError, describe_tasks, load_task_config

# Presets: a small budget for the default model on CPU. Flags and environment variables win over them.
PRESETS = {
    "demo": dict(sft_samples=24, sft_epochs=1, train_tasks=4, test_tasks=4, iterations=1, max_steps=10,
                 model_max_length=1024, sft_batch_size=4, sft_per_device_batch_size=2, dpo_batch_size=4,
                 dpo_per_device_batch_size=2, num_workers=4, eval_base=1),
    # The learning-effect study (docs/results/README.md says why each number): <= 150 min on 2 cores.
    "cpu-study": dict(eval_base=1, sft_samples=64, sft_epochs=1, sft_lr=1e-4, sft_batch_size=8,
                      sft_per_device_batch_size=1, model_max_length=2048, test_tasks=24, train_tasks=16,
                      iterations=1, max_steps=20, max_new_tokens=128, num_workers=8, dpo_lrs="3e-5",
                      dpo_betas="0.1", dpo_epochs=1, dpo_batch_size=4, dpo_per_device_batch_size=1),
    # The same study at scale on one GPU (scripts/gpu_study.sh): all expert data, the whole test split, the
    # original's SFT recipe; exploration of 256 train tasks and one DPO iteration to fit 10 minutes.
    "gpu-study": dict(eval_base=1, iterations=1, train_tasks=256, max_new_tokens=128, num_workers=64,
                      worker_batch_size=64, sft_lr=1e-4, dpo_lrs="5e-6", dpo_betas="0.1", dpo_epochs=2,
                      dpo_batch_size=32),
}


METHODS = ("eto", "ipr", "rft", "bon")

# Settings a rerun may change: they change speed, not results. Any other difference is another run.
SPEED_ONLY = ("num_workers", "explore_workers", "eval_workers", "worker_batch_size", "gpu_memory_utilization",
              "save_path", "restart", "save_steps", "keep_checkpoints", "gradient_checkpointing")


def accumulation_steps(global_batch: int, per_device: int, world_size: int) -> int:
    """The original's rule (bash integer division): global / world / per-device, at least 1."""
    return max(1, global_batch // world_size // per_device)


def env_default(name: str, default, cast=str):
    value = os.environ.get(name)
    return default if value in (None, "") else cast(value)


def parse_args(argv=None, description: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", help=f"task name ({describe_tasks()}; more with --task_path)")
    p.add_argument("exp_name", help=f"run name; a preset name ({', '.join(PRESETS)}) applies that budget "
                                    "unless flags say otherwise")
    p.add_argument("model_path", nargs="?", default=None,
                   help="base model folder (default, or '': the embedded model)")
    p.add_argument("save_path", nargs="?", default="outputs", help="root of all outputs (default: outputs)")
    p.add_argument("--restart", action="store_true",
                   help="delete <save_path>/<exp_name> first and start the run over (finished stages are lost)")
    p.add_argument("--task_path", action="append", default=[], metavar="DIR",
                   help=f"also find task configs in DIR (repeatable; before ${TASK_PATH_ENV}'s folders)")

    def knob(flag, env, default, cast, text):
        p.add_argument(flag, default=None, type=cast, help=f"{text} [env {env}; default {default}]")
        return (flag.lstrip("-").replace("-", "_"), env, default, cast)

    knobs = [
        knob("--method", "METHOD", "eto", str, "eto (SFT, then explore -> pairs -> DPO), ipr (ETO plus step-level "
             "pairs), rft (rejection-sampling fine-tuning), bon (best-of-K sampling of the SFT agent); README: "
             "'Methods'"),
        knob("--self_play", "SELF_PLAY", 0, int, "eto without expert data: RFT on the base model's own successes, "
             "then DPO on pairs of the agent's own samples (rule self)"),
        knob("--samples_per_task", "SAMPLES_PER_TASK", 0, int, "K samples per task in exploration (and in the bon "
             "evaluation) (0 = the method's default: eto/ipr 1, bon/rft/self-play 4)"),
        knob("--temperature", "TEMPERATURE", 0.7, float, "sampling temperature when K > 1"),
        knob("--top_p", "TOP_P", 1.0, float, "nucleus sampling when K > 1"),
        knob("--rft_threshold", "RFT_THRESHOLD", 1.0, float, "rft/self-play keep explored trajectories with "
             "reward >= this"),
        knob("--min_reward_gap", "MIN_REWARD_GAP", 0.0, float, "self pairs: best - worst reward must exceed this"),
        knob("--step_rollouts", "STEP_ROLLOUTS", 3, int, "ipr: Monte-Carlo rollouts per step value"),
        knob("--step_margin", "STEP_MARGIN", 0.0, float, "ipr: step pair when value(expert) - value(agent) > this"),
        knob("--step_max_prefixes", "STEP_MAX_PREFIXES", 4, int, "ipr: expert steps tried per task"),
        knob("--step_weight", "STEP_WEIGHT", 1.0, float, "ipr: weight of the step-level DPO loss"),
        knob("--sft_weight", "SFT_WEIGHT", 1.0, float, "ipr: weight of the SFT loss on expert trajectories"),
        knob("--iterations", "ITERATIONS", 3, int, "exploration/DPO iterations"),
        knob("--num_workers", "NUM_WORKERS", 8, int, "concurrent episodes per evaluation/exploration"),
        knob("--explore_workers", "EXPLORE_WORKERS", 0, int, "model worker processes serving exploration "
             "(0 = one per GPU group of --gpus, else 1)"),
        knob("--eval_workers", "EVAL_WORKERS", 0, int, "model worker processes serving evaluation (0 = as "
             "--explore_workers)"),
        knob("--serving", "SERVING", "hf", str, "model workers: hf (ours, transformers with batching) or vllm"),
        knob("--tensor_parallel_size", "TENSOR_PARALLEL_SIZE", 1, int, "vllm: GPUs per worker"),
        knob("--gpu_memory_utilization", "GPU_MEMORY_UTILIZATION", 0.9, float, "vllm: fraction of GPU memory"),
        knob("--max_model_len", "MAX_MODEL_LEN", 0, int, "vllm: context length (0 = the model's)"),
        knob("--worker_batch_size", "WORKER_BATCH_SIZE", 8, int, "sequences a model worker decodes together "
             "(and prompts whose KV cache it keeps); match it to --num_workers"),
        knob("--sft_lr", "SFT_LR", 2e-5, float, "SFT learning rate"),
        knob("--sft_epochs", "SFT_EPOCHS", 3, int, "SFT epochs"),
        knob("--sft_batch_size", "SFT_BATCH_SIZE", 64, int, "SFT global batch size (sequences per optimizer step, "
             "all devices together; accumulation = global // devices // per-device, as in the original)"),
        knob("--sft_per_device_batch_size", "SFT_PER_DEVICE_BATCH_SIZE", 4, int, "SFT sequences per device per "
             "forward pass"),
        knob("--dpo_lrs", "DPO_LRS", "1e-6 5e-7", str, "DPO learning rate per iteration (the last repeats)"),
        knob("--dpo_betas", "DPO_BETAS", "0.1 0.5", str, "DPO beta per iteration (the last repeats)"),
        knob("--dpo_epochs", "DPO_EPOCHS", 3, int, "DPO epochs per iteration"),
        knob("--dpo_batch_size", "DPO_BATCH_SIZE", 32, int, "DPO global batch size in pairs (accumulation "
             "derived as for SFT)"),
        knob("--dpo_per_device_batch_size", "DPO_PER_DEVICE_BATCH_SIZE", 2, int, "DPO pairs per device per "
             "forward pass"),
        knob("--dpo_warmup_ratio", "DPO_WARMUP_RATIO", 0.1, float, "DPO schedule: constant learning rate "
             "after this warmup fraction, as in the original"),
        knob("--model_max_length", "MODEL_MAX_LENGTH", 4096, int, "training sequence length"),
        knob("--save_steps", "SAVE_STEPS", 100, int, "trainers checkpoint every N optimizer steps; a rerun after a "
             "crash continues from the last complete checkpoint (100: at most ~30 min lost on a 7B GPU run)"),
        knob("--keep_checkpoints", "KEEP_CHECKPOINTS", 0, int, "1 = keep the checkpoints of finished stages"),
        knob("--gradient_checkpointing", "GRADIENT_CHECKPOINTING", 0, int, "1 = trainers keep only each layer's "
             "input and recompute the rest in backward: same losses, ~1/3 of the activation memory (2 x 2,048 "
             "tokens of the default model: 2.8 GiB peak instead of 8.9 GiB), ~1.5x the time"),
        knob("--explore_temperature", "EXPLORE_TEMPERATURE", 0.0, float, "0 = greedy, as the original ran"),
        knob("--max_steps", "MAX_STEPS", 0, int, "episode step limit (0 = the task config's)"),
        knob("--max_new_tokens", "MAX_NEW_TOKENS", 0, int, "tokens per model answer (0 = the agent config's)"),
        knob("--train_tasks", "TRAIN_TASKS", 0, int, "explore a fixed subset of N train tasks, spread evenly "
             "over the task types (0 = all)"),
        knob("--test_tasks", "TEST_TASKS", 0, int, "evaluate a fixed subset of N test tasks, spread evenly over "
             "the task types (0 = all); the same tasks at every stage"),
        knob("--sft_samples", "SFT_SAMPLES", 0, int, "train on a fixed subset of N expert trajectories, spread "
             "evenly over the task types (0 = all)"),
        knob("--subset_seed", "SUBSET_SEED", 0, int, "seed of the fixed subsets"),
        knob("--eval_base", "EVAL_BASE", 0, int, "1 = also evaluate the untuned starting model (stage eval_base)"),
        knob("--lora", "LORA", 0, int, "1 = train LoRA adapters (merged after each stage)"),
        knob("--gpus", "GPUS", "", str, "GPU ids, e.g. 0,1,2,3 (empty = CPU or whatever is visible)"),
        knob("--deepspeed", "DEEPSPEED", "", str, "DeepSpeed config for multi-GPU training"),
        knob("--sft_data", "SFT_DATA", "", str, "expert trajectories (default: the task config's expert_data.path)"),
    ]
    args = p.parse_args(argv)
    try:
        cfg = load_task_config(args.task, args.task_path)
    except ConfigError as e:
        p.error(str(e))
    preset = PRESETS.get(args.exp_name, {})
    for name, env, default, cast in knobs:
        if getattr(args, name) is None:
            setattr(args, name, env_default(env, preset.get(name, default), cast))
    for flag in ("sft_batch_size", "sft_per_device_batch_size", "dpo_batch_size", "dpo_per_device_batch_size",
                 "tensor_parallel_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1")
    if args.method not in METHODS:
        p.error(f"--method must be one of {', '.join(METHODS)}, got {args.method!r}")
    if args.self_play and args.method != "eto":
        p.error("--self_play 1 goes with --method eto")
    if args.samples_per_task < 0:
        p.error("--samples_per_task must be >= 0")
    args.samples_per_task = args.samples_per_task or (4 if args.method in ("bon", "rft") or args.self_play else 1)
    if args.serving not in ("hf", "vllm"):
        p.error(f"--serving must be hf or vllm, got {args.serving!r}")
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    groups = len(gpu_groups(gpus, args.tensor_parallel_size if args.serving == "vllm" else 1))
    if gpus and not groups:
        p.error(f"--tensor_parallel_size {args.tensor_parallel_size} needs at least that many --gpus")
    args.explore_workers = args.explore_workers or max(1, groups)
    args.eval_workers = args.eval_workers or args.explore_workers
    args.dpo_lrs = [float(x) for x in str(args.dpo_lrs).replace(",", " ").split()]
    args.dpo_betas = [float(x) for x in str(args.dpo_betas).replace(",", " ").split()]
    if not args.model_path:
        from fastchat.constants import default_model_path
        args.model_path = str(default_model_path())
    if not args.sft_data and not args.self_play:
        if cfg.expert_data is None:
            p.error(f"{cfg.path}: no field 'expert_data' (path and build); give --sft_data")
        args.sft_data = str(cfg.expert_data_path())
    # subprocesses run from the repository root: make user-relative paths absolute
    for name in ("model_path", "sft_data", "deepspeed"):
        value = getattr(args, name)
        if value and Path(value).exists():
            setattr(args, name, str(Path(value).resolve()))
    return args
