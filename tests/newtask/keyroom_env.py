"""The key room game. Rooms are in a row; `go to <room>` moves to a neighbour."""
from __future__ import annotations

from eval_agent.envs.base import BaseEnv


def task_text(rooms: list[str], key: str, door: str) -> str:
    return (f"Your task is to open the vault door. The rooms, in a row: {', '.join(rooms)}. "
            f"You are in the {rooms[0]}. The key is in the {key}. The vault door is in the {door}.")


class KeyRoomEnv(BaseEnv):
    def _reset(self) -> str:
        data = self.task.data
        self.rooms, self.key_room, self.door_room = data["rooms"], data["key"], data["door"]
        self.here, self.has_key = self.rooms[0], False
        return task_text(self.rooms, self.key_room, self.door_room)

    def _describe(self) -> str:
        i = self.rooms.index(self.here)
        neighbours = self.rooms[max(0, i - 1):i] + self.rooms[i + 1:i + 2]
        text = f"You are in the {self.here}. Next to it: {', '.join(neighbours)}."
        if self.here == self.key_room and not self.has_key:
            text += " A key lies here."
        if self.here == self.door_room:
            text += " The vault door is here."
        return text

    def _act(self, action: str) -> tuple[str, float, bool, bool]:
        reward = 0.5 if self.has_key else 0.0
        if action.startswith("go to "):
            target, i = action[len("go to "):].strip(), self.rooms.index(self.here)
            if target in self.rooms and abs(self.rooms.index(target) - i) == 1:
                self.here = target
                return f"Observation: {self._describe()}", reward, False, False
        elif action == "look":
            return f"Observation: {self._describe()}", reward, False, False
        elif action == "take key" and self.here == self.key_room and not self.has_key:
            self.has_key = True
            return "Observation: You take the key.", 0.5, False, False
        elif action == "open door" and self.here == self.door_room:
            if self.has_key:
                return "Observation: The vault door opens.", 1.0, True, True
            return "Observation: The vault door is locked.", reward, False, False
        return "Observation: Nothing happens.", reward, False, False

    def action_rejected(self, observation: str) -> bool:
        return observation == "Observation: Nothing happens."
