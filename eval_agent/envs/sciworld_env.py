"""ScienceWorld through the `scienceworld` package (its Scala simulator runs in a JVM, Java 17+).

One JVM is started lazily per env instance and reused across resets and across
tasks (`switch_task`); `close()` shuts it down. Starting a JVM takes ~2.5 s,
loading a variation ~0.1 s.

Speed: the package's `ScienceWorldEnv.step()` also fetches the look/inventory
text and the full list of valid action-object combinations on every call, which
costs most of a step. We only need the observation, the score and the completion
flag, so `_act` calls the simulator's server object directly
(`step`, `getScore`, `getCompleted`); `valid_actions()` is there when an agent
wants the list. `python -m bench.bench_envs --env sciworld` measures the difference.

Episode rules:
- step limit: `task.data["max_steps"]` (the per-task limit from ETO's max_steps.json,
  put there by the task loader) wins over the `max_steps` argument (the task
  config's fallback);
- reward: the best score reached in the episode / 100, negatives clipped to 0;
- success: the simulator reports the task complete; a negative score (the agent
  focused on the wrong thing) ends the episode as a failure;
- observations after the first are "Observation: <simulator text>", the format of
  our prompt example and of data/sciworld_sft.json; the first observation is the
  task description alone.
"""
from __future__ import annotations

from typing import Any

from eval_agent.envs.base import ACTION_PATTERN_WITH_SPACE, BaseEnv

# The original's "easy" (scienceworld 1.1.3, which ETO installs): teleporting, open doors,
# self-watering flower pots, and no electrical actions except in electrical tasks. Containers
# stay closed; env option `open_containers: true` adds "openContainers" (opt-in, not the original).
_EASY = ("teleportAction", "openDoors", "selfWateringFlowerPots")
_ELECTRICAL_MARKERS = ("power-component", "conductivity")
_TASK_DESC_HEADER = "Task Description:"
OBSERVATION_PREFIX = "Observation: "


def simplification_string(task_name: str, simplification: str = "easy", open_containers: bool = False) -> str:
    """The comma-separated simplification list the simulator gets for `task_name`."""
    if simplification != "easy":
        return simplification
    parts = list(_EASY) + (["openContainers"] if open_containers else [])
    if not any(m in task_name for m in _ELECTRICAL_MARKERS):
        parts.append("noElectricalAction")
    return ",".join(parts)


def canonical_task_name(name: str) -> str:
    """ETO's "task-10-measure-melting-point-(known-substance)" -> the simulator's
    "measure-melting-point-known-substance"."""
    from scienceworld.utils import infer_task

    return infer_task(name)


class ScienceWorldEnv(BaseEnv):
    """`task.data` needs "task_name" (ETO's or the simulator's spelling) and "variation";
    "max_steps" is optional. env option `simplification`: "easy" (default) or the
    simulator's own comma-separated list."""

    action_pattern = ACTION_PATTERN_WITH_SPACE  # the original's pattern for this env

    def __init__(self, task: Any, max_steps: int, simplification: str = "easy", open_containers: bool = False,
                 **env_options: Any):
        super().__init__(task, max_steps, **env_options)
        self.simplification = simplification
        self.open_containers = bool(open_containers)
        self._fallback_max_steps = int(max_steps)
        self._sim = None  # the package's ScienceWorldEnv, owning the JVM
        self.switch_task(task)

    @classmethod
    def requirements(cls) -> list[str]:
        import re
        import shutil
        import subprocess

        if shutil.which("java") is None:
            return ["ScienceWorld needs Java 17+ on PATH (e.g. apt-get install openjdk-17-jre-headless)"]
        out = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr
        major = re.search(r'version "(\d+)', out)
        if major is None or int(major[1]) < 17:
            return [f"ScienceWorld needs Java 17+; `java -version` says: {out.strip().splitlines()[0] if out else '?'}"]
        return []

    # -- lifecycle ---------------------------------------------------------------
    def switch_task(self, task: Any) -> None:
        """Play another task with the same JVM; call reset() next."""
        data = getattr(task, "data", None) or {}
        for key in ("task_name", "variation"):
            if key not in data:
                raise ValueError(f"ScienceWorldEnv: task {getattr(task, 'id', task)!r} lacks data[{key!r}]")
        self.task = task
        self.task_name = canonical_task_name(str(data["task_name"]))
        self.variation = int(data["variation"])
        self.max_steps = int(data.get("max_steps") or self._fallback_max_steps)

    @property
    def simulator(self):
        """The package's env object (started on first use)."""
        if self._sim is None:
            from scienceworld import ScienceWorldEnv as PackageEnv

            # The package's own step limit would mark episodes complete; ours rules.
            self._sim = PackageEnv("", envStepLimit=10**9)
        return self._sim

    def close(self) -> None:
        if self._sim is not None:
            sim, self._sim = self._sim, None
            sim.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the gateway may be gone already
            pass

    # -- BaseEnv -----------------------------------------------------------------
    def _load(self, gold_path: bool) -> None:
        simplifications = simplification_string(self.task_name, self.simplification, self.open_containers)
        # load() builds a fresh world; the package's reset() would rebuild it a second time.
        self.simulator.load(self.task_name, self.variation, simplifications, generateGoldPath=gold_path)

    def _reset(self) -> str:
        self._load(gold_path=False)
        return self.task_description()

    def _act(self, action: str) -> tuple[str, float, bool, bool]:
        from py4j.protocol import Py4JJavaError

        server = self.simulator.server
        action = action.rstrip(".").strip()
        try:
            text = server.step(action)
        except Py4JJavaError as e:  # the simulator rejected the input; the episode goes on
            first_line = str(e.java_exception).splitlines()[0] if e.java_exception else "error"
            return f"{OBSERVATION_PREFIX}The simulator could not process this action ({first_line}).", \
                self.state.reward, False, False
        score = float(server.getScore())
        completed = bool(server.getCompleted())
        done = completed or score < 0
        return OBSERVATION_PREFIX + text.strip(), max(score, 0.0), done, completed

    # -- helpers for agents, the expert-data script, tests and the benchmark -----
    def task_description(self) -> str:
        text = self.simulator.server.freeActionTaskDesc().strip()
        if text.startswith(_TASK_DESC_HEADER):
            text = text[len(_TASK_DESC_HEADER):].strip()
        return text

    def valid_actions(self) -> list[str]:
        """All valid action-object combinations now (slow: ~75 ms)."""
        return list(self.simulator.server.getValidActionObjectCombinations())

    def gold_actions(self) -> list[str]:
        """The simulator's gold action sequence for the current task. Reloads the task,
        so call reset() afterwards to play it."""
        self._load(gold_path=True)
        return [str(a) for a in self.simulator.server.getGoldActionSequence()]
