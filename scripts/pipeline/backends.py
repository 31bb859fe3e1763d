"""Serving backends: the model workers the pipeline's services start (scripts/pipeline/services.py), registered here,
one registration each, and asked by `--serving NAME`.

A backend is a worker module run as `python -m <worker_module>` that speaks FastChat's worker protocol
(fastchat.serve.base_worker) and takes our common worker flags: --model-path, --model-names, --host, --port 0
--port-file FILE (it binds a free port itself and registers that address with the controller),
--controller-address. Its registration says how the pipeline's serving settings become its own flags, how many
GPUs one worker takes, and what preflight must find before the first stage.

Adding a backend: its worker module, its tests, and one line here:

    SERVING_BACKENDS.register(ServingBackend("mine", "fastchat.serve.my_worker", my_flags), __name__)

A module outside the package registers the same way once imported (the services run in the pipeline's process).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

from scripts.registry import Registry


@dataclass(frozen=True)
class ServingBackend:
    name: str
    worker_module: str
    # (sequences a worker decodes together, the pipeline's serving options) -> the worker's own flags; the options
    # are tensor_parallel_size, gpu_memory_utilization and max_model_len (0: the model's)
    worker_flags: Callable[[int, dict], list[str]]
    gpus_per_worker: Callable[[dict], int] = lambda options: 1
    requirements: Callable[[], list[str]] = lambda: []  # problems preflight reports before the first stage


SERVING_BACKENDS: Registry[ServingBackend] = Registry("serving backend", lambda: [__name__])


def worker_flags(backend: str, batch_size: int, options: dict) -> list[str]:
    """The pipeline's serving settings as the worker flags of `backend`."""
    return SERVING_BACKENDS.get(backend).worker_flags(batch_size, options)


def hf_flags(batch_size: int, options: dict) -> list[str]:
    return ["--max-batch-size", str(batch_size), "--prefix-cache-size", str(batch_size)]


def vllm_flags(batch_size: int, options: dict) -> list[str]:
    flags = ["--tensor-parallel-size", str(options.get("tensor_parallel_size", 1)),
             "--gpu-memory-utilization", str(options.get("gpu_memory_utilization", 0.9))]
    if options.get("max_model_len"):
        flags += ["--context-len", str(options["max_model_len"])]
    return flags


def vllm_requirements() -> list[str]:
    if importlib.util.find_spec("vllm") is None:
        return ["--serving vllm: vllm is not installed (pip install vllm on a GPU machine, or --serving hf)"]
    return []


# ours: transformers with continuous batching, keeping as many prompts' KV caches as it decodes sequences
SERVING_BACKENDS.register(ServingBackend("hf", "fastchat.serve.model_worker", hf_flags), __name__)
SERVING_BACKENDS.register(ServingBackend(
    "vllm", "fastchat.serve.vllm_worker", vllm_flags,
    gpus_per_worker=lambda options: options.get("tensor_parallel_size", 1), requirements=vllm_requirements), __name__)
