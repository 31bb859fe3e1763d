"""Task configs: one YAML file per task, found by name.

The tasks are the configs (*.yaml) in eval_agent/configs/task/, in every folder given with
--task_path and in every folder listed in $ETO_TASK_PATH (separated by os.pathsep); a task's name is
its file name without .yaml, and two configs with the same name are an error. A config names its
loader and env classes ("module:Class"; a module may sit next to the config), its prompt files (in
the config's folder, else in the eval_agent package), the step limit, the rule for rejected
trajectories, the expert data and how to build it, and options passed to the loader and the env.
Adding a task means writing these files in any folder; nothing here changes
(eval_agent/configs/task/TEMPLATE.md says what each file must do).
"""
from __future__ import annotations

import importlib
import json
import os
import shlex
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eval_agent.paths import REPO_ROOT, data_dir

PACKAGE_DIR = Path(__file__).resolve().parent
TASK_CONFIG_DIR = PACKAGE_DIR / "configs" / "task"
TASK_PATH_ENV = "ETO_TASK_PATH"

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
    # an episode whose env has no success signal of its own (WebShop) succeeds at this reward or above
    success_reward: float = 1.0
    # {"path": expert SFT file, "build": command that writes it}; placeholders see expert_data_path()
    expert_data: dict[str, str] | None = None
    loader_options: dict[str, Any] = field(default_factory=dict)
    env_options: dict[str, Any] = field(default_factory=dict)

    def resolve(self, rel: str) -> Path:
        """A prompt file: absolute, else in the config's folder, else in the eval_agent package."""
        p = Path(rel)
        if p.is_absolute():
            return p
        local = self.path.parent / p
        return local if local.exists() else PACKAGE_DIR / p

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

    def expert_data_path(self) -> Path:
        """expert_data.path with {data} ($ETO_DATA_DIR), {repo} and {python} filled in; a relative
        path is in the config's folder."""
        path = Path(self._fill("path", self.expert_data["path"]))
        return path if path.is_absolute() else self.path.parent / path

    def expert_build_command(self) -> list[str]:
        """expert_data.build as arguments, placeholders filled in ({path}: expert_data_path()).
        It runs in the config's folder."""
        path = str(self.expert_data_path())
        try:
            tokens = shlex.split(self.expert_data["build"])
        except ValueError as e:
            raise ConfigError(f"{self.path}: field 'expert_data.build': {e}") from None
        return [self._fill("build", token, path=path) for token in tokens]

    def _fill(self, key: str, text: str, **extra: str) -> str:
        values = {"data": str(data_dir()), "repo": str(REPO_ROOT), "python": sys.executable, **extra}
        try:
            return text.format(**values)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"{self.path}: field 'expert_data.{key}': cannot fill in {text!r} ({e!r}); "
                              f"placeholders: {', '.join('{' + k + '}' for k in sorted(values))}") from None


def import_object(spec: str, config_path: Path, field_name: str):
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ConfigError(f"{config_path}: field '{field_name}' must look like 'package.module:Class', got {spec!r}")
    # a task's modules may sit next to its config, outside any package; appended, so they never
    # shadow installed modules
    folder = str(Path(config_path).resolve().parent)
    if folder not in sys.path:
        sys.path.append(folder)
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{config_path}: field '{field_name}': cannot import {spec!r} ({e})") from e


def task_folders(task_path: Iterable[str | Path] = ()) -> list[Path]:
    """Where task configs are found: the built-in folder, the --task_path folders, then $ETO_TASK_PATH's."""
    given = [(p, "--task_path") for p in task_path]
    given += [(p, f"${TASK_PATH_ENV}") for p in os.environ.get(TASK_PATH_ENV, "").split(os.pathsep) if p]
    folders = [TASK_CONFIG_DIR]
    for folder, source in given:
        folder = Path(folder).resolve()
        if not folder.is_dir():
            raise ConfigError(f"{source}: task config folder {folder} not found")
        if folder not in folders:
            folders.append(folder)
    return folders


def discover_tasks(task_path: Iterable[str | Path] = ()) -> dict[str, Path]:
    """{task name: config file} over task_folders(task_path)."""
    found: dict[str, Path] = {}
    for folder in task_folders(task_path):
        for path in sorted(folder.glob("*.yaml")):
            if path.stem in found:
                raise ConfigError(f"two task configs named {path.stem!r}: {found[path.stem]} and {path}; "
                                  "rename one (a task's name is its file name)")
            found[path.stem] = path
    return found


def describe_tasks(task_path: Iterable[str | Path] = ()) -> str:
    """The discovered task names, for --help texts."""
    try:
        return ", ".join(sorted(discover_tasks(task_path)))
    except ConfigError as e:
        return f"none ({e})"


def load_task_config(name_or_path: str | Path, task_path: Iterable[str | Path] = ()) -> TaskConfig:
    """Load a discovered task by name (see task_folders), or any YAML file by path."""
    path, name = Path(name_or_path), str(name_or_path)
    if not path.suffix:
        known = discover_tasks(task_path)
        if name not in known:
            folders = ", ".join(str(f) for f in task_folders(task_path))
            raise ConfigError(f"task config {name}.yaml not found in {folders}; known tasks: "
                              f"{', '.join(sorted(known))} (add a folder with --task_path or ${TASK_PATH_ENV})")
        path = known[name]
    if not path.exists():
        raise ConfigError(f"task config {path} not found")
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
    # tasks are found by file name, so the name inside must agree
    if raw["name"] != path.stem:
        raise ConfigError(f"{path}: field 'name' is {raw['name']!r}; it must be the file name, {path.stem!r}")
    bar = raw.get("success_reward", 1.0)
    if isinstance(bar, bool) or not isinstance(bar, (int, float)) or not 0 < bar <= 1:
        raise ConfigError(f"{path}: field 'success_reward' must be a number in (0, 1]")
    extra = raw.get("rejected_extra_rounds")
    if extra is not None and (isinstance(extra, bool) or not isinstance(extra, int) or extra < 0):
        raise ConfigError(f"{path}: field 'rejected_extra_rounds' must be a non-negative integer or null")
    for key in ("loader_options", "env_options"):
        if not isinstance(raw.get(key, {}), dict):
            raise ConfigError(f"{path}: field '{key}' must be a mapping")
    _check_expert_data(path, raw.get("expert_data"))
    cfg = TaskConfig(path=path, **raw)
    for key in ("instruction", "icl_example"):
        if not cfg.resolve(raw[key]).is_file():
            raise ConfigError(f"{path}: field '{key}': {raw[key]} is in neither {path.parent} nor {PACKAGE_DIR}")
    if cfg.expert_data is not None:  # bad placeholders fail now, not at the pipeline's expert_data stage
        cfg.expert_build_command()
    return cfg


def _check_expert_data(path: Path, expert: Any) -> None:
    if expert is None:
        return
    if not isinstance(expert, dict) or set(expert) != {"path", "build"}:
        raise ConfigError(f"{path}: field 'expert_data' must be a mapping with the keys 'path' and 'build' only")
    for key in ("path", "build"):
        if not isinstance(expert[key], str) or not expert[key].strip():
            raise ConfigError(f"{path}: field 'expert_data.{key}' must be a non-empty string")
