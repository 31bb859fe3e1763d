"""Serving throughput: continuous batching vs one request at a time, side by side in one run.

    python -m bench.bench_serving [--model-path models/SmolLM2-135M-Instruct] [--concurrency 1 4 8] \
        [--new-tokens 64] [--prompt-tokens 300] [--rounds 1] [--num-threads 1] [--episodes 0] \
        [--max-batch-size 8] [--via-api]

Starts a controller and two copies of the same model worker on loopback: one
batching (--max-batch-size, default 8), one with --no-batching. With --via-api the
requests go through an OpenAI API server in front of the controller
(POST /v1/completions, greedy, max_tokens = --new-tokens; an answer may end early at
the end-of-sequence token) instead of to the controller's stream endpoint. For each concurrency c,
c clients each send `rounds` agent-like requests (an instruction and an
in-context example of about --prompt-tokens tokens, a distinct task at the
end, greedy, exactly --new-tokens new tokens) through the controller, first to
one worker then to the other, and generated tokens/s are compared. Greedy
outputs of the two workers are also compared (they must be identical).
With --episodes N it also runs N short ALFWorld episodes through
`eval_agent.main` at each concurrency and reports episodes per hour.
First it measures this machine's memory bandwidth and matmul throughput
(bench/roofline.py) and reports each tokens/s as a fraction of the decode limit
they allow (batch c for the batching worker, 1 for the other: weights read once
per step). On a GPU the workers run on it (their default device) and the limits are
measured there in the workers' dtype (bf16 where supported). Prints a table and
writes bench/results/serving.json.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from bench import roofline
from eval_agent.prompt import PROMPT_DIR
from fastchat.constants import default_model_path
from fastchat.conversation import render, template_for_model
from fastchat.records import OK_REPLY, write_json_atomic

REPO = Path(__file__).resolve().parent.parent

MODES = ("batched", "one-at-a-time")


def mode_flags(mode: str, max_batch: int) -> list[str]:
    return ["--max-batch-size", str(max_batch)] if mode == "batched" else ["--no-batching"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{what} not ready after {timeout}s")


def agent_prompts(model_path: Path, n: int, prompt_tokens: int) -> list[str]:
    """ALFWorld-style prompts: our instruction and in-context example, cut to about `prompt_tokens` tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    template = template_for_model(model_path, tokenizer=tok)
    instruction = (PROMPT_DIR / "instructions" / "alfworld.txt").read_text()
    example = json.loads((PROMPT_DIR / "icl_examples" / "alfworld.json").read_text())
    example_text = "\n".join(m["content"] for m in (example[0] if isinstance(example[0], list) else example))
    context = tok.decode(tok(instruction + "\n" + example_text).input_ids[:prompt_tokens])
    objects = ["apple", "mug", "book", "knife", "pen", "bowl", "towel", "egg", "key", "cd"]
    return [render(template, [{"role": "user", "content": context}, {"role": "assistant", "content": OK_REPLY},
                              {"role": "user", "content": f"You are in the middle of a room {i}. Your task is "
                                                          f"to: put a clean {objects[i % 10]} in shelf {i}."}],
                   add_generation_prompt=True).text for i in range(n)]


def run_level(controller: str, model: str, prompts: list[str], new_tokens: int,
              clients: int, api: str | None = None) -> tuple[float, int, list[str]]:
    """`clients` concurrent clients share the prompts; each sends its next request when its last one has ended.
    With `api` (an OpenAI API server's address) each request is a greedy POST /v1/completions there."""
    def one_api(prompt: str) -> dict:
        r = requests.post(api + "/v1/completions", timeout=3600, json={
            "model": model, "prompt": prompt, "temperature": 0.0, "max_tokens": new_tokens})
        out = r.json()
        if r.status_code != 200 or "choices" not in out:
            raise RuntimeError(f"generation failed: HTTP {r.status_code} {out}")
        return {"text": out["choices"][0]["text"], "usage": out["usage"]}

    def one(prompt: str) -> dict:
        if api:
            return one_api(prompt)
        r = requests.post(controller + "/worker_generate_stream", stream=True, timeout=3600, json={
            "model": model, "prompt": prompt, "temperature": 0.0, "max_new_tokens": new_tokens, "echo": False,
            "ignore_eos": True})
        last = None
        for chunk in r.iter_lines(delimiter=b"\0"):
            if chunk:
                last = json.loads(chunk)
        if last is None or last["error_code"]:
            raise RuntimeError(f"generation failed: {last}")
        return last

    start = time.time()
    with ThreadPoolExecutor(clients) as pool:
        outs = list(pool.map(one, prompts))
    wall = time.time() - start
    return wall, sum(o["usage"]["completion_tokens"] for o in outs), [o["text"] for o in outs]


def engine_stats(worker: str) -> dict:
    """The worker engine's counters (prefill/decode tokens and seconds, prefix tokens reused); {} from a worker
    without them (a vLLM worker, or an older checkout measured for comparison)."""
    return requests.post(worker + "/worker_get_status", timeout=10).json().get("stats", {})


def delta(after: dict, before: dict) -> dict:
    return {k: round(after[k] - before[k], 2) for k in after if k != "max_batch"}


def run_episodes(controller: str, model: str, n: int, concurrency: int, out_dir: Path) -> float | None:
    """Episodes per hour of a few short ALFWorld episodes through eval_agent.main (if it is available)."""
    cmd = [sys.executable, "-m", "eval_agent.main", "--agent_config", "fastchat", "--model_name", model,
           "--exp_config", "alfworld", "--split", "dev", "--max_tasks", str(n), "--max_steps", "3",
           "--num_workers", str(concurrency), "--controller_address", controller, "--output_path",
           str(out_dir), "--override", "--max_new_tokens", "64"]
    start = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if r.returncode not in (0, 1):
        print(f"eval_agent.main failed ({r.returncode}): {r.stderr[-2000:]}", file=sys.stderr)
        return None
    return n / (time.time() - start) * 3600


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=300)
    p.add_argument("--rounds", type=int, default=1, help="requests per client at each level")
    p.add_argument("--num-threads", type=int, default=1, help="torch threads per worker (both workers alike)")
    p.add_argument("--episodes", type=int, default=0, help="also run this many eval_agent episodes per level")
    p.add_argument("--max-batch-size", type=int, default=8, help="the batching worker's --max-batch-size")
    p.add_argument("--via-api", action="store_true", help="send the requests through an OpenAI API server")
    p.add_argument("--out", default=str(REPO / "bench/results/serving.json"))
    a = p.parse_args()
    model_path = Path(a.model_path) if a.model_path else default_model_path()
    if not (model_path / "config.json").is_file():
        raise SystemExit(f"no model at {model_path}; pass --model-path")

    load_before = os.getloadavg()
    import torch  # the workers' default device and dtype: the GPU in bf16 where there is one

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    limits = roofline.measure(a.num_threads, model_path, device, dtype)  # before the workers start, on an idle process
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"roofline ({a.num_threads} threads): {limits['memory_gbs']} GB/s, {limits['matmul_gflops']} GFLOP/s -> "
          f"{limits['decode_tokens_per_s_per_sequence']} tok/s per sequence in a step", flush=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    logs = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    cport = free_port()
    controller = f"http://127.0.0.1:{cport}"
    procs = [subprocess.Popen([sys.executable, "-m", "fastchat.serve.controller", "--port", str(cport)],
                              stdout=(logs / "controller.log").open("w"), stderr=subprocess.STDOUT, env=env)]
    workers, api = {}, None
    try:
        for mode in MODES:
            port = free_port()
            workers[mode] = f"http://127.0.0.1:{port}"
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "fastchat.serve.model_worker", "--model-path", str(model_path),
                 "--model-names", mode, "--port", str(port), "--controller-address", controller,
                 "--num-threads", str(a.num_threads), *mode_flags(mode, a.max_batch_size)],
                stdout=(logs / f"{mode}.log").open("w"), stderr=subprocess.STDOUT, env=env))
        wait_for(lambda: set(MODES) <= set(requests.post(controller + "/list_models", timeout=5).json()["models"]),
                 600, "workers")
        if a.via_api:
            port = free_port()
            api = f"http://127.0.0.1:{port}"
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "fastchat.serve.openai_api_server", "--port", str(port),
                 "--controller-address", controller], stdout=(logs / "api.log").open("w"), stderr=subprocess.STDOUT,
                env=env))
            wait_for(lambda: {m["id"] for m in requests.get(api + "/v1/models", timeout=5).json()["data"]}
                     >= set(MODES), 120, "OpenAI API server")
        prompts = agent_prompts(model_path, max(a.concurrency) * a.rounds, a.prompt_tokens)
        n_prompt = [len(x) for x in prompts]
        run_level(controller, "batched", prompts[:1], 4, 1, api)  # warm up both workers
        run_level(controller, "one-at-a-time", prompts[:1], 4, 1, api)
        rows = []
        for c in a.concurrency:
            batch = prompts[: c * a.rounds]
            row = {"concurrency": c, "requests": len(batch), "new_tokens": a.new_tokens}
            texts = {}
            for mode in MODES:
                before = engine_stats(workers[mode])
                wall, tokens, texts[mode] = run_level(controller, mode, batch, a.new_tokens, c, api)
                limit = roofline.decode_limit(limits, min(c, a.max_batch_size) if mode == "batched" else 1)
                after = engine_stats(workers[mode])
                row[mode] = {"seconds": round(wall, 2), "tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
                             "fraction_of_limit": round(tokens / wall / limit, 3), "engine": delta(after, before)}
                if a.episodes:
                    eph = run_episodes(controller, mode, a.episodes, c, logs / f"episodes_{mode}_{c}")
                    row[mode]["episodes_per_hour"] = round(eph, 1) if eph else None
                    row[mode]["episodes_engine"] = delta(engine_stats(workers[mode]), after)
            row["speedup"] = round(row["batched"]["tokens_per_s"] / row["one-at-a-time"]["tokens_per_s"], 2)
            if a.episodes and row["batched"]["episodes_per_hour"] and row["one-at-a-time"]["episodes_per_hour"]:
                row["episodes_speedup"] = round(row["batched"]["episodes_per_hour"] /
                                                row["one-at-a-time"]["episodes_per_hour"], 2)
            row["same_greedy_text"] = texts["batched"] == texts["one-at-a-time"]
            row["same_greedy_requests"] = sum(x == y for x, y in zip(texts["batched"], texts["one-at-a-time"]))
            rows.append(row)
            print(f"c={c}: batched {row['batched']['tokens_per_s']} tok/s, one-at-a-time "
                  f"{row['one-at-a-time']['tokens_per_s']} tok/s, x{row['speedup']}", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    print(f"\nmodel {model_path.name}, prompts of {min(n_prompt)}-{max(n_prompt)} chars (~{a.prompt_tokens}+ tokens), "
          f"{a.new_tokens} new tokens, torch threads {a.num_threads}")
    print("tok/s (fraction of the roofline decode limit); episodes/hour batched / one-at-a-time")
    print(f"{'concurrent':>10} {'batched tok/s':>18} {'one-at-a-time tok/s':>20} {'speedup':>8} {'same text':>10} "
          f"{'episodes/h':>16}")
    for r in rows:
        b, o = r["batched"], r["one-at-a-time"]
        eph = f"{b['episodes_per_hour']} / {o['episodes_per_hour']}" if a.episodes else "-"
        print(f"{r['concurrency']:>10} {b['tokens_per_s']:>9} ({b['fraction_of_limit']:.2f}) "
              f"{o['tokens_per_s']:>12} ({o['fraction_of_limit']:.2f}) {r['speedup']:>8} "
              f"{str(r['same_greedy_text']):>10} {eph:>16}")
    out = Path(a.out)
    write_json_atomic(out, {"model": model_path.name, "num_threads": a.num_threads, "new_tokens": a.new_tokens,
                            "max_batch_size": a.max_batch_size, "via_api": a.via_api,
                            "prompt_tokens": a.prompt_tokens, "rounds": a.rounds, "episodes": a.episodes,
                            "roofline": limits, "rows": rows,
                            "load_average": {"start": load_before, "end": os.getloadavg()}}, indent=2)
    print(f"written {out}")


if __name__ == "__main__":
    main()
