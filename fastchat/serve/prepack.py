"""Serving-time CPU linears: weights prepacked once for oneDNN.

`torch.ops.mkldnn._linear_pointwise` on a weight reordered by `_reorder_linear_weight` is what torch.compile's
inductor emits for CPU linears with a dynamic batch size. Measured on this machine (fp32, SmolLM2-135M's shapes,
one thread) against nn.Linear's MKL GEMM: a decode step's linears at 8 rows 34 vs 57 ms, the tied 49k-vocabulary
head at 8 rows 8 vs 20 ms, one row about the same; and a row's result no longer depends on how many rows share
the product, which keeps batched greedy output equal to one-at-a-time output.
"""
from __future__ import annotations

import torch
from torch import nn

BATCH_HINT = 8  # rows the packing is tuned for; measured as fast as a hint of 1 for one-row products
EXACT_ROWS = 32  # products of up to this many rows (decode steps) run at their own size
CHUNK_ROWS = 512  # longer ones (prefills) run as products of at most this many rows, padded to a multiple of 32
# Why: oneDNN keeps a primitive (with its scratch memory) per input shape in a process-wide cache of 1,024 entries;
# prefills of every prompt length each made a new one, and a serving worker grew by about 1 MB per request for
# hours. Now at most EXACT_ROWS + CHUNK_ROWS / EXACT_ROWS shapes reach oneDNN per weight. Zero rows do not change
# the other rows' results (see above). Measured here (2 threads, SmolLM2-135M): a 2,000-token prefill 5.6 s against
# 5.1 s as one product, a 300-token one the same; decode steps are unchanged.


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, batch_hint: int = BATCH_HINT):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = self._product(rows) if rows.shape[0] <= CHUNK_ROWS else \
            torch.cat([self._product(chunk) for chunk in rows.split(CHUNK_ROWS)])
        return out.reshape(*x.shape[:-1], self.out_features)

    def _product(self, rows: torch.Tensor) -> torch.Tensor:
        n = rows.shape[0]
        if n > EXACT_ROWS and n % EXACT_ROWS:
            rows = nn.functional.pad(rows, (0, 0, 0, EXACT_ROWS - n % EXACT_ROWS))
        return packed_product(rows, self.packed, self.bias)[:n]


def packed_product(rows: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")


def can_prepack(model: nn.Module) -> bool:
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32 and torch.backends.mkldnn.is_available() \
        and packed_ops_work()


def packed_ops_work() -> bool:
    """The two oneDNN ops are private to torch (no public API offers prepacked CPU linears): a torch release may
    rename or change them. They are used only where a small product gives nn.Linear's result; else nn.Linear stays."""
    try:
        linear = nn.Linear(16, 8)
        x = torch.randn(3, 16)
        with torch.no_grad():
            return torch.allclose(PackedLinear(linear, 3)(x), linear(x), atol=1e-5)
    except (AttributeError, RuntimeError):
        return False


def prepack_linears(model: nn.Module, batch_hint: int = BATCH_HINT) -> int:
    """Replace every nn.Linear of an inference-only CPU fp32 model by a PackedLinear; returns how many."""
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    for name, linear in targets:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, PackedLinear(linear, batch_hint))
    return len(targets)
