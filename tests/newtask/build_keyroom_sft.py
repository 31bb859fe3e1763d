"""Expert trajectories for the key room (the config's expert_data.build runs this):
python build_keyroom_sft.py --out keyroom_sft.json. One SFT record per train task,
{"id", "conversations", "reward"}, played through the env so observations are the env's own."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from eval_agent.config import load_task_config
from fastchat.records import record_turns

TASK = re.compile(r"in a row: (.*)\. You are in the (\w+)\. The key is in the (\w+)\. The vault door is in the (\w+)\.")


def _walk(rooms: list[str], start: str, goal: str) -> list[str]:
    i, j = rooms.index(start), rooms.index(goal)
    step = 1 if j > i else -1
    return [rooms[k] for k in range(i + step, j + step, step)]


def expert_steps(task: str) -> list[tuple[str, str]]:
    """(thought, action) pairs that win the game described by the task text."""
    rooms_text, here, key, door = TASK.search(task).groups()
    rooms = rooms_text.split(", ")
    steps = [(f"The key is in the {key}, so I head there.", f"go to {room}") for room in _walk(rooms, here, key)]
    steps.append(("The key is here.", "take key"))
    steps += [(f"I have the key; the vault door is in the {door}.", f"go to {room}")
              for room in _walk(rooms, key, door)]
    steps.append(("I have the key and the vault door is here.", "open door"))
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default="keyroom.yaml", help="a key room config next to this file")
    args = parser.parse_args()
    cfg = load_task_config(Path(__file__).with_name(args.config))
    instruction, records = cfg.instruction_text(), []
    for task in cfg.make_loader().load("train"):
        env = cfg.env_class()(task, max_steps=cfg.max_steps, **cfg.env_options)
        observation = env.reset()
        turns = record_turns(instruction, observation)
        for thought, action in expert_steps(observation):
            turns.append({"from": "gpt", "value": f"Thought: {thought}\nAction: {action}"})
            observation, reward, done, _ = env.step(turns[-1]["value"])
            if not done:  # as in episode records, the final observation is not stored
                turns.append({"from": "human", "value": observation})
        assert env.state.success, f"{task.id}: the expert did not win"
        records.append({"id": task.id, "conversations": turns, "reward": reward})
    args.out.write_text(json.dumps(records, indent=1), encoding="utf-8")
    print(f"{len(records)} expert trajectories -> {args.out}")


if __name__ == "__main__":
    main()
