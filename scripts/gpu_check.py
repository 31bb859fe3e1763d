"""The small GPU check: the GPU path in one run of at most 10 minutes on the lent H200, nothing downloaded.

    bash scripts/gpu_check.sh --small OUT_DIR [--device cuda|cpu] [--model DIR | --model-config DIR] [flags]
    python -m scripts.gpu_check OUT_DIR [flags]       # the same, with the packages already installed

`gpu_check.sh --small` installs the wheel bundle (python -m scripts.gpu_bundle; .gpu-bundle/) into a temporary
target first, then runs this. Steps, in this order (a failed step is recorded and the next one runs):

1. env: Python, torch, CUDA device, bf16 support, versions of the packages used, bundled requirements unmet there.
2. model: the default model's architecture with random weights, built from its config and tokenizer files
   (--model-config; the bundle carries them), or a real model folder (--model).
3. limits: this device's limits for this model (bench/roofline.py: memory bandwidth of a weight-sized
   matrix-vector product and matmul throughput at the model's shapes, in bf16 on a GPU) and its peaks (a 2 GiB
   matrix-vector product, an 8192^3 product).
4. serving: bench/bench_serving.py --via-api: controller, a batching HF worker and a one-at-a-time one, an OpenAI
   API server in front; 1, 8 and 64 concurrent greedy requests; tokens/s, the batching speedup, greedy texts
   batched == one at a time.
5. training: bench/bench_train.py, padding-free SFT and DPO (precomputed reference) on --train-data, once with
   --bf16 and once in fp32 with the same batches: tokens/s, peak CUDA memory, and the first COMPARE_STEPS logged
   losses of bf16 within LOSS_RTOL x max(1, |fp32 loss|) of fp32's.
6. loop: run_eto.sh on the key-room task (tests/newtask): SFT, evaluation, exploration, pairs, DPO, evaluation,
   every stage on the GPU (--gpus 0).
7. deepspeed: the SFT run under DeepSpeed ZeRO-2, torchrun with one process (needs CUDA and DeepSpeed), losses
   compared with step 5's bf16 SFT.

Everything goes into OUT_DIR: gpu_check.json (every figure, written after each step, so a run cut short keeps
what it measured), gpu_check.log (a line per step) and logs.tar.gz (the logs of every process it started).
With --device cpu the GPU is hidden (CUDA_VISIBLE_DEVICES="") and the same steps run on the CPU (trainers then
switch bf16 off, so both precisions are fp32); tests/test_gpu_check.py runs it so on a tiny model. Exit status 0
when every step ran and every check held.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from eval_agent.run_layout import RunLayout

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / ".gpu-bundle"
COMPARE_STEPS = 3  # logged losses compared between precisions (and with ZeRO-2)
LOSS_RTOL = 0.02  # |bf16 - fp32| <= LOSS_RTOL * max(1, |fp32|)
STEP_SECONDS = {"serving": 240, "training": 240, "loop": 300, "deepspeed": 150}  # each step's own limit
# the loop's budget: the key room has 8 train and 4 test tasks
LOOP_FLAGS = ["--iterations", "1", "--eval_base", "0", "--train_tasks", "8", "--test_tasks", "4", "--max_steps", "8",
              "--sft_samples", "8", "--sft_epochs", "2", "--sft_batch_size", "4", "--sft_per_device_batch_size", "4",
              "--dpo_batch_size", "2", "--dpo_per_device_batch_size", "2", "--dpo_epochs", "1",
              "--model_max_length", "2048", "--num_workers", "8", "--worker_batch_size", "8"]
PACKAGES = ("torch", "transformers", "accelerate", "peft", "tokenizers", "safetensors", "numpy", "fastapi",
            "starlette", "pydantic", "uvicorn", "httpx", "requests", "deepspeed")


class Check:
    """The run's record: JSON written after every step, a line per step in the log."""

    def __init__(self, out: Path, argv: list[str], budget: float):
        self.out = out
        self.start = time.monotonic()
        self.deadline = self.start + budget
        self.result = {"check": "gpu_check --small", "argv": argv,
                       "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "commit": commit(), "steps": {}, "checks": {}}
        self.log_file = (out / "gpu_check.log").open("a", encoding="utf-8")

    def log(self, line: str) -> None:
        line = f"[gpu-check {time.monotonic() - self.start:6.0f}s] {line}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def save(self) -> None:
        from fastchat.records import write_json_atomic

        self.result["wall_s"] = round(time.monotonic() - self.start, 1)
        self.result["ok"] = (all(s.get("ok", False) or s.get("skipped") for s in self.result["steps"].values())
                             and all(self.result["checks"].values()))
        write_json_atomic(self.out / "gpu_check.json", self.result, indent=2)

    def remaining(self, limit: float) -> float:
        """A step's time: its own limit, or what is left of the budget if less."""
        return min(limit, self.deadline - time.monotonic())

    def check(self, name: str, passed: bool, detail: str) -> None:
        self.result["checks"][name] = bool(passed)
        self.log(f"check {name}: {'ok' if passed else 'FAILED'} ({detail})")

    def step(self, name: str, fn, *args) -> dict | None:
        self.log(f"{name} ...")
        t = time.monotonic()
        try:
            record = fn(*args) or {}
            record.setdefault("ok", True)
        except Exception as e:  # recorded; the next step runs
            record = {"ok": False, "error": f"{type(e).__name__}: {e}"[-4000:],
                      "traceback": traceback.format_exc()[-4000:]}
        record["seconds"] = round(time.monotonic() - t, 1)
        self.result["steps"][name] = record
        lines = record.get("error", "").strip().splitlines()
        status = "skipped: " + record["skipped"] if record.get("skipped") else "ok" if record["ok"] else \
            "FAILED: " + " | ".join(lines[:1] + lines[-4:])[:1200]
        self.log(f"{name}: {status} ({record['seconds']} s)")
        self.save()
        return record if record["ok"] else None


def commit() -> str | None:
    """The checked commit: git's where there is a repository, else $ETO_GPU_CHECK_COMMIT (the lent machine gets the
    working tree without .git: pass it on the command line)."""
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if r.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return r.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return os.environ.get("ETO_GPU_CHECK_COMMIT")


def process_log(work: Path, name: str) -> Path:
    """The log of a process the check starts (all of them go into logs.tar.gz)."""
    return work / "logs" / f"{name}.log"


def run_process(cmd: list[str], log: Path, timeout: float, env: dict, cwd: Path = REPO) -> None:
    """`cmd` in its own process group, output to `log`; the group is stopped at `timeout`. Raises on failure, with
    the log's tail."""
    from scripts.pipeline.services import run_logged

    try:
        code = run_logged(cmd, log, "$ " + " ".join(cmd), env, cwd, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{cmd[2] if len(cmd) > 2 else cmd[0]} ran past {timeout:.0f} s; log tail:\n"
                           + log.read_text(errors="replace")[-1500:]) from None
    if code:
        raise RuntimeError(f"{' '.join(cmd[:3])} exited with {code}; log tail:\n"
                           + log.read_text(errors="replace")[-2500:])


# -- the steps -------------------------------------------------------------------------------------------------------

def env_step(device: str) -> dict:
    import torch

    rec = {"python": platform.python_version(), "platform": platform.platform(), "device": device,
           "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
           "versions": {}, "bundle_packages_from": {}}
    for name in PACKAGES:
        try:
            rec["versions"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            rec["versions"][name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rec.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   multiprocessors=props.multi_processor_count, bf16=torch.cuda.is_bf16_supported(),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None,
                   flash_sdp=torch.backends.cuda.flash_sdp_enabled(),
                   mem_efficient_sdp=torch.backends.cuda.mem_efficient_sdp_enabled())
    from scripts.gpu_bundle import BUNDLE as BUNDLED

    rec["unmet_requirements"] = unmet_requirements(BUNDLED)
    for name in BUNDLED:
        spec = importlib.util.find_spec(name.replace("-", "_"))
        rec["bundle_packages_from"][name] = str(Path(spec.origin).parent.parent) if spec and spec.origin else None
    return rec


def unmet_requirements(names) -> list[str]:
    """Requirements (no extras) of the installed `names` that the installed packages do not satisfy."""
    from packaging.requirements import Requirement

    out = []
    for name in names:
        try:
            reqs = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name}: not installed")
            continue
        for line in reqs:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                out.append(f"{name} needs {req}: not installed")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                out.append(f"{name} needs {req}: {have} installed")
    return out


def model_step(args, work: Path) -> dict:
    if args.model:
        path = Path(args.model).resolve()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {path}: no config.json there")
        rec = {"path": str(path), "random_weights": False}
    else:
        from fastchat.model.tiny import build_from_config

        source = Path(args.model_config).resolve()
        path = build_from_config(source, work / "model" / source.name)
        rec = {"path": str(path), "random_weights": True, "config_from": str(source)}
    from bench.roofline import model_size

    size = model_size(path)
    rec.update(name=path.name, params=size["params"], layers=size["layers"], hidden=size["hidden"])
    args.model_path = path
    return rec


def limits_step(args) -> dict:
    import torch

    from bench import roofline

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    device = "cuda" if cuda else "cpu"
    model = roofline.measure(args.threads, args.model_path, device, dtype)
    n = 8192 if cuda else 1024
    peak = {"matmul_gflops": round(roofline.matmul_gflops(n, n, n, repeats=10 if cuda else 3, device=device,
                                                          dtype=dtype), 1), "matmul_shape": [n, n, n],
            "memory_gbs": round(roofline.memory_bandwidth_gbs(2**31 if cuda else 2**28, 20 if cuda else 3, device,
                                                              dtype), 2),
            "memory_bytes": 2**31 if cuda else 2**28}
    if cuda:
        torch.cuda.empty_cache()
    args.limits = {"model_shapes": model, "peak": peak}
    return {"dtype": str(dtype).removeprefix("torch."), **args.limits}


def serving_step(args, work: Path, env: dict, check: Check) -> dict:
    out = work / "serving.json"
    cmd = [sys.executable, "-m", "bench.bench_serving", "--model-path", str(args.model_path), "--concurrency",
           *map(str, args.concurrency), "--max-batch-size", str(max(args.concurrency)), "--new-tokens",
           str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens), "--num-threads", str(args.worker_threads),
           "--via-api", "--out", str(out)]
    run_process(cmd, process_log(work, "serving"), check.remaining(STEP_SECONDS["serving"]), env)
    raw = json.loads(out.read_text())
    peak = args.limits["peak"]
    weight_bytes = raw["roofline"].get("weight_bytes", raw["roofline"]["fp32_weight_bytes"])
    base = next((r["batched"]["tokens_per_s"] for r in raw["rows"] if r["concurrency"] == 1), None)
    rows = []
    for r in raw["rows"]:
        b, o = r["batched"], r["one-at-a-time"]
        c = r["concurrency"]
        rows.append({"concurrency": c, "batched_tokens_per_s": b["tokens_per_s"],
                     "one_at_a_time_tokens_per_s": o["tokens_per_s"], "batched_over_one_at_a_time": r["speedup"],
                     "batched_over_batched_at_1": round(b["tokens_per_s"] / base, 2) if base else None,
                     "batched_fraction_of_model_limit": b["fraction_of_limit"],
                     "batched_fraction_of_peak_bandwidth": round(
                         b["tokens_per_s"] / (c * peak["memory_gbs"] * 1e9 / weight_bytes), 4),
                     "same_greedy_requests": f"{r['same_greedy_requests']}/{r['requests']}",
                     "same_greedy_text": r["same_greedy_text"]})
        check.check(f"serving_c{c}_greedy_batched_equals_one_at_a_time", r["same_greedy_text"],
                    f"{r['same_greedy_requests']}/{r['requests']} requests identical")
    return {"rows": rows, "raw": raw}


def train_run(args, work: Path, env: dict, check: Check, name: str, runs: list[str], bf16: bool) -> dict:
    out = work / f"train_{name}.json"
    cmd = [sys.executable, "-m", "bench.bench_train", "--model", str(args.model_path), "--data", str(args.train_data),
           "--samples", str(args.train_samples), "--batch", str(args.train_batch), "--dpo_batch",
           str(args.dpo_batch), "--max_length", str(args.max_length), "--threads", str(args.threads),
           "--runs", *runs, "--out", str(out), *(["--bf16"] if bf16 else [])]
    run_process(cmd, process_log(work, f"train_{name}"), check.remaining(STEP_SECONDS["training"]), env)
    return json.loads(out.read_text())


def losses_agree(a: list[float], ref: list[float]) -> tuple[bool, list[float]]:
    """The first COMPARE_STEPS losses of `a` within LOSS_RTOL x max(1, |ref|) of `ref`'s; their differences."""
    n = min(COMPARE_STEPS, len(a), len(ref))
    diffs = [round(abs(x - y), 5) for x, y in zip(a[:n], ref[:n])]
    ok = n > 0 and all(d <= LOSS_RTOL * max(1.0, abs(y)) for d, y in zip(diffs, ref))
    return ok, diffs


def summarise_run(r: dict, peak: dict, params: int) -> dict:
    keep = ("run", "real_tokens", "tokens_per_s", "fraction_of_limit", "matmul_utilization", "peak_cuda_mib",
            "peak_rss_mib", "train_s", "precompute_s", "step_losses")
    row = {k: r[k] for k in keep if k in r}
    row["fraction_of_peak_matmul"] = round(r["tokens_per_s"] * 6 * params / (peak["matmul_gflops"] * 1e9), 4)
    return row


def training_step(args, work: Path, env: dict, check: Check) -> dict:
    runs = ["sft_packed", "dpo_packed"]
    bf16 = train_run(args, work, env, check, "bf16", runs, bf16=True)
    fp32 = train_run(args, work, env, check, "fp32", runs, bf16=False)
    peak, params = args.limits["peak"], bf16["runs"][0]["roofline"]["params"]
    rec = {"data": str(args.train_data), "samples": args.train_samples, "compare_steps": COMPARE_STEPS,
           "loss_rtol": LOSS_RTOL, "bf16": [summarise_run(r, peak, params) for r in bf16["runs"]],
           "fp32": [summarise_run(r, peak, params) for r in fp32["runs"]], "limit": bf16.get("limit"),
           "raw": {"bf16": bf16, "fp32": fp32}}
    if args.device == "cpu":
        rec["note"] = "on CPU the trainers switch --bf16 off: both runs are fp32"
    for b, f in zip(bf16["runs"], fp32["runs"]):
        ok, diffs = losses_agree(b["step_losses"], f["step_losses"])
        rec.setdefault("loss_differences", {})[b["run"]] = diffs
        check.check(f"{b['run']}_bf16_losses_equal_fp32", ok, f"first losses {b['step_losses'][:COMPARE_STEPS]} vs "
                    f"{f['step_losses'][:COMPARE_STEPS]}, |diff| {diffs}, tolerance {LOSS_RTOL} x max(1, |fp32|)")
        check.check(f"{b['run']}_losses_finite", all(x == x and abs(x) != float("inf")
                                                     for x in b["step_losses"] + f["step_losses"]), "no nan or inf")
    args.sft_bf16 = bf16["runs"][0]
    return rec


def deepspeed_step(args, work: Path, env: dict, check: Check) -> dict:
    if args.device != "cuda":
        return {"skipped": "needs CUDA: the trainers refuse --deepspeed on CPU (docs/gpus.md)"}
    if importlib.util.find_spec("deepspeed") is None:
        return {"skipped": "DeepSpeed is not installed (the bundle carries its wheel: was .gpu-bundle carried?)"}
    zero2 = train_run(args, work, env, check, "zero2", ["sft_packed_zero2"], bf16=True)
    run = zero2["runs"][0]
    rec = {"run": summarise_run(run, args.limits["peak"], run["roofline"]["params"]), "raw": zero2}
    ref = getattr(args, "sft_bf16", None)
    if ref:
        ok, diffs = losses_agree(run["step_losses"], ref["step_losses"])
        rec["loss_differences_vs_plain_bf16"] = diffs
        check.check("sft_zero2_losses_equal_plain_bf16", ok, f"{run['step_losses'][:COMPARE_STEPS]} vs "
                    f"{ref['step_losses'][:COMPARE_STEPS]}")
    return rec


def keyroom_task(work: Path) -> Path:
    """A copy of tests/newtask (the key room) with its expert trajectories built there."""
    folder = work / "tasks"
    if not (folder / "keyroom_sft.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(REPO / "tests" / "newtask", folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*_sft.json"))
        subprocess.run([sys.executable, "build_keyroom_sft.py", "--out", "keyroom_sft.json"], cwd=folder,
                       check=True, capture_output=True, env={**os.environ, "PYTHONPATH": pythonpath()})
    return folder


def loop_step(args, work: Path, env: dict, check: Check) -> dict:
    from eval_agent.config import TASK_PATH_ENV

    save = work / "runs"
    cmd = ["bash", str(REPO / "run_eto.sh"), "keyroom", "gpu-small", str(args.model_path), str(save), "--restart",
           *LOOP_FLAGS, "--max_new_tokens", str(args.new_tokens), *(["--gpus", "0"] if args.device == "cuda" else [])]
    log = process_log(work, "loop")
    run_process(cmd, log, check.remaining(STEP_SECONDS["loop"]), {**env, TASK_PATH_ENV: str(keyroom_task(work))})
    run = RunLayout(save / "gpu-small")
    summary = json.loads(run.summary_json.read_text())
    stages = {}
    text = log.read_text(errors="replace")
    for p in run.stage_records():
        r = json.loads(p.read_text())
        seconds, cost, metrics = r.get("seconds") or 0, r.get("cost") or {}, r.get("metrics") or {}
        row = {"seconds": seconds, **{k: metrics[k] for k in ("num_tasks", "average_reward", "success_rate")
                                      if k in metrics}}
        if cost.get("train_tokens"):  # a trainer's stage
            row.update(train_tokens=cost["train_tokens"], peak_cuda_mib=cost.get("peak_cuda_mib"),
                       peak_rss_mib=cost.get("peak_rss_mib"))
        generated = (metrics.get("cost") or {}).get("completion_tokens")
        if generated:  # an episode stage: tokens generated over the stage's time (server start-up included)
            row.update(generated_tokens=generated, generated_tokens_per_s=round(generated / max(seconds, 1e-9), 1))
        gpus = sorted(set(re.findall(rf"\[eto\] {re.escape(p.stem)}: worker \d+ on GPU (\S+)", text)))
        if gpus:
            row["worker_gpus"] = gpus
        stages[p.stem] = row
    rec = {"task": "keyroom", "flags": LOOP_FLAGS, "stages": stages,
           "summary": {k: summary.get(k) for k in ("total_seconds", "stage_seconds", "test_reward_by_stage")}}
    expected = {"sft", "eval_sft", "explore_iter1", "pairs_iter1", "dpo_iter1", "eval_iter1"}
    check.check("loop_all_stages_finished", expected <= set(stages), f"stages {sorted(stages)}")
    if args.device == "cuda":
        trained = [s for s in ("sft", "dpo_iter1") if (stages.get(s) or {}).get("peak_cuda_mib")]
        served = [s for s in ("eval_sft", "explore_iter1", "eval_iter1") if (stages.get(s) or {}).get("worker_gpus")]
        check.check("loop_every_stage_on_the_gpu", len(trained) == 2 and len(served) == 3,
                    f"trainers with CUDA memory: {trained}; serving stages with workers on a GPU: {served}")
    return rec


# -- the run ---------------------------------------------------------------------------------------------------------

def pythonpath() -> str:
    parts = [str(REPO), str(REPO / "envs"), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    return os.pathsep.join(dict.fromkeys(parts))


def default_model_config() -> Path:
    bundled = BUNDLE / "model" / "SmolLM2-135M-Instruct"
    if bundled.is_dir():
        return bundled
    from fastchat.constants import default_model_path

    return default_model_path()


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path, help="where gpu_check.json, gpu_check.log and logs.tar.gz go")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda (default; fails without a GPU) or cpu: the same steps with the GPU hidden")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="a real model folder (weights and all) instead of random weights")
    src.add_argument("--model-config", default=None, help="build random weights from this folder's config and "
                     "tokenizer files (default: .gpu-bundle/model/SmolLM2-135M-Instruct, else the default model's)")
    p.add_argument("--train-data", type=Path, default=None, help="SFT records for the training step (default: "
                   ".gpu-bundle/data/webshop_sft.json, else setup.sh's data/webshop_sft.json, else the key room's "
                   "expert trajectories)")
    p.add_argument("--train-samples", type=int, default=64, help="records (DPO: pairs) trained on (default 64)")
    p.add_argument("--train-batch", type=int, default=8, help="SFT sequences per step (default 8)")
    p.add_argument("--dpo-batch", type=int, default=4, help="DPO pairs per step (default 4)")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per answer, serving and loop (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=300)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the CPU count)")
    p.add_argument("--budget", type=float, default=500, help="seconds for the whole check (default 500); a step "
                   "left with less than 30 s is skipped")
    p.add_argument("--skip", nargs="*", default=[], choices=["serving", "training", "loop", "deepspeed"])
    a = p.parse_args(argv)
    for name in ("train_samples", "train_batch", "dpo_batch", "max_length", "new_tokens", "prompt_tokens"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if any(c < 1 for c in a.concurrency):
        p.error(f"--concurrency takes positive numbers, got {a.concurrency}")
    a.threads = a.threads or os.cpu_count() or 1
    a.worker_threads = 1 if a.device == "cpu" else a.threads
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch: every process of the check runs on the CPU
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but no CUDA GPU is visible (use --device cpu to run the steps on the CPU)",
              file=sys.stderr)
        return 2
    a.model_config = a.model_config or (None if a.model else str(default_model_config()))
    if a.model_config and not (Path(a.model_config) / "config.json").is_file():
        print(f"gpu_check: no config.json in {a.model_config} (build the bundle: python -m scripts.gpu_bundle, or "
              f"give --model-config / --model)", file=sys.stderr)
        return 2
    if a.train_data is not None and not a.train_data.is_file():
        print(f"gpu_check: --train-data {a.train_data}: no such file", file=sys.stderr)
        return 2
    a.out_dir.mkdir(parents=True, exist_ok=True)
    check = Check(a.out_dir, sys.argv[1:] if argv is None else argv, a.budget)
    env = {**os.environ, "PYTHONPATH": pythonpath(), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    (work / "logs").mkdir()
    check.log(f"device {a.device}, work folder {work}, output {a.out_dir}")
    try:
        check.step("env", env_step, a.device)
        if check.step("model", model_step, a, work) is None or check.step("limits", limits_step, a) is None:
            return 1
        if a.train_data is None:
            found = [f for f in (BUNDLE / "data" / "webshop_sft.json", REPO / "data" / "webshop_sft.json")
                     if f.is_file()]
            a.train_data = found[0] if found else keyroom_task(work) / "keyroom_sft.json"
        steps = {"serving": serving_step, "training": training_step, "loop": loop_step, "deepspeed": deepspeed_step}
        for name, fn in steps.items():
            if name in a.skip:
                check.result["steps"][name] = {"skipped": "--skip"}
                continue
            if check.remaining(30) < 30:
                check.result["steps"][name] = {"skipped": f"out of time (--budget {a.budget:.0f} s)"}
                check.log(f"{name}: skipped, out of time")
                continue
            check.step(name, fn, a, work, env, check)
    finally:
        check.result["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        check.save()
        with tarfile.open(a.out_dir / "logs.tar.gz", "w:gz") as tar:
            tar.add(work / "logs", arcname="logs")
            run_logs = RunLayout(work / "runs" / "gpu-small").logs_dir
            if run_logs.is_dir():
                tar.add(run_logs, arcname="loop-run-logs")
        shutil.rmtree(work, ignore_errors=True)
    ok = check.result["ok"]
    check.log(f"{'OK' if ok else 'FAILED'}: {a.out_dir / 'gpu_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
