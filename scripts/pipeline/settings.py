"""The ETO pipeline's settings: one typed object, PipelineSettings, resolved once before any stage runs.

    python -m scripts.eto_pipeline --help              # every flag, its environment variable and its default
    python -m scripts.pipeline.settings --markdown     # the knob table, committed as docs/knobs.md

Each knob is a field of PipelineSettings with its type, its one default, its help text and its group. Its value
comes from, lowest to highest: the default < the preset named by exp_name (presets/<exp_name>.yaml) < the YAML
file of --config FILE < the environment variable ETO_<KNOB> < the flag --<knob>. A value is parsed and checked
where it is read: a bad one stops the run with one line naming its source, exit status 2. The values the pipeline
computes from the user's (derive) are filled in after that, in one place.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from eval_agent.agents.base import MAX_NEW_TOKENS, TOP_P
from eval_agent.config import TASK_PATH_ENV, ConfigError, TaskConfig, describe_tasks, load_task_config
from eval_agent.run_layout import RunLayout
from fastchat.constants import default_model_path
from fastchat.reporting import REPORT_TO_CHOICES
from scripts.pipeline.backends import SERVING_BACKENDS
from scripts.pipeline.methods import METHODS, default_samples_per_task, self_play_methods
from scripts.pipeline.services import gpu_groups
from scripts.rl_data import DEFAULT_GAMMA

PROG = "run_eto.sh"  # `python -m scripts.eto_pipeline` takes the same arguments
ENV_PREFIX = "ETO_"
PRESET_DIR = Path(__file__).resolve().with_name("presets")
REPO = Path(__file__).resolve().parents[2]

# The settings that make a run's start (eval_base, SFT, eval_sft): a run started --from_run another must have that
# run's values of these, so that the start it reuses is the one its own settings describe.
START_KNOBS = ("task", "model_path", "task_path", "self_play", "eval_base", "test_tasks", "sft_samples",
               "subset_seed", "max_steps", "max_new_tokens", "top_p", "sft_lr", "sft_epochs", "sft_batch_size",
               "sft_per_device_batch_size", "model_max_length", "lora", "gpus", "deepspeed", "serving",
               "tensor_parallel_size", "max_model_len", "sft_data_sha256", "episode_protocol")
# Settings a rerun may change: they change speed, not results. Any other difference is another run.
SPEED_ONLY = ("num_workers", "explore_workers", "eval_workers", "worker_batch_size", "gpu_memory_utilization",
              "save_path", "restart", "save_steps", "keep_checkpoints", "gradient_checkpointing", "report_to")


class SettingsError(ValueError):
    """A setting that cannot be used; the message names where it came from."""


def knob(default: Any, group: str, doc: str, *, minimum: float | None = None, maximum: float | None = None,
         choices: tuple[str, ...] = ()) -> Any:
    """A field users set: flag --<name>, environment variable ETO_<NAME>, YAML key <name>."""
    meta = {"group": group, "help": doc, "minimum": minimum, "maximum": maximum, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class PipelineSettings:
    """A run: its positional arguments and run-level flags, then its knobs (the fields made with knob()). The run
    folder's settings.json is dataclasses.asdict of it; a rerun must match it except in SPEED_ONLY."""
    task: str
    exp_name: str
    model_path: str = ""
    save_path: str = "outputs"
    restart: bool = False
    task_path: list[str] = field(default_factory=list)

    method: str = knob("eto", "method", "eto (SFT, then explore -> pairs -> DPO), ipr (ETO plus step-level pairs), "
                       "rft (rejection-sampling fine-tuning), bon (best-of-K sampling of the SFT agent), online RL "
                       "after SFT: grpo, gigpo (GRPO with step-level credit), ppo; docs/methods.md", choices=METHODS)
    self_play: bool = knob(False, "method", "1 = eto without expert data: RFT on the base model's own successes, "
                           "then DPO on pairs of the agent's own samples (rule self)")
    samples_per_task: int = knob(0, "method", "K samples per task in exploration (and in the bon evaluation, and "
                                 "in each RL rollout: the GRPO group) (0 = the method's default: eto/ipr 1, "
                                 "bon/rft/self-play/grpo/gigpo/ppo 4)", minimum=0)
    temperature: float = knob(0.7, "method", "sampling temperature when K > 1 (and of the ipr and RL rollouts)",
                              minimum=0)
    top_p: float = knob(TOP_P, "method", "nucleus sampling of evaluation and exploration answers (none on greedy "
                        "ones)", minimum=0, maximum=1)
    rft_threshold: float = knob(1.0, "method", "rft/self-play keep explored trajectories with reward >= this")
    min_reward_gap: float = knob(0.0, "method", "self pairs: best - worst reward must exceed this")
    step_rollouts: int = knob(3, "method", "ipr: Monte-Carlo rollouts per step value", minimum=1)
    step_margin: float = knob(0.0, "method", "ipr: step pair when value(expert) - value(agent) > this")
    step_max_prefixes: int = knob(4, "method", "ipr: expert steps tried per task", minimum=1)
    step_weight: float = knob(1.0, "method", "ipr: weight of the step-level DPO loss; gigpo: weight of the step "
                              "advantage added to the episode advantage", minimum=0)
    sft_weight: float = knob(1.0, "method", "ipr: weight of the SFT loss on expert trajectories", minimum=0)

    rl_steps: int = knob(10, "online RL", "grpo/gigpo/ppo: steps of rollouts -> RL data -> policy update",
                         minimum=1)
    eval_every: int = knob(5, "online RL", "grpo/gigpo/ppo: evaluate the policy on the test split every N steps, "
                           "and after the last (0 = after the last only)", minimum=0)
    rl_tasks_per_step: int = knob(16, "online RL", "grpo/gigpo/ppo: train tasks per step, each played K times, "
                                  "spread over the task types, a new seeded batch each step, drawn from all train "
                                  "tasks (RL needs no expert trajectory; --train_tasks is not used) (0 = all)",
                                  minimum=0)
    rl_learning_rate: float = knob(1e-6, "online RL", "grpo/gigpo/ppo: learning rate of the policy update (one pass "
                                   "over the step's episodes, constant schedule)", minimum=0)
    rl_batch_size: int = knob(16, "online RL", "grpo/gigpo/ppo: episodes per optimizer step, all devices together "
                              "(accumulation derived as for SFT); K x tasks per step / this = optimizer steps per "
                              "update", minimum=1)
    rl_per_device_batch_size: int = knob(2, "online RL", "grpo/gigpo/ppo: episodes per device per forward pass",
                                         minimum=1)
    kl_coef: float = knob(0.04, "online RL", "grpo/gigpo/ppo: weight of the KL penalty to the SFT model", minimum=0)
    clip_range: float = knob(0.2, "online RL", "grpo/gigpo/ppo: PPO clip range of the probability ratio",
                             minimum=0)
    loss_aggregation: str = knob("token_mean", "online RL", "grpo/gigpo/ppo: the loss averages over all tokens of "
                                 "a batch (token_mean) or over each episode's tokens, then episodes "
                                 "(sequence_mean)", choices=("token_mean", "sequence_mean"))
    gamma: float = knob(-1.0, "online RL", "gigpo/ppo: discount of the step rewards in the returns, in [0, 1] (-1 = "
                        "the method's: " + ", ".join(f"{m} {g:g}" for m, g in DEFAULT_GAMMA.items()) + ")",
                        minimum=-1, maximum=1)

    from_run: str = knob("", "method", "start from another run's finished start: its SFT model (shared, not copied) "
                         "and its eval_sft (and eval_base) episodes; a run name under the same save_path or a run "
                         "folder. The settings that make the start (START_KNOBS) must equal that run's; docs/study.md")

    iterations: int = knob(3, "size of the loop", "exploration/DPO iterations", minimum=0)
    train_tasks: int = knob(0, "size of the loop", "explore a fixed subset of N train tasks, spread evenly over the "
                            "task types (0 = all)", minimum=0)
    test_tasks: int = knob(0, "size of the loop", "evaluate a fixed subset of N test tasks, spread evenly over the "
                           "task types (0 = all); the same tasks at every stage", minimum=0)
    sft_samples: int = knob(0, "size of the loop", "train on a fixed subset of N expert trajectories, spread evenly "
                            "over the task types (0 = all)", minimum=0)
    subset_seed: int = knob(0, "size of the loop", "seed of the fixed subsets")
    eval_base: bool = knob(False, "size of the loop", "1 = also evaluate the untuned starting model (stage eval_base)")

    max_steps: int = knob(0, "episodes", "episode step limit (0 = the task config's)", minimum=0)
    max_new_tokens: int = knob(MAX_NEW_TOKENS, "episodes", "tokens per model answer", minimum=1)
    explore_temperature: float = knob(0.0, "episodes", "exploration temperature when K = 1 (0 = greedy, as the "
                                      "original ran)", minimum=0)

    num_workers: int = knob(8, "serving", "concurrent episodes per evaluation/exploration", minimum=1)
    explore_workers: int = knob(0, "serving", "model worker processes serving exploration (0 = one per GPU group of "
                                "--gpus, else 1)", minimum=0)
    eval_workers: int = knob(0, "serving", "model worker processes serving evaluation (0 = as --explore_workers)",
                             minimum=0)
    worker_batch_size: int = knob(8, "serving", "sequences a model worker decodes together (and prompts whose KV "
                                  "cache it keeps); match it to --num_workers", minimum=1)
    serving: str = knob("hf", "serving", "model workers: hf (ours, transformers with batching) or vllm",
                        choices=SERVING_BACKENDS)
    tensor_parallel_size: int = knob(1, "serving", "vllm: GPUs per worker", minimum=1)
    gpu_memory_utilization: float = knob(0.9, "serving", "vllm: fraction of GPU memory", minimum=0, maximum=1)
    max_model_len: int = knob(0, "serving", "vllm: context length (0 = the model's)", minimum=0)

    sft_lr: float = knob(2e-5, "SFT", "SFT learning rate", minimum=0)
    sft_epochs: int = knob(3, "SFT", "SFT epochs", minimum=1)
    sft_batch_size: int = knob(64, "SFT", "SFT global batch size (sequences per optimizer step, all devices "
                               "together; accumulation = global // devices // per-device, as in the original)",
                               minimum=1)
    sft_per_device_batch_size: int = knob(4, "SFT", "SFT sequences per device per forward pass", minimum=1)

    dpo_lrs: list[float] = knob([1e-6, 5e-7], "DPO", "DPO learning rate per iteration (the last repeats)", minimum=0)
    dpo_betas: list[float] = knob([0.1, 0.5], "DPO", "DPO beta per iteration (the last repeats)", minimum=0)
    dpo_epochs: int = knob(3, "DPO", "DPO epochs per iteration", minimum=1)
    dpo_batch_size: int = knob(32, "DPO", "DPO global batch size in pairs (accumulation derived as for SFT)",
                               minimum=1)
    dpo_per_device_batch_size: int = knob(2, "DPO", "DPO pairs per device per forward pass", minimum=1)
    dpo_warmup_ratio: float = knob(0.1, "DPO", "DPO schedule: constant learning rate after this warmup fraction, "
                                   "as in the original", minimum=0, maximum=1)

    model_max_length: int = knob(4096, "training", "training sequence length", minimum=1)
    gradient_checkpointing: bool = knob(False, "training", "1 = trainers keep only each layer's input and recompute "
                                        "the rest in backward: same losses, ~1/3 of the activation memory (2 x 2,048 "
                                        "tokens of the default model: 2.8 GiB peak instead of 8.9 GiB), ~1.5x the "
                                        "time")
    save_steps: int = knob(100, "training", "trainers checkpoint every N optimizer steps; a rerun after a crash "
                           "continues from the last complete checkpoint (100: at most ~30 min lost on a 7B GPU run)",
                           minimum=1)
    keep_checkpoints: bool = knob(False, "training", "1 = keep the checkpoints of finished stages")
    lora: bool = knob(False, "training", "1 = train LoRA adapters (merged after each stage)")
    report_to: str = knob("none", "training", "training curves: tensorboard (<run>/tensorboard/) or wandb (offline "
                          "unless WANDB_MODE says otherwise; <run>/wandb/) get every trainer's losses and each "
                          "stage's evaluation metrics and cost, one run per pipeline run (pip install -e "
                          "'.[logging]'); docs/training.md", choices=REPORT_TO_CHOICES)

    gpus: str = knob("", "hardware", "GPU ids, e.g. 0,1,2,3 (empty = CPU or whatever is visible)")
    deepspeed: str = knob("", "hardware", "DeepSpeed config for multi-GPU training")

    sft_data: str = knob("", "data and tasks", "expert trajectories (default: the task config's expert_data.path)")


# the fields users set, in PipelineSettings' order, and the kind of value each takes
KNOBS = {f.name: f for f in dataclasses.fields(PipelineSettings) if "group" in f.metadata}
KINDS = typing.get_type_hints(PipelineSettings)
# what each kind of value looks like: in messages, in --help and in the knob table
FORMS = {int: "an integer", float: "a number", bool: "0 or 1", str: "text",
         list[float]: "numbers separated by spaces or commas"}
METAVARS = {int: "N", float: "X", bool: "{0,1}", list[float]: "'X X ...'"}
TYPE_NAMES = {int: "integer", float: "number", bool: "0 or 1", str: "text", list[float]: "numbers"}


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def presets() -> dict[str, Path]:
    """Preset name -> YAML file: a run named after a preset starts from its values."""
    return {p.stem: p for p in sorted(PRESET_DIR.glob("*.yaml"))}


# --- reading one value ---------------------------------------------------------------------------------------

def _finite(x: float) -> float:
    if not math.isfinite(x):
        raise ValueError(x)
    return x


def from_text(kind: Any, text: str) -> Any:
    """A value of `kind` from a flag's or an environment variable's text; ValueError when it is not one."""
    if kind is str:
        return text
    text = text.strip()
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(text)
    if kind is int:
        return int(text)
    if kind is float:
        return _finite(float(text))
    numbers = [_finite(float(x)) for x in text.replace(",", " ").split()]
    if not numbers:
        raise ValueError(text)
    return numbers


def from_yaml(kind: Any, value: Any) -> Any:
    """A value of `kind` from a YAML file: a value of that kind, or text as a flag takes it (YAML reads 1e-4 as
    text); ValueError otherwise."""
    if isinstance(value, str) and kind is not str:
        return from_text(kind, value)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is bool and (isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))):
        return bool(value)
    if kind is int and number and isinstance(value, int):
        return value
    if kind is float and number:
        return _finite(float(value))
    if kind is str and (isinstance(value, str) or (number and isinstance(value, int))):  # gpus: 0
        return str(value)
    if kind == list[float]:
        items = value if isinstance(value, list) else [value]
        if items and all(isinstance(x, (int, float, str)) and not isinstance(x, bool) for x in items):
            return [from_text(float, x) if isinstance(x, str) else _finite(float(x)) for x in items]
    raise ValueError(value)


def check_range(f: dataclasses.Field, value: Any, where: str) -> None:
    meta = f.metadata
    if meta["choices"] and value not in meta["choices"]:
        raise SettingsError(f"{where}: expected one of {', '.join(meta['choices'])}, got {value!r}")
    for x in value if isinstance(value, list) else [value]:
        if meta["minimum"] is not None and x < meta["minimum"]:
            raise SettingsError(f"{where}: must be >= {meta['minimum']}, got {x}")
        if meta["maximum"] is not None and x > meta["maximum"]:
            raise SettingsError(f"{where}: must be <= {meta['maximum']}, got {x}")


def read_value(name: str, raw: Any, where: str, from_file: bool = False) -> Any:
    """Knob `name`'s value from `raw` (text, or a YAML value when `from_file`), checked; SettingsError naming
    `where` otherwise."""
    kind = KINDS[name]
    try:
        value = from_yaml(kind, raw) if from_file else from_text(kind, raw)
    except (TypeError, ValueError):
        form = "a number or a list of numbers" if from_file and kind == list[float] else FORMS[kind]
        raise SettingsError(f"{where}: expected {form}, got {raw!r}") from None
    check_range(KNOBS[name], value, where)
    return value


# --- reading each source: knob name -> (value, where it came from) ---------------------------------------------

def read_yaml(path: Path, label: str) -> dict[str, tuple[Any, str]]:
    """The knob values of a YAML mapping (a preset or --config FILE); `label` is the file's name in messages."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SettingsError(f"{label}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise SettingsError(f"{label}: not valid YAML" + (f" (line {mark.line + 1})" if mark else "")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{label}: expected a mapping of knob names to values, got {type(data).__name__}")
    found = {}
    for key, raw in data.items():
        where = f"{label}:{key}"
        if key not in KNOBS:
            close = difflib.get_close_matches(str(key), KNOBS, n=1)
            raise SettingsError(f"{where}: not a knob" + (f" (did you mean {close[0]}?)" if close else "")
                                + "; the knobs: docs/knobs.md")
        found[key] = (read_value(key, raw, where, from_file=True), where)
    return found


_deprecation_warned: set[str] = set()


def read_environment(environ: Mapping[str, str], skip: typing.Container[str]) -> dict[str, tuple[Any, str]]:
    """ETO_<KNOB> for each knob not in `skip` (given as a flag). The bare <KNOB> of earlier releases is still read,
    with a warning, when ETO_<KNOB> is not set: a shell may set the bare names for something else."""
    found = {}
    for name in KNOBS:
        if name in skip:
            continue
        new, old = env_name(name), name.upper()
        if environ.get(new, "") != "":
            found[name] = (read_value(name, environ[new], new), new)
        elif environ.get(old, "") != "":
            found[name] = (read_value(name, environ[old], old), old)
            if old not in _deprecation_warned:
                _deprecation_warned.add(old)
                print(f"{PROG}: warning: the environment variable {old} is deprecated, set {new} instead ({old} "
                      "is no longer read from the next release on)", file=sys.stderr)
    return found


# --- the whole resolution ----------------------------------------------------------------------------------------

def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The command line, one flag per knob (help: its environment variable and its default)."""
    epilog = ("Each knob's value comes from, lowest to highest: its default < the preset named by exp_name\n"
              f"(scripts/pipeline/presets/<exp_name>.yaml) < --config FILE < its environment variable {ENV_PREFIX}<KNOB> "  # noqa: E501
              "< its flag.\nAll knobs in one table: docs/knobs.md.")
    p = argparse.ArgumentParser(prog=PROG, description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", help=f"task name ({describe_tasks()}; more with --task_path)")
    p.add_argument("exp_name", help=f"run name; a preset name ({', '.join(presets())}) starts from that preset's "
                                    "values (scripts/pipeline/presets/<name>.yaml)")
    p.add_argument("model_path", nargs="?", default="", help="base model folder (default, or '': the embedded model)")
    p.add_argument("save_path", nargs="?", default="outputs", help="root of all outputs (default: outputs)")
    p.add_argument("--restart", action="store_true",
                   help="delete <save_path>/<exp_name> first and start the run over (finished stages are lost)")
    p.add_argument("--task_path", action="append", default=[], metavar="DIR",
                   help=f"also find task configs in DIR (repeatable; before ${TASK_PATH_ENV}'s folders)")
    p.add_argument("--config", metavar="FILE", help="YAML file of knob values, keys as the flags without '--' (copy "
                                                    "a preset from scripts/pipeline/presets/ to start one)")
    groups: dict[str, Any] = {}
    for name, f in KNOBS.items():
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        text = f"{f.metadata['help']} [{env_name(name)}; default {shown(default_of(f))}]".replace("%", "%%")
        groups[group].add_argument(f"--{name}", default=None, metavar=metavar(name), help=text)
    return p


def resolve(argv: list[str] | None = None, environ: Mapping[str, str] | None = None,
            description: str | None = None) -> PipelineSettings:
    """The settings of the command line `argv` with `environ` (default os.environ); SettingsError naming the source
    of a value that cannot be used (argparse itself exits on a malformed command line)."""
    args = build_parser(description).parse_args(argv)
    flags = {name: (read_value(name, getattr(args, name), f"--{name}"), f"--{name}")
             for name in KNOBS if getattr(args, name) is not None}
    chosen: dict[str, tuple[Any, str]] = {}
    if args.exp_name in presets():
        preset = presets()[args.exp_name]
        chosen.update(read_yaml(preset, str(preset.relative_to(REPO))))
    if args.config:
        if not Path(args.config).is_file():
            raise SettingsError(f"--config {args.config}: no such file")
        chosen.update(read_yaml(Path(args.config), args.config))
    chosen.update(read_environment(os.environ if environ is None else environ, skip=flags))
    chosen.update(flags)
    settings = PipelineSettings(task=args.task, exp_name=args.exp_name, model_path=args.model_path,
                                save_path=args.save_path, restart=args.restart, task_path=args.task_path,
                                **{name: value for name, (value, _) in chosen.items()})

    def source(name: str) -> str:
        return chosen[name][1] if name in chosen else f"--{name}"

    if settings.gamma != -1 and settings.gamma < 0:
        raise SettingsError(f"{source('gamma')}: must be in [0, 1] (or -1: the method's), got {settings.gamma}")
    if METHODS.get(settings.method).rl_algorithm and settings.temperature == 0:
        raise SettingsError(f"{source('temperature')}: --method {settings.method} learns from sampled rollouts and "
                            "their log-probabilities; greedy rollouts (temperature 0) have none")
    if settings.from_run and settings.self_play:
        raise SettingsError(f"{source('from_run')}: a self-play run makes its own start from the base model's "
                            "explorations; --from_run reuses an SFT start, so give one or the other")
    if settings.self_play and settings.method not in self_play_methods():
        raise SettingsError(f"{source('self_play')}: self-play goes with --method {' or '.join(self_play_methods())}, "
                            f"got {settings.method!r} "
                            f"from {source('method')}")
    try:
        cfg = load_task_config(args.task, args.task_path)
    except ConfigError as e:
        raise SettingsError(str(e)) from None
    return derive(settings, cfg, source)


def derive(s: PipelineSettings, cfg: TaskConfig, source: typing.Callable[[str], str]) -> PipelineSettings:
    """The values the pipeline computes from the user's, in one place: K and gamma from the method, the worker counts
    from the GPU groups, the default model, the task config's expert data, and absolute paths (stages run from the
    repository root). `source(name)` says where a knob's value came from, for messages."""
    gpus = [g.strip() for g in s.gpus.split(",") if g.strip()]
    per_worker = SERVING_BACKENDS.get(s.serving).gpus_per_worker({"tensor_parallel_size": s.tensor_parallel_size})
    groups = len(gpu_groups(gpus, per_worker))
    if gpus and not groups:
        raise SettingsError(f"{source('tensor_parallel_size')}: {per_worker} GPUs per {s.serving} worker need "
                            f"at least that many GPUs, got {s.gpus!r} from {source('gpus')}")
    sft_data = s.sft_data
    if not sft_data and not s.self_play:
        if cfg.expert_data is None:
            raise SettingsError(f"{cfg.path}: no field 'expert_data' (path and build); give --sft_data")
        sft_data = str(cfg.expert_data_path())
    model_path = s.model_path or str(default_model_path())
    explore_workers = s.explore_workers or max(1, groups)
    gamma = DEFAULT_GAMMA.get(s.method, s.gamma) if s.gamma == -1 else s.gamma
    derived = {"samples_per_task": s.samples_per_task or default_samples_per_task(s.method, s.self_play),
               "gamma": gamma,
               "explore_workers": explore_workers, "eval_workers": s.eval_workers or explore_workers,
               "model_path": model_path, "sft_data": sft_data, "deepspeed": s.deepspeed}
    for name in ("model_path", "sft_data", "deepspeed"):
        if derived[name] and Path(derived[name]).exists():
            derived[name] = str(Path(derived[name]).resolve())
    if s.from_run:
        derived["from_run"] = str(parent_run_dir(s, source("from_run")))
    return dataclasses.replace(s, **derived)


def parent_run_dir(s: PipelineSettings, where: str) -> Path:
    """--from_run's run folder: a run name under save_path, or a folder; it must hold a run that is not this one."""
    given = Path(s.from_run)
    folder = (given if len(given.parts) > 1 or given.is_absolute() else Path(s.save_path) / given).resolve()
    if not RunLayout(folder).settings.is_file():
        raise SettingsError(f"{where}: {folder} holds no run (no settings.json); give a run name under "
                            f"{s.save_path} or a run folder")
    if folder == (Path(s.save_path) / s.exp_name).resolve():
        raise SettingsError(f"{where}: a run cannot start from itself")
    return folder


def parse_args(argv: list[str] | None = None, description: str | None = None) -> PipelineSettings:
    """resolve(), a value that cannot be used reported as one line on stderr with exit status 2 (no traceback)."""
    try:
        return resolve(argv, description=description)
    except SettingsError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def accumulation_steps(global_batch: int, per_device: int, world_size: int) -> int:
    """The original's rule (bash integer division): global / world / per-device, at least 1."""
    return max(1, global_batch // world_size // per_device)


# --- the knob table (docs/knobs.md) -----------------------------------------------------------------------------

def shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, list):
        return " ".join(f"{x:g}" for x in value)
    return '""' if value == "" else str(value)


def metavar(name: str) -> str:
    choices = KNOBS[name].metadata["choices"]
    return "{" + ",".join(choices) + "}" if choices else METAVARS.get(KINDS[name], name.upper())


def form_of(name: str) -> str:
    """The knob's type as the table shows it: kind, choices, range."""
    meta = KNOBS[name].metadata
    if meta["choices"]:
        return "one of " + ", ".join(meta["choices"])
    text = TYPE_NAMES[KINDS[name]]
    low, high = meta["minimum"], meta["maximum"]
    if low is not None and high is not None:
        return f"{text} in [{low}, {high}]"
    return f"{text} >= {low}" if low is not None else text


def markdown_table() -> str:
    """docs/knobs.md: every knob with its group, flag, environment variable, type, default and help."""
    lines = ["# Pipeline knobs", "",
             "Generated from `PipelineSettings` in [scripts/pipeline/settings.py](../scripts/pipeline/settings.py) by "
             "`python -m scripts.pipeline.settings --markdown > docs/knobs.md`; a test fails when this file is out "
             "of date.", "",
             "A knob's value comes from, lowest to highest: its default < the preset named by the run's `exp_name` "
             "([scripts/pipeline/presets/](../scripts/pipeline/presets/)) < a YAML file given with `--config FILE` "
             "(keys: the knob names) < its environment variable < its flag. The environment variables of earlier "
             "releases without the `ETO_` prefix are still read, with a warning, when the `ETO_` one is not set. "
             "The run's positional arguments and `--restart`, `--task_path`, `--config`: [pipeline.md](pipeline.md).",
             "", "| group | flag | environment variable | type | default | help |", "|---|---|---|---|---|---|"]
    for name, f in KNOBS.items():
        cells = [f.metadata["group"], f"`--{name}`", f"`{env_name(name)}`", form_of(name), f"`{shown(default_of(f))}`",
                 f.metadata["help"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """python -m scripts.pipeline.settings --markdown > docs/knobs.md"""
    p = argparse.ArgumentParser(prog="python -m scripts.pipeline.settings", description=main.__doc__)
    p.add_argument("--markdown", action="store_true", required=True, help="print the knob table (docs/knobs.md)")
    p.parse_args(argv)
    sys.stdout.write(markdown_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
