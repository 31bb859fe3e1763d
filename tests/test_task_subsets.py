"""Fixed, seeded task subsets spread evenly over task types: the same tasks at every stage of a run."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from eval_agent.config import ConfigError
from eval_agent.main import only_ids
from eval_agent.tasks.alfworld import AlfWorldLoader
from eval_agent.tasks.base import Task, spread_subset, task_type
from eval_agent.tasks.sciworld import SciWorldTaskLoader


def test_sciworld_test_subset_takes_one_task_of_every_type():
    tasks = SciWorldTaskLoader().load("test")
    first = tasks[:24]
    assert len({task_type(t) for t in first}) <= 3  # why the first N will not do: a few types only
    subset = spread_subset(tasks, 24, seed=0)
    assert len(subset) == 24 and len({task_type(t) for t in subset}) == 24
    assert spread_subset(tasks, 24, seed=0) == subset  # fixed: every stage gets these
    assert spread_subset(tasks, 24, seed=1) != subset  # the seed chooses within each type
    positions = [tasks.index(t) for t in subset]
    assert positions == sorted(positions)  # split order kept


def test_alfworld_subset_spreads_over_the_six_task_types():
    tasks = AlfWorldLoader().load("test")
    subset = spread_subset(tasks, 4, seed=0)
    assert len({t.data["task_type"] for t in subset}) == 4
    counts = Counter(t.data["task_type"] for t in spread_subset(tasks, 20, seed=0))
    assert len(counts) == 6 and max(counts.values()) - min(counts.values()) <= 1


def test_subset_edge_cases():
    tasks = [Task(f"t{i}", "test", {"task_type": "a" if i < 8 else "b"}) for i in range(10)]
    assert spread_subset(tasks, 0, 0) == tasks and spread_subset(tasks, 50, 0) == tasks
    picked = spread_subset(tasks, 6, 0)
    assert Counter(task_type(t) for t in picked) == {"a": 4, "b": 2}  # "b" runs out; "a" fills up


def test_task_ids_file_restricts_and_a_mismatch_names_both_sides(tmp_path):
    tasks = [Task(f"t{i}", "train") for i in range(5)]
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(["t1", "t3", "other"]))
    assert [t.id for t in only_ids(tasks, ids, "demo", "train")] == ["t1", "t3"]
    ids.write_text(json.dumps(["x1", "x2"]))
    with pytest.raises(ConfigError, match="none of its 2 ids.*'x1'.*'t0'"):
        only_ids(tasks, ids, "demo", "train")
