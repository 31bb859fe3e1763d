"""ALFWorld (text) episodes through the `alfworld` + `textworld` packages.

Each episode plays one game file (`Task.data["game_file"]`, relative to $ALFWORLD_DATA)
in a worker process, so a reset or a step that hangs can be killed: a timed-out episode
ends with terminate_reason "reset_timeout" / "step_timeout" (a failed episode) and the
run goes on. Workers are pooled and reused across episodes, so the ~1.5 s of importing
textworld is paid once per worker, not once per game.

Why a reset could hang: asking TextWorld for `policy_commands` (the expert plan) runs
the fast-downward planner on every reset and step; on some games (e.g. valid_seen
pick_two_obj_and_place-Spatula-None-Drawer-13) the search grows past gigabytes and does
not end. Evaluation never needs the plan, so we never request it. We also translate the
PDDL problem once per game instead of four times (see `_translate_once`).

As in the original ETO code (eval_agent/tasks/alfworld.py, envs/alfworld_env.py):
- the first observation is the game's intro without its first paragraph (the TextWorld
  banner), the other paragraphs joined by ONE newline. Expert records keep the blank line
  (`task_text`), as ETO's 1-shot example does;
- every later one is "Observation: <feedback>", ALFWorld's "You arrive at loc N. " dropped;
- the action after "Action:" goes to TextWorld verbatim: it strips it and needs an exact,
  case-sensitive match of a command, else "Nothing happens.". `lenient_actions: true` (ours,
  opt-in) maps harmless variants ("Go to Desk 1.", "put x on y") to the game's command first;
- an answer without "Action:" gets the original's "Error Input" text.
Ours: a game process that fails or times out ends the episode (env_error / *_timeout), an
infrastructure failure; the original's loop would have reported "Error Input" and gone on.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from eval_agent.envs.base import BaseEnv
from eval_agent.paths import alfworld_data_dir

BANNER = "-= Welcome to TextWorld, ALFRED! =-"
# the original's text for any failed step (no "Action:"), grammar included
ERROR_INPUT_OBSERVATION = "Observation: Error Input. Your input must contains 'Action: '"
_PUT_RE = re.compile(r"^put (.+?) (?:in|on|into|in/on|onto) (.+)$")


def first_observation(intro: str) -> str:
    """The first observation, by the original's rule: the intro's paragraphs after the first (the banner),
    joined by one newline."""
    return "\n".join(intro.split("\n\n")[1:])


def with_blank_lines(first_observation: str) -> str:
    """A first observation in the expert records' form (task_text): the blank line between room and goal back."""
    return "\n\n".join(first_observation.split("\n"))


def task_text(intro: str) -> str:
    """The task turn of expert records: the intro without the banner, its blank line kept, as in ETO's
    1-shot example (and a public copy of its released SFT data); the original's first observation has none."""
    return intro.replace(BANNER, "").strip()


def format_observation(feedback: str) -> str:
    """A step's observation, the original's process_ob: "You arrive at loc N. " dropped, nothing stripped."""
    if feedback.startswith("You arrive at loc "):
        feedback = feedback[feedback.find(". ") + 2:]
    return "Observation: " + feedback


def match_command(command: str, admissible: list[str]) -> str:
    """`lenient_actions` only: map harmless variants ("Go to Desk 1.", "put x on y") to the game's command;
    else the normalised text."""
    if command in admissible:
        return command
    normal = " ".join(command.lower().split()).rstrip(".").strip()
    if normal in admissible:
        return normal
    put = _PUT_RE.match(normal)
    if put and f"put {put[1]} in/on {put[2]}" in admissible:
        return f"put {put[1]} in/on {put[2]}"
    return normal


# ---------------------------------------------------------------- game worker process

def _translate_once() -> None:
    """Cache fast-downward's PDDL->SAS translation for the game being played.

    TextWorld's PddlState translates the problem twice (plain, and optimized for the
    planner's replan), and builds a state at load() and again at reset(): four identical
    translations, ~80% of a reset. The replan translation only serves `policy_commands`,
    which we never request, so one plain translation serves all four.
    """
    import fast_downward

    translate = fast_downward.pddl2sas
    cache: dict[tuple[str, str], Any] = {}

    def pddl2sas_once(domain, problem, verbose=False, optimize=False):
        key = (domain, problem)
        if key not in cache:
            cache.clear()
            cache[key] = translate(domain, problem, verbose=verbose)
        return cache[key]

    fast_downward.pddl2sas = pddl2sas_once


def _serve(memory_limit_mb: int) -> None:
    """Worker main loop: JSON requests on stdin, one JSON reply line each on the original stdout.

    {"op": "reset", "game_file": abs path} loads the game (if not loaded) and resets it;
    {"op": "step", "command": str, "lenient": bool} plays one command, verbatim unless lenient.
    Replies: {"ok", "feedback", "won"} or
    {"ok": false, "error"}.
    """
    if memory_limit_mb > 0:  # a runaway game dies with MemoryError instead of eating the machine
        import resource
        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # stray prints from the libraries must not corrupt the protocol

    import fast_downward
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler

    _translate_once()
    infos = textworld.EnvInfos(won=True, admissible_commands=True)  # no policy_commands: see module doc
    env, loaded, admissible = None, None, []
    for line in sys.stdin:
        try:
            request = json.loads(line)
            if request["op"] == "reset":
                if request["game_file"] != loaded:
                    if env is not None:
                        env.close()
                        fast_downward.close_lib(env.unwrapped.downward_lib)  # each game loads its own copy
                    env, loaded = None, None
                    env = textworld.start(request["game_file"], request_infos=infos,
                                          wrappers=[AlfredDemangler(shuffle=False)])
                    loaded = request["game_file"]
                state = env.reset()
            else:
                command = request["command"]
                state, _, _ = env.step(match_command(command, admissible) if request["lenient"] else command)
            admissible = list(state["admissible_commands"])
            reply = {"ok": True, "feedback": state.feedback, "won": bool(state["won"])}
        except Exception as e:  # report to the parent, keep serving
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


class _Worker:
    """A game worker process; it serves one game at a time and is reused across episodes."""

    def __init__(self, memory_limit_mb: int):
        self.memory_limit_mb = memory_limit_mb
        self.games = 0
        self._buffer = b""
        self.process = subprocess.Popen(
            [sys.executable, "-m", __name__, "--serve", "--memory-limit-mb", str(memory_limit_mb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def alive(self) -> bool:
        return self.process.poll() is None

    def request(self, message: dict, timeout: float) -> dict | None:
        """Send one request; the reply, or None when none came within `timeout` seconds."""
        try:
            self.process.stdin.write((json.dumps(message) + "\n").encode("utf-8"))
            self.process.stdin.flush()
        except OSError:
            return {"ok": False, "error": "the game process died"}
        deadline = time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return {"ok": False, "error": "the game process died"}
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            stream.close()


_IDLE: list[_Worker] = []
_IDLE_LOCK = threading.Lock()
MAX_IDLE_WORKERS = 8
GAMES_PER_WORKER = 25  # TextWorld keeps some memory per game; a fresh worker now and then bounds it


def _acquire_worker(memory_limit_mb: int) -> _Worker:
    with _IDLE_LOCK:
        while _IDLE:
            worker = _IDLE.pop()
            if worker.alive() and worker.memory_limit_mb == memory_limit_mb:
                return worker
            worker.kill()
    return _Worker(memory_limit_mb)


def _release_worker(worker: _Worker) -> None:
    with _IDLE_LOCK:
        if worker.alive() and worker.games < GAMES_PER_WORKER and len(_IDLE) < MAX_IDLE_WORKERS:
            _IDLE.append(worker)
            return
    worker.kill()


@atexit.register
def _stop_idle_workers() -> None:
    with _IDLE_LOCK:
        while _IDLE:
            _IDLE.pop().kill()


# ---------------------------------------------------------------- the environment

class AlfWorldEnv(BaseEnv):
    """One ALFWorld game. Reward = won (1/0), success = won, as in the original.

    env_options: reset_timeout (s, default 120), step_timeout (s, default 30),
    memory_limit_mb (address-space cap of the game process, default 4096; 0 = none),
    lenient_actions (default false: the action goes to TextWorld verbatim, as in the original).
    A reset or step that times out (or a game process that fails) ends the episode with
    terminate_reason "reset_timeout" / "step_timeout" / "env_error"; reset() then returns
    a message saying so and `state.finished` is already True.
    """

    invalid_format_observation = ERROR_INPUT_OBSERVATION
    expert_task_text = staticmethod(with_blank_lines)

    def __init__(self, task: Any, max_steps: int = 40, reset_timeout: float = 120.0,
                 step_timeout: float = 30.0, memory_limit_mb: int = 4096, lenient_actions: bool = False,
                 **env_options: Any):
        super().__init__(task, max_steps, **env_options)
        if not isinstance(lenient_actions, bool):
            raise ValueError(f"AlfWorldEnv: lenient_actions must be true or false, got {lenient_actions!r}")
        self.lenient_actions = lenient_actions
        self.reset_timeout = float(reset_timeout)
        self.step_timeout = float(step_timeout)
        self.memory_limit_mb = int(memory_limit_mb)
        self._worker: _Worker | None = None

    @property
    def game_file(self) -> Path:
        path = Path(self.task.data["game_file"])
        return path if path.is_absolute() else alfworld_data_dir() / path

    def _reset(self) -> str:
        if not self.game_file.exists():
            raise FileNotFoundError(f"task {self.task.id}: game file {self.game_file} not found "
                                    f"(set $ALFWORLD_DATA or run setup.sh)")
        if self._worker is None:
            self._worker = _acquire_worker(self.memory_limit_mb)
            self._worker.games += 1
        ok, text, _ = self._request({"op": "reset", "game_file": str(self.game_file)}, self.reset_timeout, "reset")
        return first_observation(text) if ok else text

    def _act(self, action: str) -> tuple[str, float, bool, bool]:
        ok, text, won = self._request({"op": "step", "command": action, "lenient": self.lenient_actions},
                                      self.step_timeout, "step")
        if not ok:
            return text, 0.0, False, False  # the episode has been terminated already
        return format_observation(text), float(won), won, won

    def action_rejected(self, observation: str) -> bool | None:
        if self.state.finished:  # before step() ends an episode, only a failed game process (_request) has
            return None  # and the text is ours, not the game's
        return observation == "Observation: Nothing happens."

    def _request(self, message: dict, timeout: float, kind: str) -> tuple[bool, str, bool]:
        """(True, feedback, won), or (False, what went wrong, False) after ending the episode."""
        reply = self._worker.request(message, timeout)
        if reply is not None and reply["ok"]:
            return True, reply["feedback"], bool(reply["won"])
        if reply is None:
            reason, text = f"{kind}_timeout", f"The game did not answer the {kind} within {timeout:g} s."
        else:
            reason, text = "env_error", f"The game failed during the {kind}: {reply['error']}."
        self._worker.kill()  # a worker that timed out or failed is not reused
        self._worker = None
        self.terminate(reason)
        return False, text + " The episode ends.", False

    def close(self) -> None:
        if self._worker is not None:
            _release_worker(self._worker)
            self._worker = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="ALFWorld game worker (started by AlfWorldEnv).")
    parser.add_argument("--serve", action="store_true", required=True)
    parser.add_argument("--memory-limit-mb", type=int, default=0)
    _serve(parser.parse_args().memory_limit_mb)
