"""Serving processes for the ETO pipeline: a controller and model workers on loopback.

Started per model, polled until the controller lists the model and a worker answers a status request
(never a fixed sleep), stopped when the stage ends, fails or is interrupted.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests


class StageFailed(Exception):
    def __init__(self, stage: str, log: Path, code: int, detail: str = ""):
        super().__init__(f"stage {stage} failed (exit {code}); log: {log}")
        self.stage, self.log, self.code, self.detail = stage, log, code, detail


def stop_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """Terminate a process started with start_new_session=True and all its descendants."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; give its group the same grace, then make sure
        deadline = time.time() + grace
        while time.time() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_groups(gpus: list[str], size: int = 1) -> list[list[str]]:
    """GPU ids in consecutive groups of `size` (one per worker; a trailing partial group is dropped)."""
    return [gpus[i:i + size] for i in range(0, len(gpus) - size + 1, size)]


def worker_flags(backend: str, batch_size: int, vllm: dict) -> list[str]:
    """The pipeline's serving settings as the worker's command-line flags."""
    if backend == "hf":
        return ["--max-batch-size", str(batch_size), "--prefix-cache-size", str(batch_size)]
    flags = ["--tensor-parallel-size", str(vllm.get("tensor_parallel_size", 1)),
             "--gpu-memory-utilization", str(vllm.get("gpu_memory_utilization", 0.9))]
    if vllm.get("max_model_len"):
        flags += ["--context-len", str(vllm["max_model_len"])]
    return flags


class Services:
    def __init__(self, log_dir: Path, env: dict, ready_timeout: float = 600.0):
        self.log_dir, self.env, self.ready_timeout = log_dir, env, ready_timeout
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []

    def _start(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        log = self.log_dir / f"{name}.log"
        handle = open(log, "a")
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env or self.env,
                                start_new_session=True)  # Ctrl-C reaches us, and we stop them in order
        handle.close()
        self.procs.append((name, proc, log))
        return proc

    def _check_alive(self, stage: str) -> None:
        for name, proc, log in self.procs:
            if proc.poll() is not None:
                raise StageFailed(stage, log, proc.returncode, f"{name} exited while starting")

    @contextlib.contextmanager
    def serving(self, model: Path, model_name: str, n_workers: int, stage: str, batch_size: int = 8,
                gpus: list[str] | None = None, backend: str = "hf", vllm: dict | None = None):
        """A controller and `n_workers` workers for `model`; yields the controller address.

        backend "hf": fastchat.serve.model_worker, decoding up to `batch_size` sequences together and keeping
        as many prompts' KV caches. backend "vllm": fastchat.serve.vllm_worker with `vllm` options
        (tensor_parallel_size, gpu_memory_utilization, max_model_len). With `gpus`, worker j runs on GPU group
        j mod the number of groups (one GPU per group, or tensor_parallel_size GPUs for vLLM)."""
        port = free_port()
        controller = f"http://127.0.0.1:{port}"
        self._start(f"{stage}.controller", [sys.executable, "-m", "fastchat.serve.controller",
                                            "--host", "127.0.0.1", "--port", str(port),
                                            "--dispatch-method", "shortest_queue"])
        groups = gpu_groups(gpus or [], (vllm or {}).get("tensor_parallel_size", 1) if backend == "vllm" else 1)
        for i in range(n_workers):
            wport = free_port()
            cmd = [sys.executable, "-m", f"fastchat.serve.{'vllm_worker' if backend == 'vllm' else 'model_worker'}",
                   "--model-path", str(model), "--model-names", model_name, "--host", "127.0.0.1",
                   "--port", str(wport), "--worker-address", f"http://127.0.0.1:{wport}",
                   "--controller-address", controller]
            cmd += worker_flags(backend, batch_size, vllm or {})
            env = None
            if groups:
                env = {**self.env, "CUDA_VISIBLE_DEVICES": ",".join(groups[i % len(groups)])}
                print(f"[eto] {stage}: worker {i} on GPU {env['CUDA_VISIBLE_DEVICES']}", flush=True)
            self._start(f"{stage}.worker{i}", cmd, env=env)
        try:
            self.wait_ready(controller, model_name, n_workers, stage)
            yield controller
        finally:
            self.stop_all()

    def wait_ready(self, controller: str, model_name: str, n_workers: int, stage: str) -> None:
        deadline = time.time() + self.ready_timeout
        delay = 0.2
        while time.time() < deadline:
            self._check_alive(stage)
            try:
                requests.post(f"{controller}/refresh_all_workers", timeout=5)
                models = requests.post(f"{controller}/list_models", timeout=5).json().get("models", [])
                if model_name in models:
                    addr = requests.post(f"{controller}/get_worker_address", json={"model": model_name},
                                         timeout=5).json().get("address")
                    status = requests.post(f"{addr}/worker_get_status", timeout=5).json() if addr else {}
                    if model_name in status.get("model_names", []):
                        return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(delay)
            delay = min(delay * 1.5, 3.0)
        raise StageFailed(stage, self.log_dir / f"{stage}.worker0.log", 1,
                          f"model worker for {model_name} not ready after {self.ready_timeout:.0f} s")

    def stop_all(self) -> None:
        for _, proc, _ in reversed(self.procs):
            stop_group(proc)
        self.procs.clear()
