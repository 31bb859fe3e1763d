"""Training throughput against this machine's compute limit, padding and peak memory: SFT and DPO, padded
(the original computation, --no_padding_free) and padding-free with the supervised-only head (the default).

    python -m bench.bench_train                    # default model, ScienceWorld expert trajectories
    python -m bench.bench_train --runs sft_packed dpo_packed --samples 4
    python -m bench.bench_train --bf16 --runs sft_packed dpo_packed sft_packed_zero2   # on a GPU

Each run is `python -m fastchat.train.train[_dpo]` in its own process (so its peak RSS is its own) on the first
--samples records of --data in file order (`--train_sampling_strategy sequential`: every setting sees the same
batches; the default 8 records include a 2 x 2,048-token batch). DPO pairs are built from the same records: the
prompt and expert trajectory of record i as chosen, the trajectory of record i+1 as rejected. Right before each run
bench/roofline.py measures the fp32 matmul throughput in this process, and the run's training tokens/s (real
tokens, padding not counted) is reported as a fraction of the compute limit: 6 FLOP per parameter per token at the
highest matmul throughput measured during the benchmark (once more after the last run; other load can only lower
a measurement). On a shared machine other load slows every run, so each is also reported by CPU time: tokens per
second of the run's CPU time divided by --threads (the rate it would have with the cores to itself, if its threads
scale). Each run's matmul FLOPs (bench/roofline.py `training_flops`: the work actually done, with padding and the
head's positions) over its time and the measured throughput give its matmul utilization: what the kernels reach.
The load average before and after each run is recorded. Writes bench/results/train.json (after every run, so a
partial run keeps what it measured).

On a GPU the trainers run there (their default) and the limits are measured there; with --bf16 the trainers get
--bf16 and the limits are measured in bf16 (on CPU the trainers switch bf16 off, and the limits stay fp32). Peak
CUDA memory is recorded where there is a GPU. `sft_packed_zero2` is `sft_packed` under DeepSpeed ZeRO-2
(fastchat/train/configs/zero2.json), launched by torchrun with one process: it needs DeepSpeed and a CUDA GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import roofline
from fastchat.records import PROMPT_TURNS, pair_record, trajectory, write_json_atomic

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RUNS = {  # name: (trainer module, flags)
    "sft_padded": ("fastchat.train.train", ["--no_padding_free"]),
    "sft_packed": ("fastchat.train.train", []),
    "sft_packed_checkpointing": ("fastchat.train.train", ["--gradient_checkpointing"]),
    "dpo_padded": ("fastchat.train.train_dpo", ["--no_padding_free", "--precompute_ref_logps"]),
    "dpo_packed": ("fastchat.train.train_dpo", ["--precompute_ref_logps"]),
    "sft_packed_zero2": ("fastchat.train.train", ["--deepspeed", str(ROOT / "fastchat/train/configs/zero2.json")]),
}


def dpo_pairs(records: list[dict]) -> list[dict]:
    return [pair_record(f"bench-{i}", "trajectory", r["conversations"][:PROMPT_TURNS], trajectory(r["conversations"]),
                        trajectory(records[(i + 1) % len(records)]["conversations"]))
            for i, r in enumerate(records)]


def device_and_dtype(bf16: bool) -> tuple:
    """Where the trainers run (the GPU where there is one) and the dtype of their matmuls."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, torch.bfloat16 if bf16 and device == "cuda" else torch.float32


def launcher(flags: list[str]) -> list[str]:
    """`python` for a plain run; torchrun with one process on a free port for DeepSpeed."""
    if "--deepspeed" not in flags:
        return [sys.executable]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(port)]


def run(name: str, model: str, data: Path, out: Path, args) -> dict:
    module, flags = RUNS[name]
    limits = roofline.measure(args.threads, model, *device_and_dtype(args.bf16))  # right before the run
    cmd = [*launcher(flags), "-m", module, "--model_name_or_path", model, "--data_path", str(data),
           "--output_dir", str(out), "--per_device_train_batch_size",
           str(args.dpo_batch if name.startswith("dpo") else args.batch),
           "--model_max_length", str(args.max_length), "--num_train_epochs", "1", "--learning_rate", "1e-5",
           "--train_sampling_strategy", "sequential", "--logging_steps", "1", "--disable_tqdm", "true",
           "--seed", "0", *flags, *(["--bf16"] if args.bf16 else [])]
    load_before = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    s = json.loads((out / "train_summary.json").read_text())
    shown = " ".join(cmd[1:]).replace(str(out), "OUT").replace(str(data), "DATA").replace(model, "MODEL")
    log = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {
        "run": name, "command": shown, "padding_free": s["padding_free"],
        "real_tokens": s["real_tokens"], "computed_tokens": s["computed_tokens"],
        "padding_fraction": round(s["padding_fraction"], 4), "head_positions": s["head_positions"],
        "attention_pairs": s["attention_pairs"], "matmul_gflop": round(roofline.training_flops(args.size, s) / 1e9, 1),
        "train_s": round(s["train_runtime_s"], 1),
        "precompute_s": round(s.get("precompute_s", 0.0), 1), "wall_s": round(wall, 1),
        "tokens_per_s": round(s["real_tokens"] / s["train_runtime_s"], 1), "train_cpu_s": round(s["train_cpu_s"], 1),
        "cpu_tokens_per_s": round(s["real_tokens"] / (s["train_cpu_s"] / args.threads), 1),
        "peak_rss_mib": round(s["peak_rss_mib"]),
        **({"peak_cuda_mib": round(s["peak_cuda_mib"])} if s.get("peak_cuda_mib") else {}),
        "step_losses": [round(h["loss"], 5) for h in log if "loss" in h],
        "roofline": limits, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }


def add_limit(result: dict) -> None:
    """Each run's tokens/s as a fraction of the compute limit at the best matmul throughput measured so far."""
    measured = [r["roofline"] for r in result["runs"]] + [result.get("roofline_after")]
    best = max((m for m in measured if m), key=lambda m: m["matmul_gflops"])
    result["limit"] = {"matmul_gflops": best["matmul_gflops"], "memory_gbs": best["memory_gbs"],
                       "train_tokens_per_s": round(roofline.train_limit(best), 1)}
    for r in result["runs"]:
        r["fraction_of_limit"] = round(r["tokens_per_s"] / result["limit"]["train_tokens_per_s"], 3)
        r["cpu_fraction_of_limit"] = round(r["cpu_tokens_per_s"] / result["limit"]["train_tokens_per_s"], 3)
        r["matmul_utilization"] = round(r["matmul_gflop"] / r["train_s"] / best["matmul_gflops"], 3)


def table(rows: list[dict]) -> str:
    lines = [f"{'run':<26}{'tokens':>8}{'padding':>9}{'tok/s':>8}{'of limit':>10}{'by CPU time':>12}{'of limit':>10}"
             f"{'matmul use':>11}{'peak RSS MiB':>14}{'load':>6}"]
    for r in rows:
        lines.append(f"{r['run']:<26}{r['real_tokens']:>8}{r['padding_fraction']:>9.1%}{r['tokens_per_s']:>8.1f}"
                     f"{r['fraction_of_limit']:>10.1%}{r['cpu_tokens_per_s']:>12.1f}{r['cpu_fraction_of_limit']:>10.1%}"
                     f"{r['matmul_utilization']:>11.1%}"
                     f"{r['peak_rss_mib']:>14}{r['loadavg_before'][0]:>6.1f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the embedded default model)")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "sciworld_study_sft.json")
    p.add_argument("--samples", type=int, default=8, help="SFT records (DPO: pairs) used, in file order")
    p.add_argument("--batch", type=int, default=2, help="SFT sequences per step")
    p.add_argument("--dpo_batch", type=int, default=1, help="DPO pairs per step (2 sequences each)")
    p.add_argument("--max_length", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=[r for r in RUNS if r != "sft_packed_zero2"])
    p.add_argument("--bf16", action="store_true", help="train in bf16 (where CUDA supports it)")
    p.add_argument("--out", type=Path, default=RESULTS / "train.json")
    args = p.parse_args()
    if args.model is None:
        from fastchat.constants import default_model_path

        args.model = str(default_model_path())

    records = json.loads(args.data.read_text())[:args.samples]
    data = args.data.resolve()
    shown_data = data.relative_to(ROOT) if data.is_relative_to(ROOT) else data.name
    result = {"model": Path(args.model).name, "data": str(shown_data),
              "args": {k: v for k, v in vars(args).items() if k not in ("model", "data", "out")}, "runs": []}
    args.size = roofline.model_size(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sft, dpo = tmp / "sft.json", tmp / "pairs.json"
        write_json_atomic(sft, records, indent=None)
        write_json_atomic(dpo, dpo_pairs(records), indent=None)
        for name in args.runs:
            result["runs"].append(run(name, args.model, dpo if name.startswith("dpo") else sft, tmp / name, args))
            add_limit(result)
            print(table(result["runs"][-1:]).splitlines()[-1], flush=True)
            write_json_atomic(args.out, result, indent=2)
    result["roofline_after"] = roofline.measure(args.threads, args.model, *device_and_dtype(args.bf16))
    add_limit(result)
    write_json_atomic(args.out, result, indent=2)
    print(table(result["runs"]))
    print(f"compute limit: {result['limit']['train_tokens_per_s']} tokens/s "
          f"({result['limit']['matmul_gflops']} GFLOP/s fp32 matmul, best of the run); written to {args.out}")


if __name__ == "__main__":
    main()
