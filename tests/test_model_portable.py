"""Model folders we write load the same in transformers 4.x and 5.x: the fields both generations read."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoTokenizer

from fastchat.constants import default_model_path
from fastchat.model.portable import PORTABLE_TOKENIZER_CLASS, make_portable


def assert_portable(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    # 4.x reads rope_theta at the top level (else it silently uses its default); 5.x reads rope_parameters
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert AutoConfig.from_pretrained(folder).rope_parameters["rope_theta"] == config["rope_theta"]
    assert config["torch_dtype"] == config["dtype"]
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == PORTABLE_TOKENIZER_CLASS  # 4.x has no TokenizersBackend
    text = "Thought: look.\nAction: go to desk 1"
    assert AutoTokenizer.from_pretrained(folder)(text).input_ids == \
        Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def test_tiny_model_folder_is_portable(tiny_model_dir):
    assert_portable(tiny_model_dir)


def test_default_model_folder_is_portable():
    folder = default_model_path()
    if not (folder / "config.json").exists():
        pytest.fail(f"{folder} missing: setup.sh converts the default model")
    assert_portable(folder)


def test_make_portable_keeps_scaled_rope_for_4x(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16", "rope_parameters": {
        "rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0}}))
    make_portable(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_theta"] == 500000.0 and config["torch_dtype"] == "bfloat16"
    assert config["rope_scaling"] == {"rope_type": "llama3", "type": "llama3", "factor": 8.0}
