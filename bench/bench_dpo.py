"""DPO training throughput and peak memory, with and without --precompute_ref_logps, side by side.

    python -m bench.bench_dpo                       # tiny random model built locally
    python -m bench.bench_dpo --model models/SmolLM2-135M-Instruct --pairs 32 --max_length 512

Each setting runs `python -m fastchat.train.train_dpo` in its own process on the same synthetic
multi-turn pairs (so peak RSS is that run's alone) and reads its train_summary.json. Reports
training tokens/s (chosen + rejected tokens per epoch x epochs / train time), end-to-end tokens/s
(including the reference pass), peak RSS and, on GPU, peak CUDA memory allocated. Prints a table
and writes bench/results/bench_dpo.json.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from fastchat.records import pair_record, record_turns, write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def synthetic_pairs(n: int, steps: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    objects = ["mug", "apple", "key", "book", "lamp", "pan", "towel", "box"]
    places = ["table", "drawer", "cabinet", "shelf", "sofa", "desk"]

    def traj(k: int) -> list[dict]:
        turns = []
        for i in range(k):
            place = f"{rng.choice(places)} {rng.randint(1, 5)}"
            turns.append({"from": "gpt", "value": f"Thought: the {rng.choice(objects)} may be on the {place}.\n"
                                                  f"Action: go to {place}"})
            seen = ", ".join(f"a {rng.choice(objects)} {rng.randint(1, 3)}" for _ in range(3))
            turns.append({"from": "human", "value": f"Observation: On the {place}, you see {seen}."})
        return turns[:-1]

    pairs = []
    for i in range(n):
        prompt = record_turns("Interact with a household to solve a task. " * 4,
                              f"Your task is to: put a {rng.choice(objects)} on the desk.")
        pairs.append(pair_record(f"bench-{i}", "trajectory", prompt, traj(steps), traj(steps + 2)))
    return pairs


def run_setting(model: str, data: Path, out: Path, args, precompute: bool) -> dict:
    cmd = [sys.executable, "-m", "fastchat.train.train_dpo", "--model_name_or_path", model, "--data_path", str(data),
           "--output_dir", str(out), "--num_train_epochs", str(args.epochs),
           "--per_device_train_batch_size", str(args.batch), "--model_max_length", str(args.max_length),
           "--learning_rate", "1e-5", "--logging_steps", "1000", "--disable_tqdm", "true", "--seed", "0"]
    if precompute:
        cmd.append("--precompute_ref_logps")
    if args.bf16:
        cmd.append("--bf16")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"train_dpo failed:\n{proc.stderr[-3000:]}")
    s = json.loads((out / "train_summary.json").read_text())
    tokens = s["tokens_per_epoch"] * s["epochs"]
    return {
        "precompute_ref_logps": precompute, "pairs": s["pairs"], "tokens": tokens,
        "train_s": s["train_runtime_s"], "precompute_s": s["precompute_s"],
        "train_tokens_per_s": tokens / s["train_runtime_s"],
        "end_to_end_tokens_per_s": tokens / (s["train_runtime_s"] + s["precompute_s"]),
        "peak_rss_mib": s["peak_rss_mib"], "peak_cuda_mib": s.get("peak_cuda_mib"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder (default: a tiny random model built here)")
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--steps", type=int, default=4, help="actions in a chosen trajectory (rejected: +2)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_dpo.json")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            from eval_agent.prompt import PROMPT_DIR
            from fastchat.model.tiny import build_tiny_model

            model = str(build_tiny_model(tmp / "tiny", corpus_dirs=[PROMPT_DIR]))
        data = tmp / "pairs.json"
        write_json_atomic(data, synthetic_pairs(args.pairs, args.steps), indent=None)
        rows = [run_setting(model, data, tmp / f"out{i}", args, precompute) for i, precompute in
                enumerate((False, True))]

    header = f"{'setting':<22}{'train tok/s':>12}{'e2e tok/s':>11}{'ref pass s':>11}{'peak RSS MiB':>14}{'peak CUDA MiB':>15}"  # noqa: E501
    print(f"model: {model}  pairs: {args.pairs}  tokens/epoch: {rows[0]['tokens'] / args.epochs:.0f}")
    print(header)
    for r in rows:
        name = "precomputed reference" if r["precompute_ref_logps"] else "live reference model"
        cuda = f"{r['peak_cuda_mib']:.0f}" if r["peak_cuda_mib"] is not None else "-"
        print(f"{name:<22}{r['train_tokens_per_s']:>12.0f}{r['end_to_end_tokens_per_s']:>11.0f}"
              f"{r['precompute_s']:>11.1f}{r['peak_rss_mib']:>14.0f}{cuda:>15}")
    live, pre = rows
    print(f"precomputed / live: train tokens/s x{pre['train_tokens_per_s'] / live['train_tokens_per_s']:.2f}, "
          f"end-to-end x{pre['end_to_end_tokens_per_s'] / live['end_to_end_tokens_per_s']:.2f}, "
          f"peak RSS x{pre['peak_rss_mib'] / live['peak_rss_mib']:.2f}")
    write_json_atomic(args.out, {"model": model, "args": {k: str(v) for k, v in vars(args).items()},
                                 "results": rows}, indent=2)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
