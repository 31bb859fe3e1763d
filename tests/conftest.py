"""Shared fixtures: a tiny local chat model (random weights, built once per session)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A ~0.5M-parameter Llama with a ChatML tokenizer trained here; never downloaded."""
    from fastchat.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
