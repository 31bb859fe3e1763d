"""ScienceWorld through the `scienceworld` package (its Scala simulator runs in a JVM, Java 17+).

One JVM is started lazily per env instance and reused across resets and across
tasks (`switch_task`); `close()` shuts it down. Starting a JVM takes ~2.5 s,
loading a variation ~0.1 s.

Speed: the package's `ScienceWorldEnv.step()` also fetches the look/inventory
text and the full list of valid action-object combinations on every call, which
costs most of a step. We only need the observation, the score, the completion
flag and the move count, so `_act` calls the simulator's server object directly;
`valid_actions()` is there when an agent wants the list. `python -m bench.bench_envs
--env sciworld` measures the difference.

Episode rules, the original's (ETO's sciworld_env.py on the package's reset and its patched step):
- reset: load the task, then the package's reset(): the move "look around" (it takes no time and no move
  count, but the simulator checks the task's goals after it, so the score can change); the first observation
  is the simulator's task text as the package returns it, "Task Description:" header and all
  (`task_description()` gives it without the header, as expert records hold it);
- step limit: `task.data["max_steps"]` (the per-task limit from ETO's max_steps.json,
  put there by the task loader) wins over the `max_steps` argument (the task config's fallback);
- the action goes to the simulator as parsed, a trailing "." included;
- reward: the simulator's score (0-1), negative after a wrong focus; the episode keeps the best (base.py);
- done: the simulator says the task is complete, the score is below 0, or the simulator's move count passes
  `env_step_limit` (200, as the original's main.py); every end is the original's "success";
- observations after the first are "Observation: <simulator text>".
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

from eval_agent.envs.base import ACTION_PATTERN_WITH_SPACE, BaseEnv

# The original's "easy" (scienceworld 1.1.3, which ETO installs): teleporting, open doors,
# self-watering flower pots, and no electrical actions except in electrical tasks. Containers
# stay closed; env option `open_containers: true` adds "openContainers" (opt-in, not the original).
_EASY = ("teleportAction", "openDoors", "selfWateringFlowerPots")
_ELECTRICAL_MARKERS = ("power-component", "conductivity")
# what the simulator's task text starts with; the original's construct_preference cuts len(TASK_HEADER) chars
TASK_HEADER = "Task Description:\n"
OBSERVATION_PREFIX = "Observation: "
# The simulator's answers to an action it does not carry out: none matches; several match and it waits for a
# number; not an action at all (e.g. anything but a number after an ambiguous one)
REFUSALS = ("No known action matches that input.", "Ambiguous request:", "Unknown action.")
ENV_STEP_LIMIT = 200  # the original's main.py: ScienceWorldEnv("", ..., envStepLimit=200)


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


def without_task_header(text: str) -> str:
    """The task text as expert records hold it: the original's construct_preference does
    `text[len("Task Description:\\n"):].strip()` to an explored trajectory's first turn. A text without the
    header is only stripped (the original would cut its first 18 characters)."""
    if text.startswith(TASK_HEADER):
        text = text[len(TASK_HEADER):]
    return text.strip()


@lru_cache(maxsize=None)
def _package_env_class():
    from scienceworld import ScienceWorldEnv as PackageEnv

    class OnceClosedEnv(PackageEnv):
        """The package's env, closed at most once: its __del__ closes again after our close(), and py4j then
        logs two tracebacks at exit ("Gateway is not connected", `'NoneType' object has no attribute 'join'`)."""

        _closed = False

        def close(self) -> None:
            if not self._closed:
                self._closed = True
                super().close()

    return OnceClosedEnv


class ScienceWorldEnv(BaseEnv):
    """`task.data` needs "task_name" (ETO's or the simulator's spelling) and "variation";
    "max_steps" is optional. env options: `simplification`: "easy" (default) or the
    simulator's own comma-separated list; `env_step_limit`: the simulator's move count that ends an episode."""

    action_pattern = ACTION_PATTERN_WITH_SPACE  # the original's pattern for this env
    # an explored episode's first observation -> the task turn of expert records (read by scripts/pairs/)
    expert_task_text = staticmethod(without_task_header)

    def __init__(self, task: Any, max_steps: int, simplification: str = "easy", open_containers: bool = False,
                 env_step_limit: int = ENV_STEP_LIMIT, **env_options: Any):
        super().__init__(task, max_steps, **env_options)
        self.simplification = simplification
        self.open_containers = bool(open_containers)
        self.env_step_limit = int(env_step_limit)
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
            self._sim = _package_env_class()("", envStepLimit=self.env_step_limit)
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
        self.simulator.load(self.task_name, self.variation, simplifications, generateGoldPath=gold_path)

    def _reset(self) -> str:
        self._load(gold_path=False)
        server = self.simulator.server
        # The package's reset(): server.reset() and the move "look around". server.reset() loads the same task
        # again from the same seed, i.e. the world load() just built (a test checks it), and after gold_actions()
        # it would also redraw a gold path (seconds): skipped.
        server.step("look around")
        return server.freeActionTaskDesc()  # the original's first observation, info["taskDesc"]

    def _act(self, action: str) -> tuple[str, float, bool, bool]:
        from py4j.protocol import Py4JJavaError

        server = self.simulator.server
        try:
            text = server.step(action)
        except Py4JJavaError as e:  # the original's run would stop here; ours reports it and goes on
            first_line = str(e.java_exception).splitlines()[0] if e.java_exception else "error"
            return f"{OBSERVATION_PREFIX}The simulator could not process this action ({first_line}).", \
                float(server.getScore()), False, False
        score = float(server.getScore())
        # ETO's patched package step: isCompleted, or a move count past envStepLimit, or a score below 0 on the
        # package's 0-100 integer scale; its env calls every end a success
        done = bool(server.getCompleted()) or server.getNumMoves() > self.env_step_limit or round(100 * score) < 0
        return OBSERVATION_PREFIX + text, score, done, done

    def score_at_reset(self) -> float:
        return float(self.simulator.server.getScore())  # the reset's "look around" scores on some tasks

    def action_rejected(self, observation: str) -> bool:
        return observation[len(OBSERVATION_PREFIX):].startswith(REFUSALS)

    # -- helpers for agents, the expert-data script, tests and the benchmark -----
    def task_description(self) -> str:
        """The current task's text without its header, as expert records and the 1-shot example hold it."""
        return without_task_header(self.simulator.server.freeActionTaskDesc())

    def valid_actions(self) -> list[str]:
        """All valid action-object combinations now (slow: ~75 ms)."""
        return list(self.simulator.server.getValidActionObjectCombinations())

    def gold_actions(self) -> list[str]:
        """The simulator's gold action sequence for the current task. Reloads the task,
        so call reset() afterwards to play it."""
        self._load(gold_path=True)
        return [str(a) for a in self.simulator.server.getGoldActionSequence()]
