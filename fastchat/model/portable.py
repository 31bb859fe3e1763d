"""Model folders that transformers 4.x and 5.x both load correctly (vLLM and other tools may pin 4.x).

transformers 5 writes `rope_theta` only inside `rope_parameters` (a 4.x loader then silently falls back to its
default theta), `dtype` instead of `torch_dtype`, and a tokenizer class, `TokenizersBackend`, that 4.x lacks.
`make_portable(folder)` adds the 4.x spellings beside the 5.x ones; both generations read the same values.
"""
from __future__ import annotations

import json
from pathlib import Path

from fastchat.records import write_json_atomic

# a fast tokenizer from tokenizer.json: a class both generations know
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def _update_json(path: Path, update) -> None:
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    update(data)
    write_json_atomic(path, data)


def _portable_config(config: dict) -> None:
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") == "default":
            config.setdefault("rope_scaling", None)
        else:  # 4.x reads scaled rope from rope_scaling (with its type under "type" and "rope_type")
            config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"} | {"type": rope["rope_type"]}
    if "dtype" in config:
        config["torch_dtype"] = config["dtype"]


def _portable_tokenizer(tokenizer_config: dict) -> None:
    if tokenizer_config.get("tokenizer_class") == "TokenizersBackend":
        tokenizer_config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS


def make_portable(folder: str | Path) -> None:
    folder = Path(folder)
    _update_json(folder / "config.json", _portable_config)
    if (folder / "tokenizer.json").is_file():
        _update_json(folder / "tokenizer_config.json", _portable_tokenizer)
