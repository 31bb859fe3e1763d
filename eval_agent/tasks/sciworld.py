"""ScienceWorld tasks from ETO's split files (data/eto/sciworld/).

Splits: train (1,483), dev = ETO's "seen" test set (194), test = ETO's "unseen"
test set (211). Each index file is a list of [task_name, variation] in ETO's
spelling ("task-1-boil"); per-task step limits come from max_steps.json.

Task ids are "sciworld-<simulator task name>-<variation>", e.g.
"sciworld-measure-melting-point-known-substance-326" (no parentheses, so they are
safe file names). Facts about the files: no split repeats a pair; 54 dev pairs
also appear in train; train holds 357 of the simulator's own dev variations;
dev and test are disjoint; only 24 of the 30 task types occur (none of the
inclined-plane and Mendelian-genetics tasks).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eval_agent.envs.sciworld_env import canonical_task_name
from eval_agent.paths import eto_split_dir
from eval_agent.tasks.base import Task, TaskLoader


def task_id(task_name: str, variation: int) -> str:
    return f"sciworld-{canonical_task_name(task_name)}-{int(variation)}"


class SciWorldTaskLoader(TaskLoader):
    """loader_options: `split_dir` (default $ETO_DATA_DIR/eto/sciworld)."""

    def __init__(self, split_dir: str | None = None, **options: Any):
        super().__init__(split_dir=split_dir, **options)
        self.split_dir = Path(split_dir) if split_dir else eto_split_dir() / "sciworld"

    def _read_json(self, name: str):
        path = self.split_dir / name
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run `python -m scripts.fetch_data` (or setup.sh) first")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e

    def max_steps_table(self) -> dict[str, int]:
        path = self.split_dir / "max_steps.json"
        table = self._read_json("max_steps.json")
        if not isinstance(table, dict) or not all(isinstance(v, int) for v in table.values()):
            raise ValueError(f"{path}: expected a mapping task_name -> integer step limit")
        return {canonical_task_name(k): v for k, v in table.items()}

    def _load(self, split: str) -> list[Task]:
        name = f"{split}_indices.json"
        pairs = self._read_json(name)
        limits = self.max_steps_table()
        tasks = []
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                    and isinstance(pair[1], int)):
                raise ValueError(f"{self.split_dir / name}: item {i} must be [task_name, variation], got {pair!r}")
            eto_name, variation = pair
            sim_name = canonical_task_name(eto_name)
            data = {"task_name": sim_name, "eto_task_name": eto_name, "variation": variation}
            if sim_name in limits:
                data["max_steps"] = limits[sim_name]
            tasks.append(Task(id=task_id(eto_name, variation), split=split, data=data))
        return tasks
