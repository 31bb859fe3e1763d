"""Key room tasks: seeded layouts, so ids and games never change between runs."""
from __future__ import annotations

import random

from eval_agent.tasks.base import Task, TaskLoader

ROOMS = ("hall", "kitchen", "garden", "cellar", "library", "attic", "study")
SPLIT_SIZES = {"train": 8, "dev": 2, "test": 4}


class KeyRoomLoader(TaskLoader):
    """loader_options: {layout: here} puts the key and the door in the starting room (two actions win: the easy
    variant that docs/results/rl-keyroom/ learns with online RL)."""

    def _load(self, split: str) -> list[Task]:
        tasks = []
        for i in range(SPLIT_SIZES[split]):
            rng = random.Random(f"keyroom-{split}-{i}")
            rooms = rng.sample(ROOMS, rng.randint(3, 5))  # the agent starts in rooms[0]
            door = rng.randrange(1, len(rooms))
            key = rng.choice([r for r in range(1, len(rooms)) if r != door])
            if self.options.get("layout") == "here":
                key = door = 0
            kind = "key_on_the_way" if key < door else "key_past_the_door"  # spreads --train_tasks subsets
            tasks.append(Task(f"keyroom-{split}-{i}", split,
                              {"rooms": rooms, "key": rooms[key], "door": rooms[door], "task_type": kind}))
        return tasks
