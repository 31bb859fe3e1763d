"""Where a decode step's time goes: the batching engine in process, on the serving benchmark's prompts.

    python -m bench.profile_serving [--model-path P] [--concurrency 8] [--new-tokens 64] [--num-threads 2] \
        [--no-prepack]

Runs `--concurrency` greedy requests together through the engine (no HTTP) twice: once timing every engine
phase (prefill passes, decode step, the model's forward passes, sampling/stopping, batch bookkeeping), once under
torch.profiler for the decode steps' operators by self CPU time; what a step spends outside operators is
Python and dispatch overhead. Writes bench/results/serving_profile.json.
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.bench_serving import agent_prompts
from fastchat.constants import default_model_path
from fastchat.records import write_json_atomic
from fastchat.serve.model_worker import TransformersBackend

REPO = Path(__file__).resolve().parent.parent


def wrap(obj, name: str, around) -> None:
    """Replace obj.name by a function that calls `around(original, *args)`."""
    fn = getattr(obj, name)
    setattr(obj, name, lambda *args, **kwargs: around(fn, *args, **kwargs))


def timer(totals: dict, name: str):
    def around(fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name][0] += time.perf_counter() - start
            totals[name][1] += 1
    return around


def op_profiler(ops: dict, wall: list):
    """Profile each call (in the engine's thread, where torch.profiler must run) and add up operator self times."""
    def around(fn, *args, **kwargs):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            wall[0] += time.perf_counter() - start
        for e in prof.key_averages():
            ops[e.key] += e.self_cpu_time_total / 1e6
        return out
    return around


def run(engine, prompts: list[str], new_tokens: int) -> float:
    def one(prompt):
        for _ in engine.generate_stream({"prompt": prompt, "temperature": 0, "max_new_tokens": new_tokens,
                                         "echo": False, "ignore_eos": True}):
            pass

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=300)
    p.add_argument("--num-threads", type=int, default=2)
    p.add_argument("--no-prepack", action="store_true", help="nn.Linear's own GEMM (see fastchat.serve.prepack)")
    p.add_argument("--out", default=str(REPO / "bench/results/serving_profile.json"))
    a = p.parse_args()
    torch.set_num_threads(a.num_threads)
    model_path = Path(a.model_path) if a.model_path else default_model_path()
    engine = TransformersBackend(model_path, max_batch_size=a.concurrency,
                                 **({"prepack": False} if a.no_prepack else {})).engine
    prompts = agent_prompts(model_path, a.concurrency, a.prompt_tokens)
    run(engine, prompts[:1], 4)  # warm up and cache the shared prefix, as the benchmark's warm-up does

    totals: dict = defaultdict(lambda: [0.0, 0])
    for name in ("_prefill", "_decode_step", "_advance", "_drop_finished", "model"):
        wrap(engine, name, timer(totals, name))
    before = dict(engine.stats)
    wall = run(engine, prompts, a.new_tokens)
    steps = engine.stats["decode_steps"] - before["decode_steps"]
    tokens = a.concurrency * a.new_tokens
    phases = {k: {"seconds": round(v[0], 3), "calls": v[1], "ms_per_call": round(1000 * v[0] / max(v[1], 1), 2)}
              for k, v in totals.items()}
    print(f"{a.concurrency} requests x {a.new_tokens} tokens: {wall:.2f} s, {tokens / wall:.1f} tok/s, "
          f"{steps} decode steps, {phases['_decode_step']['ms_per_call']} ms/step")
    for k, v in phases.items():
        print(f"  {k:>14}: {v}")

    ops: dict = defaultdict(float)
    profiled = [0.0]
    wrap(engine, "_decode_step", op_profiler(ops, profiled))
    before = engine.stats["decode_steps"]
    run(engine, prompts, a.new_tokens)
    engine.close()
    n = engine.stats["decode_steps"] - before
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:15]
    in_ops = sum(ops.values())
    per_step = {k: round(1000 * v / n, 2) for k, v in top}
    overhead = round(1000 * (profiled[0] - in_ops) / n, 2)
    print(f"profiled decode steps: {1000 * profiled[0] / n:.1f} ms/step (profiler on), of which outside operators "
          f"(Python, dispatch) {overhead} ms; top operators, self CPU ms per step:")
    for k, v in per_step.items():
        print(f"  {v:8.2f}  {k}")
    out = Path(a.out)
    write_json_atomic(out, {
        "model": model_path.name, "num_threads": a.num_threads, "concurrency": a.concurrency,
        "new_tokens": a.new_tokens, "seconds": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
        "decode_steps": steps, "phases": phases, "profiled_ms_per_step": round(1000 * profiled[0] / n, 2),
        "outside_operators_ms_per_step": overhead, "top_operators_self_cpu_ms_per_step": per_step,
        "load_average": os.getloadavg()}, indent=2)
    print(f"written {out}")


if __name__ == "__main__":
    main()
