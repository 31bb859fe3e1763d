"""A FastChat-compatible model worker on transformers, with continuous batching.

    python -m fastchat.serve.model_worker --model-path models/SmolLM2-135M-Instruct \
        [--model-names a,b] [--host 127.0.0.1] [--port 21002] [--worker-address http://127.0.0.1:21002] \
        [--controller-address http://127.0.0.1:21001] [--device cpu|cuda] [--dtype auto|float32|bfloat16|float16] \
        [--conv-template NAME] [--max-batch-size 8] [--no-batching] [--context-len N] [--num-threads N] \
        [--prefix-cache-size 8] [--no-prepack]

Serves /worker_generate_stream (NUL-delimited JSON chunks), /worker_generate,
/worker_get_status, /count_token, /model_details, /worker_get_conv_template.
Concurrent requests share forward passes (see fastchat.serve.engine);
--no-batching serves one request at a time.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from fastchat.constants import default_model_path
from fastchat.conversation import template_for_model
from fastchat.serve.base_worker import Worker, add_worker_args, build_app, worker_socket
from fastchat.serve.engine import BatchingEngine
from fastchat.serve.hosts import serve
from fastchat.serve.prepack import can_prepack, prepack_linears


def pick_dtype(device: str, dtype: str) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # bf16 matmuls are far slower than fp32 on most CPUs


def context_length(config) -> int:
    """As FastChat: the first length field of the config, scaled by RoPE scaling if any."""
    rope = getattr(config, "rope_scaling", None) or {}
    factor = rope.get("factor", 1) if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) != "default" \
        else 1
    for key in ("max_sequence_length", "seq_length", "max_position_embeddings"):
        v = getattr(config, key, None)
        if v:
            return int(factor * v)
    return 2048


class TransformersBackend:
    """A loaded model and tokenizer behind a BatchingEngine."""

    def __init__(self, model_path: str | Path, device: str = "cpu", dtype: str = "auto",
                 conv_template: str | None = None, max_batch_size: int = 8, context_len: int | None = None,
                 prefix_cache_size: int = 8, prepack: bool = True):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise SystemExit(f"--model-path {path}: no config.json there; give a local transformers model folder")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(device, dtype)).to(device).eval()
        if prepack and can_prepack(self.model):
            prepack_linears(self.model)
        self.context_len = context_len or context_length(self.model.config)
        self.template = template_for_model(path, conv_template, self.tokenizer)
        self.engine = BatchingEngine(self.model, self.tokenizer, self.context_len, max_batch_size,
                                     prefix_cache_size)

    def queue_length(self) -> int:
        return self.engine.queue_length()

    def stats(self) -> dict:
        return dict(self.engine.stats)

    def count_tokens(self, prompt: str) -> int:
        return self.engine.count_tokens(prompt)

    def agenerate_stream(self, params: dict):
        return self.engine.agenerate_stream(params)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_worker_args(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-batch-size", type=int, default=8, help="most sequences decoded in one forward pass")
    p.add_argument("--no-batching", action="store_true", help="serve one request at a time")
    p.add_argument("--prefix-cache-size", type=int, default=8, help="recent prompts whose KV cache is kept for "
                   "reuse by prompts that start the same way (0 = off)")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: torch's choice; "
                   "1 is often faster on a busy machine)")
    p.add_argument("--no-prepack", action="store_true", help="keep nn.Linear's MKL GEMM on CPU instead of "
                   "weights prepacked for oneDNN (fastchat.serve.prepack)")
    a = p.parse_args(argv)
    sock = worker_socket(a)  # bound before the model loads: --port 0 gets its port now
    if a.num_threads:
        torch.set_num_threads(a.num_threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    model_path = Path(a.model_path) if a.model_path else default_model_path()
    backend = TransformersBackend(model_path, a.device, a.dtype, a.conv_template,
                                  1 if a.no_batching else a.max_batch_size, a.context_len, a.prefix_cache_size,
                                  not a.no_prepack)
    names = a.model_names.split(",") if a.model_names else [model_path.name]
    worker = Worker(backend, names, a.worker_address or f"http://{a.host}:{a.port}", a.controller_address,
                    register=not a.no_register, heart_beat_interval=a.heart_beat_interval)
    logging.getLogger("fastchat.worker").info("serving %s (template %s, context %d, batch %d) on %s",
                                              names, backend.template.name, backend.context_len,
                                              backend.engine.max_batch_size, worker.worker_address)
    serve(build_app(worker), sock, a.port_file)


if __name__ == "__main__":
    main()
