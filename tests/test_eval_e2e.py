"""End to end: the real controller and model worker on loopback with the tiny local model, and
`python -m eval_agent.main` as a user runs it, on a few tasks of every environment; then a worker
killed mid-run, the failed episodes reported, and a rerun with a new worker completing them.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from eval_agent.config import TASK_CONFIG_DIR
from tests.conftest import bound_url, listen_flags

pytestmark = pytest.mark.slow
MODEL = "tiny"
ENVS = [name for name in ("sciworld", "alfworld", "webshop") if (TASK_CONFIG_DIR / f"{name}.yaml").exists()]


class Servers:
    """The controller and workers this module starts; each is stopped by its own process id."""

    def __init__(self, tmp: Path, model_dir: Path):
        self.tmp, self.model_dir = tmp, model_dir
        self.procs: list[subprocess.Popen] = []
        self.controller = self._start_server("controller", ["fastchat.serve.controller", "--heart-beat-expiration",
                                                            "3"])[1]

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def _start_server(self, name: str, args: list[str]) -> tuple[subprocess.Popen, str]:
        """One of our fastchat servers on a port it binds itself: its process and URL."""
        port_file = self.tmp / f"{name}.port"
        proc = self._start(name, [args[0], *listen_flags(port_file), *args[1:]])
        return proc, bound_url(proc, port_file, log=self.tmp / f"{name}.log")

    def start_worker(self, name: str) -> subprocess.Popen:
        proc, address = self._start_server(name, ["fastchat.serve.model_worker", "--model-path",
                                                  str(self.model_dir), "--model-names", MODEL, "--controller-address",
                                                  self.controller, "--heart-beat-interval", "1", "--device", "cpu"])
        deadline = time.monotonic() + 180
        while address not in self.worker_addresses():
            assert proc.poll() is None, (self.tmp / f"{name}.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"worker {name} did not register within 180 s"
            time.sleep(0.5)
        return proc

    def worker_addresses(self) -> list[str]:
        try:
            r = httpx.post(f"{self.controller}/get_worker_address", json={"model": MODEL}, timeout=5)
            return [r.json()["address"]] if r.json().get("address") else []
        except (httpx.HTTPError, ValueError):
            return []

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_model_dir):
    s = Servers(tmp_path_factory.mktemp("servers"), tiny_model_dir)
    try:
        s.start_worker("worker1")
        yield s
    finally:
        s.stop()


def agent_config(tmp: Path, controller: str) -> Path:
    path = tmp / "agent.json"
    path.write_text(json.dumps({"agent_class": "FastChatAgent", "config": {
        "model_name": MODEL, "controller_address": controller, "max_new_tokens": 8, "timeout": 120,
        "max_retries": 2, "retry_backoff": 0.2}}))
    return path


def run_main(tmp: Path, controller: str, env: str, out: Path, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "eval_agent.main", "--agent_config", str(agent_config(tmp, controller)),
           "--exp_config", env, "--split", "test", "--output_path", str(out), "--max_steps", "2", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    output, _ = proc.communicate(timeout=300)
    return proc.returncode, output


def task_files(out: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in out.glob("*.json") if p.name != "metrics.json"}


@pytest.mark.skipif(not ENVS, reason="no environment configs yet")
@pytest.mark.parametrize("env", ENVS)
def test_eval_main_against_the_real_controller_and_worker(servers, env, tmp_path):
    out = tmp_path / "out"
    code, output = run_main(tmp_path, servers.controller, env, out, "--max_tasks", "2", "--num_workers", "2")
    assert code == 0, output[-3000:]
    records = task_files(out)
    assert len(records) == 2
    for rec in records.values():
        meta, turns = rec["meta"], rec["conversations"]
        assert meta["finished"] and meta["terminate_reason"] in ("max_steps", "done", "success")
        assert 1 <= meta["steps"] <= 2 and (meta["task_config"], meta["model_name"]) == (env, MODEL)
        assert [t["from"] for t in turns[:4]] == ["human", "gpt", "human", "gpt"] and turns[1]["value"] == "OK"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_tasks"] == 2 and metrics["num_infrastructure_failures"] == 0
    rewards = [r["meta"]["reward"] for r in records.values()]
    assert metrics["average_reward"] == pytest.approx(sum(rewards) / 2)
    assert f"average reward {metrics['average_reward']:.4f}" in output


@pytest.mark.skipif(not ENVS, reason="no environment configs yet")
def test_killing_the_worker_fails_episodes_and_a_rerun_completes_them(servers, tmp_path):
    env, out, n = ("webshop" if "webshop" in ENVS else ENVS[0]), tmp_path / "out", 4
    proc = run_main(tmp_path, servers.controller, env, out, "--max_tasks", str(n), wait=False)
    deadline = time.monotonic() + 240
    while not task_files(out) and proc.poll() is None:  # the first episode is done: kill the worker
        assert time.monotonic() < deadline
        time.sleep(0.1)
    worker = servers.procs[-1]
    os.killpg(worker.pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, output[-3000:]
    assert "rerun" in output
    metrics = json.loads((out / "metrics.json").read_text())
    failed = metrics["infrastructure_failures"].get("model_error", 0)
    assert failed >= 1 and metrics["num_tasks"] == n
    finished = {name: rec for name, rec in task_files(out).items()
                if not rec["meta"]["terminate_reason"].startswith("model_error")}
    assert len(finished) + failed == n and finished
    finished_text = {name: (out / name).read_text() for name in finished}

    time.sleep(3.5)  # past the controller's heartbeat expiration: the dead worker is dropped
    assert servers.worker_addresses() == []
    servers.start_worker("worker2")
    code, output = run_main(tmp_path, servers.controller, env, out, "--max_tasks", str(n))
    assert code == 0, output[-3000:]
    assert f"{len(finished)} already done, {failed} to run" in output
    assert all((out / name).read_text() == text for name, text in finished_text.items())
    records = task_files(out)
    assert len(records) == n and all(r["meta"]["terminate_reason"] == "max_steps" for r in records.values())
    assert json.loads((out / "metrics.json").read_text())["num_infrastructure_failures"] == 0
