"""This machine's limits for a model, measured in the same run as the benchmark that reports against them.

    python -m bench.roofline [--num-threads 2] [--model-path DIR] [--device cuda --dtype bfloat16]

Two numbers bound everything we time:
- memory read bandwidth (GB/s): one matrix-vector product over a weight-sized matrix, the shape of a decode
  step at batch 1, where every weight is read once;
- matmul throughput (GFLOP/s): products of the model's own shapes (hidden x intermediate) on a batch of rows.
From them: decoding at batch b can reach at most b x bandwidth / weight bytes tokens/s (weights read once per
step, KV-cache reads ignored), and training at most throughput / (6 x parameters) tokens/s (forward 2, backward 4
FLOP per parameter per token; attention's own FLOP ignored). By default on the CPU in fp32; with --device cuda
on the GPU (each timing synchronised), in the given dtype (weight bytes at that dtype's size).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _best_seconds(fn, repeats: int, device: str = "cpu") -> float:
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    fn()  # warm up
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def memory_bandwidth_gbs(weight_bytes: int = 540_000_000, repeats: int = 5, device: str = "cpu",
                         dtype: torch.dtype = torch.float32) -> float:
    cols, size = 4096, torch.tensor([], dtype=dtype).element_size()
    rows = max(1, weight_bytes // size // cols)
    w = torch.randn(rows, cols, device=device, dtype=dtype)
    x = torch.randn(cols, device=device, dtype=dtype)
    return rows * cols * size / _best_seconds(lambda: torch.mv(w, x), repeats, device) / 1e9


def matmul_gflops(hidden: int = 576, intermediate: int = 1536, tokens: int = 2048, repeats: int = 5,
                  device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    a = torch.randn(tokens, hidden, device=device, dtype=dtype)
    b = torch.randn(hidden, intermediate, device=device, dtype=dtype)
    c = torch.randn(intermediate, hidden, device=device, dtype=dtype)

    def work():
        torch.mm(torch.mm(a, b), c)

    return 2 * 2 * tokens * hidden * intermediate / _best_seconds(work, repeats, device) / 1e9


def model_size(model_path: str | Path | None) -> dict:
    """Parameter count and fp32 weight bytes (tied embeddings counted once), from the config alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    text = config.get_text_config()
    head = model.get_output_embeddings().weight.numel()
    embedding_only = 0 if config.tie_word_embeddings else model.get_input_embeddings().weight.numel()
    return {"params": params, "fp32_bytes": params * 4, "hidden": config.hidden_size,
            "intermediate": getattr(config, "intermediate_size", 4 * config.hidden_size),
            "layers": text.num_hidden_layers, "head_params": head, "body_params": params - head - embedding_only,
            "attention_dim": text.num_attention_heads * (getattr(text, "head_dim", None)
                                                     or text.hidden_size // text.num_attention_heads)}


def measure(num_threads: int, model_path: str | Path | None = None, device: str = "cpu",
            dtype: torch.dtype = torch.float32) -> dict:
    """The machine's limits (on `device`, in `dtype`) and, with a model, the tokens/s they allow it."""
    torch.set_num_threads(num_threads)
    out = {"num_threads": num_threads}
    if device != "cpu" or dtype != torch.float32:  # CPU fp32 results keep their old keys only
        out.update(device=device, dtype=str(dtype).removeprefix("torch."))
    size = model_size(model_path) if model_path else None
    weight_bytes = size["params"] * torch.tensor([], dtype=dtype).element_size() if size else 540_000_000
    repeats = 20 if torch.device(device).type == "cuda" else 5
    out["memory_gbs"] = round(memory_bandwidth_gbs(weight_bytes, repeats, device, dtype), 2)
    shapes = (size["hidden"], size["intermediate"]) if size else (576, 1536)
    out["matmul_gflops"] = round(matmul_gflops(*shapes, repeats=repeats, device=device, dtype=dtype), 1)
    if size:
        out.update(params=size["params"], fp32_weight_bytes=size["fp32_bytes"], weight_bytes=weight_bytes)
        out["decode_tokens_per_s_per_sequence"] = round(decode_limit(out, 1), 1)
        out["train_tokens_per_s"] = round(train_limit(out), 1)
    return out


def decode_limit(limits: dict, batch: int) -> float:
    """Upper bound on decoded tokens/s with `batch` sequences per step (weights read once per step)."""
    return batch * limits["memory_gbs"] * 1e9 / limits.get("weight_bytes", limits["fp32_weight_bytes"])


def train_limit(limits: dict) -> float:
    """Upper bound on trained tokens/s (6 FLOP per parameter per token)."""
    return limits["matmul_gflops"] * 1e9 / (6 * limits["params"])


def training_flops(size: dict, work: dict) -> float:
    """Matmul FLOPs a training pass performed on `work` (a trainer summary's counts): forward 2 and backward 4 per
    weight per token through the decoder layers and per head weight at each position the LM head ran at, and 12 per
    attention dimension per layer per query-key pair (QK^T and AV, forward and backward). Elementwise work (norms,
    rotary, activations, softmax) and the optimizer are not counted."""
    return (6 * size["body_params"] * work["computed_tokens"] + 6 * size["head_params"] * work["head_positions"]
            + 12 * size["layers"] * size["attention_dim"] * work["attention_pairs"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-threads", type=int, default=2)
    p.add_argument("--model-path", default=None, help="default: the embedded default model")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = p.parse_args()
    if a.model_path is None:
        from fastchat.constants import default_model_path
        a.model_path = default_model_path()
    print(json.dumps(measure(a.num_threads, a.model_path, a.device, getattr(torch, a.dtype)), indent=2))


if __name__ == "__main__":
    main()
