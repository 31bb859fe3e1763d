"""Where SFT training time goes: operators of a few real training steps, grouped into matmuls, attention,
the optimizer and the rest (elementwise work: norms, rotary, activations, residual adds, log-softmax, copies).

    python -m bench.profile_train [--model DIR] [--samples 4 --batch 2 --max_length 2048] [--threads 2] [--steps 2]

Runs `python -m fastchat.train.train` in this process (default flags: padding-free batches and the
supervised-only head; pass trainer flags after `--`, e.g. `-- --no_padding_free`) under torch.profiler, on the
first --samples records of --data in file order, and adds up each operator's self CPU time over the profiled
steps (the first step, which allocates, is left out). Writes bench/results/train_profile.json.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from transformers import TrainerCallback

from fastchat.records import write_json_atomic

ROOT = Path(__file__).resolve().parent.parent

GROUPS = {  # operator name fragments -> group, first match wins
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn"),
    "attention": ("scaled_dot_product", "flash_attention"),
    "optimizer": ("_foreach", "adam", "clip_grad"),
}


def group_of(op: str) -> str:
    return next((g for g, keys in GROUPS.items() if any(k in op for k in keys)), "elementwise and other")


class ProfileSteps(TrainerCallback):
    """Starts the profiler after the first (warm-up) step and stops it at the end of training."""

    def __init__(self):
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.prof.__enter__()
        else:
            self.steps += 1

    def on_train_end(self, args, state, control, **kwargs):
        self.prof.__exit__(None, None, None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the embedded default model)")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "sciworld_study_sft.json")
    p.add_argument("--samples", type=int, default=6)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--max_length", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_profile.json")
    p.add_argument("trainer_flags", nargs="*", help="extra flags for fastchat.train.train (after --)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from fastchat.constants import default_model_path
    from fastchat.train import train

    model = a.model or str(default_model_path())
    callback = ProfileSteps()
    original = train.Trainer.__init__

    def with_callback(self, *args, **kwargs):  # the trainer main() builds, with our callback
        original(self, *args, **kwargs)
        self.add_callback(callback)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "sft.json"
        write_json_atomic(data, json.loads(a.data.read_text())[:a.samples], indent=None)
        train.Trainer.__init__ = with_callback
        try:
            train.main(["--model_name_or_path", model, "--data_path", str(data), "--output_dir", f"{tmp}/out",
                        "--per_device_train_batch_size", str(a.batch), "--model_max_length", str(a.max_length),
                        "--num_train_epochs", "1", "--learning_rate", "1e-5", "--train_sampling_strategy",
                        "sequential", "--logging_steps", "1", "--disable_tqdm", "true", "--save_strategy", "no",
                        *a.trainer_flags])
        finally:
            train.Trainer.__init__ = original
    ops: dict[str, float] = defaultdict(float)
    for e in callback.prof.key_averages():
        ops[e.key] += e.self_cpu_time_total / 1e6
    total = sum(ops.values())
    groups: dict[str, float] = defaultdict(float)
    for op, seconds in ops.items():
        groups[group_of(op)] += seconds
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:15]
    print(f"{callback.steps} profiled steps, {total:.1f} s in operators (self CPU time)")
    for g, seconds in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {g:<22} {seconds:7.1f} s  {seconds / total:6.1%}")
    print("top operators:")
    for op, seconds in top:
        print(f"  {seconds:7.2f} s  {op}")
    write_json_atomic(a.out, {
        "model": Path(model).name, "samples": a.samples, "batch": a.batch, "max_length": a.max_length,
        "threads": a.threads, "trainer_flags": a.trainer_flags, "profiled_steps": callback.steps,
        "operator_seconds": round(total, 2),
        "groups": {g: {"seconds": round(s, 2), "fraction": round(s / total, 3)} for g, s in groups.items()},
        "top_operators_seconds": {op: round(s, 2) for op, s in top}, "load_average": os.getloadavg()}, indent=2)
    print(f"written {a.out}")


if __name__ == "__main__":
    main()
