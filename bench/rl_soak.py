"""Online RL soak: does a long GRPO run stay healthy? Memory and open files of every process it runs, sampled.

    python -m bench.rl_soak [--minutes 30] [--task alfworld] [--interval 60] [--model DIR]

Runs `run_eto.sh TASK soak --method grpo` (a small task set played again and again: 2 train tasks x K = 2 per step,
3 env steps, up to 2,000 RL steps, a tiny learning rate) on a tiny local model (built here, fastchat.model.tiny, unless
--model) for --minutes of wall time after the first rollout starts, then stops it (SIGINT, as Ctrl-C). Every
--interval seconds it samples, per process of the run's tree, its resident memory and open file descriptors,
grouped by role: pipeline, policy controller, policy worker, episode player (eval_agent.main), simulator
(ScienceWorld's JVM, ALFWorld's game server), trainer. The long-lived ones (pipeline, controller, worker: they live
across all steps and take every new policy's weights) must not grow without bound; the others are started fresh per
stage and are reported per sample.

Verdict per long-lived role: the growth of its memory (RSS) and open files between the mean of the second quarter
and the mean of the last quarter of the samples, against a bound (memory: 10% or 50 MB, whichever is larger; files:
+8). Writes bench/results/rl_soak.json (samples, verdicts, the steps played, the run's weight syncs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from fastchat.records import write_json_atomic

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "rl_soak.json"
LONG_LIVED = ("pipeline", "controller", "worker")
ROLES = (("eto_pipeline", "pipeline"), ("fastchat.serve.controller", "controller"),
         ("fastchat.serve.model_worker", "worker"), ("eval_agent.main", "player"), ("java", "simulator"),
         ("eval_agent.envs.alfworld_env", "simulator"),
         ("fastchat.train", "trainer"))
RSS_BOUND_FRACTION, RSS_BOUND_MB, FILES_BOUND = 0.10, 50.0, 8


def role(proc: psutil.Process) -> str:
    try:
        cmdline = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    return next((name for key, name in ROLES if key in cmdline), "other")


def sample(root: psutil.Process) -> dict:
    """{role: [{"pid", "rss_mb", "files"}]} over the run's process tree now."""
    out: dict[str, list[dict]] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            entry = {"pid": proc.pid, "rss_mb": proc.memory_info().rss / 2**20, "files": proc.num_fds()}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out.setdefault(role(proc), []).append(entry)
    return out


def verdict(samples: list[dict], name: str) -> dict:
    """Growth of the role's summed RSS and open files from the second quarter's mean to the last quarter's."""
    series = [(sum(p["rss_mb"] for p in s["roles"].get(name, [])), sum(p["files"] for p in s["roles"].get(name, [])))
              for s in samples if s["roles"].get(name)]
    if len(series) < 8:
        return {"samples": len(series), "ok": None, "why": "fewer than 8 samples"}
    q = len(series) // 4
    second, last = series[q:2 * q], series[-q:]
    rss_before, rss_after = (sum(r for r, _ in part) / len(part) for part in (second, last))
    files_before, files_after = (sum(f for _, f in part) / len(part) for part in (second, last))
    rss_bound = max(RSS_BOUND_FRACTION * rss_before, RSS_BOUND_MB)
    return {"samples": len(series), "rss_mb_second_quarter": round(rss_before, 1),
            "rss_mb_last_quarter": round(rss_after, 1), "rss_growth_mb": round(rss_after - rss_before, 1),
            "rss_bound_mb": round(rss_bound, 1), "files_second_quarter": round(files_before, 1),
            "files_last_quarter": round(files_after, 1), "files_bound": FILES_BOUND,
            "ok": rss_after - rss_before <= rss_bound and files_after - files_before <= FILES_BOUND}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="wall time of rollouts and updates to sample")
    p.add_argument("--interval", type=float, default=60.0, help="seconds between samples")
    p.add_argument("--task", default="alfworld", help="the task the run plays (its simulator is sampled too)")
    p.add_argument("--model", type=Path, default=None, help="the policy (default: a tiny model built here)")
    p.add_argument("--output", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="rl-soak-"))
    if a.model is None:
        from eval_agent.prompt import PROMPT_DIR
        from fastchat.model.tiny import build_tiny_model
        a.model = build_tiny_model(work / "tiny-model", corpus_dirs=[PROMPT_DIR])
    cmd = ["bash", str(REPO / "run_eto.sh"), a.task, "soak", str(a.model), str(work / "runs"), "--method", "grpo",
           "--rl_steps", "2000", "--eval_every", "0", "--rl_tasks_per_step", "2", "--samples_per_task", "2",
           "--rl_batch_size", "4", "--rl_per_device_batch_size", "2", "--rl_learning_rate", "1e-7",
           "--max_steps", "3", "--max_new_tokens", "24", "--num_workers", "4", "--sft_samples", "4",
           "--sft_epochs", "1", "--sft_batch_size", "2", "--sft_per_device_batch_size", "2", "--test_tasks", "2",
           "--model_max_length", "4096"]
    run = work / "runs" / "soak"
    log = open(work / "pipeline.out", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work, env={**os.environ},
                            start_new_session=True)
    root = psutil.Process(proc.pid)
    print(f"[soak] {' '.join(cmd)}\n[soak] run folder {run}; waiting for the first rollout", flush=True)
    while not (run / "logs" / "rollout_step1.log").exists():
        if proc.poll() is not None:
            print((work / "pipeline.out").read_text()[-3000:], file=sys.stderr)
            return 1
        time.sleep(1)
    started, samples = time.time(), []
    while time.time() - started < a.minutes * 60:
        if proc.poll() is not None:
            print(f"[soak] the run ended early (exit {proc.returncode}):\n"
                  + (work / "pipeline.out").read_text()[-3000:], file=sys.stderr)
            break
        now = sample(root)
        steps = len(list((run / "stages").glob("update_step*.json")))
        samples.append({"minute": round((time.time() - started) / 60, 2), "updates_done": steps, "roles": now})
        print(f"[soak] {samples[-1]['minute']:6.1f} min, {steps} updates: " + ", ".join(
            f"{r} {sum(x['rss_mb'] for x in ps):.0f} MB/{sum(x['files'] for x in ps)} fds"
            for r, ps in sorted(now.items())), flush=True)
        time.sleep(a.interval)
    ended_early = proc.poll() is not None
    stop = f"ended by itself, exit {proc.returncode}" if ended_early else stop_run(proc)
    print(f"[soak] stop: {stop}", flush=True)
    syncs = [json.loads(f.read_text()).get("weight_sync") for f in sorted((run / "stages").glob("rollout_step*.json"))]
    result = {
        "command": " ".join(["python -m bench.rl_soak", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "task": a.task, "minutes": a.minutes, "interval_s": a.interval, "ended_early": ended_early, "stop": stop,
        "updates_done": len(list((run / "stages").glob("update_step*.json"))),
        "weight_syncs": {how: sum(1 for s in syncs if s and s.get("how") == how)
                         for how in ("started", "pushed", "restarted")},
        "verdicts": {name: verdict(samples, name) for name in LONG_LIVED},
        "samples": samples,
    }
    result["ok"] = not ended_early and stop.startswith("SIGINT obeyed") and \
        all(v["ok"] for v in result["verdicts"].values())
    write_json_atomic(a.output, result)
    print(json.dumps({k: result[k] for k in ("updates_done", "weight_syncs", "stop", "verdicts", "ok")}, indent=1))
    return 0 if result["ok"] else 1


def stop_run(proc: subprocess.Popen, grace: float = 180) -> str:
    """Ctrl-C to the run's process group, as a terminal sends it; the pipeline stops its stages and servers in
    order. What is left after `grace` seconds is killed, and the answer says so (the verdict then fails)."""
    os.killpg(proc.pid, signal.SIGINT)
    start = time.time()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        left = [f"{p.pid} {' '.join(p.cmdline()[:4])}" for p in psutil.Process(proc.pid).children(recursive=True)]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"SIGINT not obeyed in {grace:.0f} s, killed; still running then: {left}"
    return f"SIGINT obeyed in {time.time() - start:.1f} s, exit {proc.returncode}"


if __name__ == "__main__":
    sys.exit(main())
