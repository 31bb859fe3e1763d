"""Agents and agent configs.

An agent config is a JSON file (eval_agent/configs/model/<name>.json, or any path):
    {"agent_class": "FastChatAgent", "config": {"model_name": ..., "controller_address": ..., ...}}
`agent_class` is one of the registered names below or a "package.module:Class" path. Generation options a config
leaves out (max_new_tokens, temperature, top_p) take the defaults in eval_agent/agents/base.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eval_agent.agents.base import Agent, ContextOverflowError, ModelError
from eval_agent.config import PACKAGE_DIR, ConfigError, import_object

AGENT_CONFIG_DIR = PACKAGE_DIR / "configs" / "model"

AGENT_CLASSES = {
    "FastChatAgent": "eval_agent.agents.fastchat_agent:FastChatAgent",
    "fastchat": "eval_agent.agents.fastchat_agent:FastChatAgent",
    "OpenAIAgent": "eval_agent.agents.openai_agent:OpenAIAgent",
    "openai": "eval_agent.agents.openai_agent:OpenAIAgent",
}

__all__ = ["Agent", "ContextOverflowError", "ModelError", "load_agent_config", "make_agent", "AGENT_CONFIG_DIR"]


def load_agent_config(name_or_path: str | Path, agent_path: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Find `<agent_path>/<name>.json` (default folder: eval_agent/configs/model) or a file path; validate it."""
    path = Path(name_or_path)
    if not path.is_file():
        folder = Path(agent_path) if agent_path else AGENT_CONFIG_DIR
        path = folder / (str(name_or_path) if str(name_or_path).endswith(".json") else f"{name_or_path}.json")
    if not path.is_file():
        known = sorted(p.stem for p in AGENT_CONFIG_DIR.glob("*.json"))
        raise ConfigError(f"agent config {path} not found; built-in agent configs: {known}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("agent_class"), str):
        raise ConfigError(f"{path}: needs a string field 'agent_class' ({sorted(AGENT_CLASSES)} or 'module:Class')")
    if not isinstance(raw.get("config", {}), dict):
        raise ConfigError(f"{path}: field 'config' must be a mapping of agent options")
    return path, raw


def make_agent(path: Path, raw: dict[str, Any], **overrides: Any) -> Agent:
    """Build the agent; `overrides` (command-line flags, None = not given) replace config options."""
    spec = AGENT_CLASSES.get(raw["agent_class"], raw["agent_class"])
    cls = import_object(spec, path, "agent_class")
    options = dict(raw.get("config", {}))
    options.update({k: v for k, v in overrides.items() if v is not None})
    if not options.get("model_name"):
        raise ConfigError(f"{path}: no model name: set config.model_name or pass --model_name")
    try:
        return cls(**options)
    except TypeError as e:
        raise ConfigError(f"{path}: {e}") from e
