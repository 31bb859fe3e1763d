"""Command-line entry points: the CLI chat and the vLLM worker's message when vllm is missing."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest


def test_cli_answers_a_chat_message_without_servers(tiny_model_dir):
    r = subprocess.run([sys.executable, "-m", "fastchat.serve.cli", "--model-path", str(tiny_model_dir),
                        "--message", "look around", "--max-new-tokens", "4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from fastchat.serve.cli import answer
    from fastchat.serve.model_worker import TransformersBackend

    expected = answer(TransformersBackend(tiny_model_dir), [{"role": "user", "content": "look around"}], 4, 0.0)
    assert len(r.stdout) >= 2 and r.stdout.strip() == expected, "the greedy answer goes to stdout"


def test_cli_names_a_missing_model_folder(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastchat.serve.cli", "--model-path", str(tmp_path / "nope"),
                        "--message", "hi"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and str(tmp_path / "nope") in r.stderr


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_worker_without_vllm_says_so(tiny_model_dir):
    r = subprocess.run([sys.executable, "-m", "fastchat.serve.vllm_worker", "--model-path", str(tiny_model_dir)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "vllm is not installed" in r.stderr and "fastchat.serve.model_worker" in r.stderr
