"""Where data and models live. Every path can be moved with an environment variable.

ETO_DATA_DIR     fetched data and built trajectory files      (default: <repo>/data)
ALFWORLD_DATA    ALFWorld game files                           (default: $ETO_DATA_DIR/alfworld)
WEBSHOP_DATA     WebShop catalog, goals, search index          (default: $ETO_DATA_DIR/webshop)
ETO_MODELS_DIR   converted models, the default model included  (default: <repo>/models)
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    return Path(os.environ.get("ETO_DATA_DIR", REPO_ROOT / "data"))


def alfworld_data_dir() -> Path:
    return Path(os.environ.get("ALFWORLD_DATA", data_dir() / "alfworld"))


def webshop_data_dir() -> Path:
    return Path(os.environ.get("WEBSHOP_DATA", data_dir() / "webshop"))


def eto_split_dir() -> Path:
    """ETO's split files (indices, max steps), unpacked by setup.sh."""
    return data_dir() / "eto"


def models_dir() -> Path:
    return Path(os.environ.get("ETO_MODELS_DIR", REPO_ROOT / "models"))
