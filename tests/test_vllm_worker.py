"""The vLLM worker without vLLM: how our request becomes vLLM's sampling arguments and how vLLM's outputs
become our stream chunks (the one engine call is the only part left to a GPU machine)."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from fastchat.serve.engine import GenParams
from fastchat.serve.vllm_worker import VLLM_MISSING, sampling_kwargs, stream_chunk


def test_greedy_request_maps_to_greedy_sampling_with_our_stops():
    gp = GenParams.parse({"prompt": "p", "temperature": 0.0, "top_p": 0.5, "max_new_tokens": 64,
                          "stop": ["\nObservation:", "<|im_end|>"], "stop_token_ids": [2]})
    kwargs = sampling_kwargs(gp, eos_token_id=0)
    assert kwargs["temperature"] == 0.0 and kwargs["top_p"] == 1.0  # greedy ignores top_p, as our engine
    assert kwargs["max_tokens"] == 64 and kwargs["n"] == 1
    assert kwargs["stop"] == ["\nObservation:", "<|im_end|>"] and kwargs["stop_token_ids"] == [2, 0]


def test_sampled_request_keeps_its_parameters_and_ignore_eos_drops_the_eos_stop():
    gp = GenParams.parse({"prompt": "p", "temperature": 0.7, "top_p": 0.9, "top_k": 40,
                          "repetition_penalty": 1.1, "max_new_tokens": 8, "ignore_eos": True})
    kwargs = sampling_kwargs(gp, eos_token_id=0)
    assert (kwargs["temperature"], kwargs["top_p"], kwargs["top_k"], kwargs["repetition_penalty"]) == (0.7, 0.9, 40, 1.1)  # noqa: E501
    assert kwargs["stop"] is None and kwargs["stop_token_ids"] == [] and kwargs["ignore_eos"] is True


def _output(text, n_tokens, finished, reason):
    return SimpleNamespace(finished=finished, outputs=[SimpleNamespace(text=text, token_ids=list(range(n_tokens)),
                                                                       finish_reason=reason)])


def test_outputs_become_our_stream_chunks():
    first = stream_chunk(_output("Thought:", 2, False, None), "", n_prompt=10)
    last = stream_chunk(_output("Thought: go.\nAction: look", 9, True, "stop"), "", n_prompt=10)
    assert first == {"text": "Thought:", "error_code": 0, "finish_reason": None,
                     "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}}
    assert last["finish_reason"] == "stop" and last["usage"]["completion_tokens"] == 9
    assert stream_chunk(_output("x", 1, True, "length"), "PROMPT", 3)["text"] == "PROMPTx"  # echo


def test_worker_without_vllm_says_so():
    proc = subprocess.run([sys.executable, "-m", "fastchat.serve.vllm_worker", "--model-path", "/nonexistent"],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 2:
        pytest.fail(f"expected exit 2 without vllm, got {proc.returncode}: {proc.stderr[-500:]}")
    assert VLLM_MISSING in proc.stderr
