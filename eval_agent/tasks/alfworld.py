"""ALFWorld task splits: train (3,554 games), dev = valid_seen (140), test = valid_unseen (134).

A task is one game directory json_2.1.1/<split dir>/<task folder>/<trial>/ under
$ALFWORLD_DATA. The games kept are those ALFWorld's own loader plays: task types 1-6,
no "movable"/"Sliced" variants, a game.tw-pddl marked solvable. Ids are stable and
derived from the path: alfworld-<split dir>-<task folder>-<trial>.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eval_agent.paths import alfworld_data_dir
from eval_agent.tasks.base import Task, TaskLoader

SPLIT_DIRS = {"train": "train", "dev": "valid_seen", "test": "valid_unseen"}
TASK_TYPES = ("pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
              "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place")
GAME_FILE = "game.tw-pddl"


def task_id(game_dir: Path) -> str:
    """alfworld-<split dir>-<task folder>-<trial> from .../<split dir>/<task folder>/<trial>/."""
    return "-".join(["alfworld", game_dir.parent.parent.name, game_dir.parent.name, game_dir.name])


def task_type_of(game_dir: Path) -> str:
    """The task type is the task folder's prefix, e.g. pick_two_obj_and_place-Spatula-None-Drawer-13."""
    return game_dir.parent.name.split("-", 1)[0]


def is_solvable(game_file: Path) -> bool:
    """The game's "solvable" flag. It is the last key of the file, so read the tail first."""
    with open(game_file, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 200))
        tail = f.read().decode("utf-8", errors="replace").replace(" ", "")
    if '"solvable":true' in tail:
        return True
    if '"solvable":false' in tail:
        return False
    return bool(json.loads(game_file.read_text(encoding="utf-8")).get("solvable", False))


class AlfWorldLoader(TaskLoader):
    """Options: data_dir (default $ALFWORLD_DATA), limit (first N tasks of the split, for smoke runs)."""

    def _load(self, split: str) -> list[Task]:
        root = Path(self.options.get("data_dir") or alfworld_data_dir())
        split_root = root / "json_2.1.1" / SPLIT_DIRS[split]
        if not split_root.is_dir():
            raise FileNotFoundError(f"ALFWorld split {split!r}: {split_root} not found "
                                    "(set $ALFWORLD_DATA or run setup.sh)")
        tasks = []
        for game_file in sorted(split_root.glob(f"*/*/{GAME_FILE}")):
            game_dir = game_file.parent
            kind = task_type_of(game_dir)
            if kind not in TASK_TYPES or "movable" in game_dir.parent.name or "Sliced" in game_dir.parent.name:
                continue
            if not (game_dir / "traj_data.json").exists() or not is_solvable(game_file):
                continue
            data: dict[str, Any] = {"game_file": game_file.relative_to(root).as_posix(), "task_type": kind}
            tasks.append(Task(id=task_id(game_dir), split=split, data=data))
        limit = self.options.get("limit")
        return tasks[:int(limit)] if limit else tasks
