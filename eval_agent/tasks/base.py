"""Tasks and task loaders.

A task loader turns a split name ("train", "dev", "test") into a list of `Task`s,
each with a stable id used as the output file name. Sharding with
`--part_num/--part_idx` is done here, once, for every benchmark.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Task:
    id: str
    split: str
    data: dict[str, Any] = field(default_factory=dict)


class TaskLoader(ABC):
    """Loads the tasks of one benchmark. Options come from the task config's `loader_options`."""

    splits: tuple[str, ...] = ("train", "dev", "test")

    def __init__(self, **options: Any):
        self.options = options

    def load(self, split: str) -> list[Task]:
        if split not in self.splits:
            raise ValueError(f"{type(self).__name__}: unknown split {split!r}; choose one of {list(self.splits)}")
        tasks = self._load(split)
        ids = [t.id for t in tasks]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise ValueError(f"{type(self).__name__}: duplicate task ids in split {split!r}: {dup}")
        return tasks

    @abstractmethod
    def _load(self, split: str) -> list[Task]:
        ...


def shard(tasks: list[Task], part_num: int, part_idx: int) -> list[Task]:
    """Contiguous shard `part_idx` of `part_num`: shards are disjoint and their union is `tasks`."""
    if part_num < 1 or not 0 <= part_idx < part_num:
        raise ValueError(f"need part_num >= 1 and 0 <= part_idx < part_num, got {part_num=} {part_idx=}")
    size, extra = divmod(len(tasks), part_num)
    start = part_idx * size + min(part_idx, extra)
    end = start + size + (1 if part_idx < extra else 0)
    return tasks[start:end]


def task_type(task: Task) -> str:
    """The task's type for spreading subsets: ALFWorld's task_type, ScienceWorld's task_name, else one type."""
    return str(task.data.get("task_type") or task.data.get("task_name") or "all")


def spread_subset(items: list, n: int, seed: int, kind=task_type) -> list:
    """A fixed, seeded choice of `n` items spread evenly over their types (kind(item)): each type's items
    are shuffled with `seed`, then types are visited in turn (sorted by name) taking one item each,
    until `n` are taken. The result keeps the items' original order, so every stage of a run that
    asks for the same (n, seed) gets the same items."""
    if n <= 0 or n >= len(items):
        return list(items)
    import random

    rng = random.Random(seed)
    by_type: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_type.setdefault(kind(item), []).append(i)
    queues = []
    for name in sorted(by_type):
        positions = by_type[name][:]
        rng.shuffle(positions)
        queues.append(positions)
    chosen: list[int] = []
    while len(chosen) < n:
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop())
    return [items[i] for i in sorted(chosen)]
