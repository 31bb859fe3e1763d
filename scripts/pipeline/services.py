"""Serving processes for the ETO pipeline: a controller and model workers on loopback.

Started per model, polled until the controller lists the model and every worker answers a status request
(never a fixed sleep), stopped when the stage ends, fails or is interrupted. Each server binds a free port itself
(--port 0) and writes it to a port file once bound (fastchat.serve.hosts): no port is chosen here and bound
later by another process, so two pipelines started together on one machine cannot race for one. The workers
register their own bound address with the controller. The workers' backend (--serving) is asked of the registry
in scripts/pipeline/backends.py.

Online RL keeps its policy's servers across stages (LiveServing): each new policy version reaches the running
workers through POST /worker_load_weights (fastchat.serve.weights) instead of a restart.
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
from fastchat.serve.weights import WeightLoadError, push_weights_to_all
from scripts.pipeline.backends import SERVING_BACKENDS

# backends whose workers load new weights in place (/worker_load_weights); vllm's answer 501: LiveServing restarts
# them on the new model folder instead
IN_PLACE_WEIGHT_BACKENDS = ("hf",)


class StageFailed(Exception):
    def __init__(self, stage: str, log: Path, code: int, detail: str = ""):
        super().__init__(f"stage {stage} failed (exit {code}); log: {log}")
        self.stage, self.log, self.code, self.detail = stage, log, code, detail


def run_logged(cmd: list[str], log_path: Path, header: str, env: dict[str, str], cwd: Path,
               timeout: float | None = None) -> int:
    """Run `cmd` in its own process group, its output appended to `log_path` after the line `header`; its exit
    status. Interrupted (Ctrl-C, SIGTERM raised as KeyboardInterrupt), or still running after `timeout` seconds
    (subprocess.TimeoutExpired), it stops the group, everything it started (env workers, JVMs) with it, and
    re-raises."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(header + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except BaseException:
            stop_group(proc)
            raise


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

    def _start(self, name: str, cmd: list[str], env: dict | None = None) -> tuple[str, subprocess.Popen, Path]:
        log = self.layout.log(name)
        handle = open(log, "a")
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env or self.env,
                                start_new_session=True)  # Ctrl-C reaches us, and we stop them in order
        handle.close()
        self.procs.append((name, proc, log))
        return self.procs[-1]

    def check_alive(self, stage: str, when: str = "while starting") -> None:
        """StageFailed naming the first of our servers that has exited (its log and exit status)."""
        for name, proc, log in self.procs:
            if proc.poll() is not None:
                raise StageFailed(stage, log, proc.returncode, f"{name} exited {when}")

    def _wait_for_port(self, name: str, port_file: Path, stage: str, deadline: float) -> int:
        """The port server `name` bound, once it wrote it to `port_file`; StageFailed if a server exits or the
        deadline passes."""
        delay = 0.05
        while time.time() < deadline:
            self.check_alive(stage)
            if port_file.is_file():  # written atomically: a file that exists holds the whole number
                return int(port_file.read_text())
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        raise StageFailed(stage, self.layout.log(name), 1,
                          f"{name} wrote no port file after {self.ready_timeout:.0f} s")

    @contextlib.contextmanager
    def serving(self, model: Path, model_name: str, n_workers: int, stage: str, batch_size: int = 8,
                gpus: list[str] | None = None, backend: str = "hf", options: dict | None = None):
        """A controller and `n_workers` workers for `model`; yields the controller address (serving_workers
        yields the workers' addresses too)."""
        with self.serving_workers(model, model_name, n_workers, stage, batch_size, gpus, backend,
                                  options) as (controller, _):
            yield controller

    @contextlib.contextmanager
    def serving_workers(self, model: Path, model_name: str, n_workers: int, stage: str, batch_size: int = 8,
                        gpus: list[str] | None = None, backend: str = "hf", options: dict | None = None,
                        policy_version: int | None = None):
        """A controller and `n_workers` workers for `model`; yields (controller address, worker addresses). On
        leaving, these servers stop, and only these: another serving context may outlive this one (online RL
        keeps its policy's servers across stages).

        `backend` names a registered serving backend (scripts/pipeline/backends.py: hf, our transformers worker
        decoding up to `batch_size` sequences together and keeping as many prompts' KV caches; vllm), `options`
        the pipeline's serving settings it turns into worker flags (tensor_parallel_size, gpu_memory_utilization,
        max_model_len). With `gpus`, worker j runs on GPU group j mod the number of groups (the backend's GPUs
        per worker in each group). `policy_version`: the version the workers report for `model`'s weights (online
        RL; the workers' default is 0)."""
        serving_backend, options = SERVING_BACKENDS.get(backend), options or {}
        ports = Path(tempfile.mkdtemp(prefix="eto-ports-"))
        deadline = time.time() + self.ready_timeout
        mine = []
        try:
            name = f"{stage}.controller"
            mine.append(self._start(name, [sys.executable, "-m", "fastchat.serve.controller", "--host", "127.0.0.1",
                                           "--port", "0", "--port-file", str(ports / name), "--dispatch-method",
                                           "shortest_queue"]))
            controller = f"http://127.0.0.1:{self._wait_for_port(name, ports / name, stage, deadline)}"
            groups = gpu_groups(gpus or [], serving_backend.gpus_per_worker(options))
            workers = []
            for i in range(n_workers):
                name = f"{stage}.worker{i}"
                cmd = [sys.executable, "-m", serving_backend.worker_module, "--model-path", str(model),
                       "--model-names", model_name, "--host", "127.0.0.1", "--port", "0", "--port-file",
                       str(ports / name), "--controller-address", controller]
                cmd += serving_backend.worker_flags(batch_size, options)
                if policy_version is not None:
                    cmd += ["--policy-version", str(policy_version)]
                env = None
                if groups:
                    env = {**self.env, "CUDA_VISIBLE_DEVICES": ",".join(groups[i % len(groups)])}
                    print(f"[eto] {stage}: worker {i} on GPU {env['CUDA_VISIBLE_DEVICES']}", flush=True)
                mine.append(self._start(name, cmd, env=env))
                workers.append(name)
            addresses = [f"http://127.0.0.1:{self._wait_for_port(name, ports / name, stage, deadline)}"
                         for name in workers]
            self.wait_ready(controller, model_name, addresses, stage, deadline)
            yield controller, addresses
        finally:
            self.stop(mine)
            shutil.rmtree(ports, ignore_errors=True)

    def wait_ready(self, controller: str, model_name: str, workers: list[str], stage: str, deadline: float) -> None:
        """Until the controller lists `model_name` and every worker (by its address) answers with it."""
        delay = 0.2
        while time.time() < deadline:
            self.check_alive(stage)
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

    def stop(self, entries: list[tuple[str, subprocess.Popen, Path]]) -> None:
        """Stop these servers of ours, the last started first (those stopped already are skipped)."""
        for entry in reversed(entries):
            if entry in self.procs:
                stop_group(entry[1])
                self.procs.remove(entry)

    def stop_all(self) -> None:
        self.stop(list(self.procs))


class LiveServing:
    """The serving processes of a policy that changes during the run (online RL), kept across stages.

    Started when a stage first needs them (a resumed run starts them on the policy it resumes from, as that policy
    version), stopped by close() or the Services' stop_all. A new policy version reaches the running workers in place
    (POST /worker_load_weights through fastchat.serve.weights.push_weights_to_all: each worker finishes its running
    requests, loads the folder, and answers later ones as the new version) when the backend's workers can load
    weights (IN_PLACE_WEIGHT_BACKENDS); otherwise they are restarted on the new model folder."""

    def __init__(self, services: Services, name: str, model_name: str, n_workers: int, backend: str = "hf",
                 **serving):
        """`name`: the servers' log names (logs/<name>.controller.log, logs/<name>.worker<i>.log); `serving`: the
        rest of Services.serving_workers' arguments (batch_size, gpus, options)."""
        self.services, self.name, self.model_name, self.backend = services, name, model_name, backend
        self.serving = {"n_workers": n_workers, "backend": backend, **serving}
        self.stack: contextlib.ExitStack | None = None
        self.controller, self.workers, self.version = "", [], None

    def serve(self, model: Path, version: int, stage: str) -> tuple[str, dict | None]:
        """The controller address of servers answering with `model` as policy `version`, for `stage`; and what it
        took to get there: None when they served it already, else {"version", "how" (started, pushed, restarted),
        "seconds"}. StageFailed when a server has exited or a worker refused the new weights."""
        if self.stack is not None:
            self.services.check_alive(stage, when=f"while serving policy version {self.version}")
            if version == self.version:
                return self.controller, None
        started = time.time()
        if self.stack is not None and self.backend in IN_PLACE_WEIGHT_BACKENDS:
            self.push(model, version, stage)
            how = "pushed"
        else:
            how = "started" if self.stack is None else "restarted"
            self.close()
            stack = contextlib.ExitStack()
            self.controller, self.workers = stack.enter_context(self.services.serving_workers(
                model, self.model_name, stage=self.name, policy_version=version, **self.serving))
            self.stack = stack
        self.version = version
        seconds = round(time.time() - started, 2)
        print(f"[eto] {stage}: policy version {version} ({model}) {how} on {len(self.workers)} worker(s) in "
              f"{seconds} s", flush=True)
        return self.controller, {"version": version, "how": how, "seconds": seconds}

    def push(self, model: Path, version: int, stage: str) -> None:
        """`model`'s weights into every worker of the controller at once (each drains and loads on its own)."""
        try:
            push_weights_to_all(self.controller, model, version)
        except (WeightLoadError, requests.RequestException) as e:
            raise StageFailed(stage, self.services.layout.log(f"{self.name}.worker0"), 1,
                              f"the policy's workers did not load version {version} from {model}: {e}") from None

    def close(self) -> None:
        if self.stack is not None:
            self.stack.close()
            self.stack, self.controller, self.workers, self.version = None, "", [], None
