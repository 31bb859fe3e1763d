"""Serving processes for the ETO pipeline: a controller and model workers on loopback.

Started per model, polled until the controller lists the model and every worker answers a status request
(never a fixed sleep), stopped when the stage ends, fails or is interrupted. Each server binds a free port itself
(--port 0) and writes it to a port file once bound (fastchat.serve.hosts): no port is chosen here and bound
later by another process, so two pipelines started together on one machine cannot race for one. The workers
register their own bound address with the controller. The workers' backend (--serving) is asked of the registry
in scripts/pipeline/backends.py.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from eval_agent.run_layout import RunLayout
from scripts.pipeline.backends import SERVING_BACKENDS


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


def gpu_groups(gpus: list[str], size: int = 1) -> list[list[str]]:
    """GPU ids in consecutive groups of `size` (one per worker; a trailing partial group is dropped)."""
    return [gpus[i:i + size] for i in range(0, len(gpus) - size + 1, size)]


class Services:
    def __init__(self, layout: RunLayout, env: dict, ready_timeout: float = 600.0):
        """Servers log to the run's logs/<stage>.controller.log, logs/<stage>.worker<i>.log."""
        self.layout, self.env, self.ready_timeout = layout, env, ready_timeout
        layout.logs_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []

    def _start(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        log = self.layout.log(name)
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

    def _wait_for_port(self, name: str, port_file: Path, stage: str, deadline: float) -> int:
        """The port server `name` bound, once it wrote it to `port_file`; StageFailed if a server exits or the
        deadline passes."""
        delay = 0.05
        while time.time() < deadline:
            self._check_alive(stage)
            if port_file.is_file():  # written atomically: a file that exists holds the whole number
                return int(port_file.read_text())
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        raise StageFailed(stage, self.layout.log(name), 1,
                          f"{name} wrote no port file after {self.ready_timeout:.0f} s")

    @contextlib.contextmanager
    def serving(self, model: Path, model_name: str, n_workers: int, stage: str, batch_size: int = 8,
                gpus: list[str] | None = None, backend: str = "hf", options: dict | None = None):
        """A controller and `n_workers` workers for `model`; yields the controller address.

        `backend` names a registered serving backend (scripts/pipeline/backends.py: hf, our transformers worker
        decoding up to `batch_size` sequences together and keeping as many prompts' KV caches; vllm), `options`
        the pipeline's serving settings it turns into worker flags (tensor_parallel_size, gpu_memory_utilization,
        max_model_len). With `gpus`, worker j runs on GPU group j mod the number of groups (the backend's GPUs
        per worker in each group)."""
        serving_backend, options = SERVING_BACKENDS.get(backend), options or {}
        ports = Path(tempfile.mkdtemp(prefix="eto-ports-"))
        deadline = time.time() + self.ready_timeout
        try:
            name = f"{stage}.controller"
            self._start(name, [sys.executable, "-m", "fastchat.serve.controller", "--host", "127.0.0.1", "--port",
                               "0", "--port-file", str(ports / name), "--dispatch-method", "shortest_queue"])
            controller = f"http://127.0.0.1:{self._wait_for_port(name, ports / name, stage, deadline)}"
            groups = gpu_groups(gpus or [], serving_backend.gpus_per_worker(options))
            workers = []
            for i in range(n_workers):
                name = f"{stage}.worker{i}"
                cmd = [sys.executable, "-m", serving_backend.worker_module, "--model-path", str(model),
                       "--model-names", model_name, "--host", "127.0.0.1", "--port", "0", "--port-file",
                       str(ports / name), "--controller-address", controller]
                cmd += serving_backend.worker_flags(batch_size, options)
                env = None
                if groups:
                    env = {**self.env, "CUDA_VISIBLE_DEVICES": ",".join(groups[i % len(groups)])}
                    print(f"[eto] {stage}: worker {i} on GPU {env['CUDA_VISIBLE_DEVICES']}", flush=True)
                self._start(name, cmd, env=env)
                workers.append(name)
            addresses = [f"http://127.0.0.1:{self._wait_for_port(name, ports / name, stage, deadline)}"
                         for name in workers]
            self.wait_ready(controller, model_name, addresses, stage, deadline)
            yield controller
        finally:
            self.stop_all()
            shutil.rmtree(ports, ignore_errors=True)

    def wait_ready(self, controller: str, model_name: str, workers: list[str], stage: str, deadline: float) -> None:
        """Until the controller lists `model_name` and every worker (by its address) answers with it."""
        delay = 0.2
        while time.time() < deadline:
            self._check_alive(stage)
            try:
                requests.post(f"{controller}/refresh_all_workers", timeout=5)
                models = requests.post(f"{controller}/list_models", timeout=5).json().get("models", [])
                if model_name in models and all(
                        model_name in requests.post(f"{address}/worker_get_status", timeout=5).json()
                        .get("model_names", []) for address in workers):
                    return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(delay)
            delay = min(delay * 1.5, 3.0)
        raise StageFailed(stage, self.layout.log(f"{stage}.worker0"), 1,
                          f"model worker for {model_name} not ready after {self.ready_timeout:.0f} s")

    def stop_all(self) -> None:
        for _, proc, _ in reversed(self.procs):
            stop_group(proc)
        self.procs.clear()
