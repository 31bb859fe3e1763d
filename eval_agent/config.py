"""Task configs: one YAML file per benchmark under eval_agent/configs/task/.

A config names the loader and env classes ("module:Class"), the prompt files
(relative to the eval_agent package), the step limit, and options passed to the
loader and the env. Adding a benchmark means adding a config, a loader, an env
and a prompt; nothing here changes.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PACKAGE_DIR = Path(__file__).resolve().parent
TASK_CONFIG_DIR = PACKAGE_DIR / "configs" / "task"

_REQUIRED = {"name": str, "loader": str, "env": str, "instruction": str, "icl_example": str, "max_steps": int}


class ConfigError(ValueError):
    pass


@dataclass
class TaskConfig:
    path: Path
    name: str
    loader: str
    env: str
    instruction: str
    icl_example: str
    max_steps: int
    icl_num: int = 1
    # pairs: a losing agent trajectory is cut to the expert's rounds + this many (None: no cap)
    rejected_extra_rounds: int | None = None
    loader_options: dict[str, Any] = field(default_factory=dict)
    env_options: dict[str, Any] = field(default_factory=dict)

    def resolve(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else PACKAGE_DIR / p

    def loader_class(self):
        return import_object(self.loader, self.path, "loader")

    def env_class(self):
        return import_object(self.env, self.path, "env")

    def make_loader(self):
        return self.loader_class()(**self.loader_options)

    def instruction_text(self) -> str:
        return self.resolve(self.instruction).read_text(encoding="utf-8").strip()

    def icl_messages(self) -> list[dict[str, str]]:
        """The 1-shot example as a list of {"role", "content"} messages (user first)."""
        path = self.resolve(self.icl_example)
        try:
            messages = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        for i, m in enumerate(messages):
            if m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), str):
                raise ConfigError(f"{path}: message {i} needs 'role' user/assistant and a string 'content'")
        return messages


def import_object(spec: str, config_path: Path, field_name: str):
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ConfigError(f"{config_path}: field '{field_name}' must look like 'package.module:Class', got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{config_path}: field '{field_name}': cannot import {spec!r} ({e})") from e


def load_task_config(name_or_path: str | Path) -> TaskConfig:
    """Load `webshop`, `alfworld`, ... from the config folder, or any YAML file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = TASK_CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in TASK_CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"task config {path} not found; known tasks: {known}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for key, typ in _REQUIRED.items():
        if key not in raw:
            raise ConfigError(f"{path}: missing required field '{key}'")
        if not isinstance(raw[key], typ):
            raise ConfigError(f"{path}: field '{key}' must be {typ.__name__}, got {type(raw[key]).__name__}")
    known_fields = set(TaskConfig.__dataclass_fields__) - {"path"}
    unknown = set(raw) - known_fields
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {sorted(unknown)}; allowed: {sorted(known_fields)}")
    extra = raw.get("rejected_extra_rounds")
    if extra is not None and (isinstance(extra, bool) or not isinstance(extra, int) or extra < 0):
        raise ConfigError(f"{path}: field 'rejected_extra_rounds' must be a non-negative integer or null")
    for key in ("loader_options", "env_options"):
        if not isinstance(raw.get(key, {}), dict):
            raise ConfigError(f"{path}: field '{key}' must be a mapping")
    return TaskConfig(path=path, **raw)
