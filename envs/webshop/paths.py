"""Where the WebShop data lives: $WEBSHOP_DATA, else $ETO_DATA_DIR/webshop, else <repo>/data/webshop."""
from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]


def default_data_dir() -> Path:
    if os.environ.get("WEBSHOP_DATA"):
        return Path(os.environ["WEBSHOP_DATA"])
    return Path(os.environ.get("ETO_DATA_DIR", _REPO_ROOT / "data")) / "webshop"
