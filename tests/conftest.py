"""Shared fixtures: a tiny local chat model (random weights, built once per session), real servers on
loopback and a headless browser for the page tests."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A ~0.5M-parameter Llama with a ChatML tokenizer trained here (on the agent's prompt files); never downloaded."""
    from eval_agent.prompt import PROMPT_DIR
    from fastchat.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), corpus_dirs=[PROMPT_DIR])


# -- real processes on loopback and a real headless browser, shared by the page tests -------------------

CHROMEDRIVER = "/usr/bin/chromedriver"


def free_port() -> int:
    """A port free now, for a server that cannot bind port 0 itself (the viewer, the WebShop site, torchrun's
    master): another process may take it before the server binds it. Our fastchat servers bind their own
    (listen_flags, bound_url)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bound_url(proc, port_file: Path, timeout: float = 120.0, log: Path | None = None) -> str:
    """The URL of one of our fastchat servers started with --port 0 --port-file PORT_FILE, once it has bound its
    port and written it there; fails when the process exits first (with its log, if given)."""
    import time

    deadline = time.monotonic() + timeout
    while not port_file.is_file():  # written atomically once the socket is bound
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[2] if len(proc.args) > 2 else proc.args[0]} exited with {proc.returncode}"
                        + (f"\n{log.read_text()[-3000:]}" if log else ""))
        if time.monotonic() > deadline:
            pytest.fail(f"no port in {port_file} after {timeout:.0f} s")
        time.sleep(0.05)
    return f"http://127.0.0.1:{int(port_file.read_text())}"


def listen_flags(port_file: Path) -> list[str]:
    """The flags that start one of our fastchat servers (controller, model_worker, vllm_worker, openai_api_server)
    on a free port it binds itself and writes to `port_file` (bound_url reads it): no race for the port with other
    processes on the machine."""
    return ["--port", "0", "--port-file", str(port_file)]


@contextmanager
def http_process(cmd: list[str], url: str, probe: str = "/", **popen):
    """Start `cmd` (a server that will listen at `url`), wait until `url + probe` answers, stop it at the end."""
    import subprocess
    import time
    import urllib.request

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url + probe, timeout=2)
                break
            except OSError:
                assert proc.poll() is None, f"{cmd[2] if len(cmd) > 2 else cmd[0]} exited"
                time.sleep(0.25)
        else:
            pytest.fail(f"{' '.join(cmd[:3])} did not answer within 30 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian chromium through selenium (installed with apt-get when missing and run as root)."""
    import os
    import shutil
    import subprocess

    if not (shutil.which("chromium") and os.path.exists(CHROMEDRIVER)):
        if os.geteuid() != 0:
            pytest.fail("Debian chromium is missing: run `apt-get install -y chromium chromium-driver` as root")
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"], check=True, timeout=600,
                       stdout=subprocess.DEVNULL, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
