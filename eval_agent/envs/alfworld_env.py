"""ALFWorld (text) episodes through the `alfworld` + `textworld` packages.

Each episode plays one game file (`Task.data["game_file"]`, relative to $ALFWORLD_DATA)
in a child process, so a reset or a step that hangs can be killed: a timed-out episode
ends with terminate_reason "reset_timeout" / "step_timeout" (a failed episode) and the
run goes on. Children are forked from a forkserver that has textworld imported already,
so starting one costs milliseconds, not the ~1.5 s of importing textworld.

Why a reset could hang: asking TextWorld for `policy_commands` (the expert plan) runs
the fast-downward planner on every reset and step; on some games (e.g. valid_seen
pick_two_obj_and_place-Spatula-None-Drawer-13) the search grows past gigabytes and does
not end. Evaluation never needs the plan, so we never request it. We also translate the
PDDL problem once per game instead of four times (see `_translate_once`).

Observations: the first one is the game's intro without the TextWorld banner; every
later one is "Observation: <feedback>" with ALFWorld's "You arrive at loc N. " dropped,
the format of the expert data built by scripts/build_alfworld_sft.py.
"""
from __future__ import annotations

import multiprocessing
import re
from pathlib import Path
from typing import Any

from eval_agent.envs.base import BaseEnv
from eval_agent.paths import alfworld_data_dir

BANNER = "-= Welcome to TextWorld, ALFRED! =-"
_ARRIVE_RE = re.compile(r"^You arrive at loc \d+\.\s*")
_PUT_RE = re.compile(r"^put (.+?) (?:in|on|into|in/on|onto) (.+)$")


def task_text(intro: str) -> str:
    """The first observation: the game's intro (room and goal) without the banner."""
    return intro.replace(BANNER, "").strip()


def format_observation(feedback: str) -> str:
    """A step's observation as the agent sees it (and as the SFT data stores it)."""
    return "Observation: " + _ARRIVE_RE.sub("", feedback.strip())


def match_command(command: str, admissible: list[str]) -> str:
    """Map harmless variants ("Go to Desk 1.", "put x on y") to the game's command; else unchanged."""
    if command in admissible:
        return command
    normal = " ".join(command.lower().split()).rstrip(".").strip()
    if normal in admissible:
        return normal
    put = _PUT_RE.match(normal)
    if put and f"put {put[1]} in/on {put[2]}" in admissible:
        return f"put {put[1]} in/on {put[2]}"
    return normal


# ---------------------------------------------------------------- child process side

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


def _serve_game(conn, game_file: str, memory_limit_mb: int) -> None:
    """Child process: load one game and answer ("reset",) / ("step", command) requests."""
    if memory_limit_mb > 0:
        import resource
        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler

        _translate_once()
        infos = textworld.EnvInfos(won=True, admissible_commands=True)  # no policy_commands: see module doc
        env = textworld.start(game_file, request_infos=infos, wrappers=[AlfredDemangler(shuffle=False)])
        admissible: list[str] = []
        while True:
            request = conn.recv()
            if request[0] == "reset":
                state = env.reset()
            elif request[0] == "step":
                state, _, _ = env.step(match_command(request[1], admissible))
            else:
                break
            admissible = list(state["admissible_commands"])
            conn.send(("ok", state.feedback, bool(state["won"])))
    except (EOFError, KeyboardInterrupt):
        pass
    except BaseException as e:  # report to the parent instead of dying silently
        try:
            conn.send(("error", f"{type(e).__name__}: {e}", False))
        except OSError:
            pass
    finally:
        conn.close()


def _context():
    """forkserver with textworld preloaded (cheap children, safe with threads); spawn elsewhere."""
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" not in methods:
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["textworld", "alfworld.agents.environment.alfred_tw_env", __name__])
    return ctx


# ---------------------------------------------------------------- parent side

class AlfWorldEnv(BaseEnv):
    """One ALFWorld game. Reward = won (1/0).

    env_options: reset_timeout (s, default 120), step_timeout (s, default 30),
    memory_limit_mb (address-space cap of the game process, default 4096; 0 = none).
    """

    def __init__(self, task: Any, max_steps: int = 40, reset_timeout: float = 120.0,
                 step_timeout: float = 30.0, memory_limit_mb: int = 4096, **env_options: Any):
        super().__init__(task, max_steps, **env_options)
        self.reset_timeout = float(reset_timeout)
        self.step_timeout = float(step_timeout)
        self.memory_limit_mb = int(memory_limit_mb)
        self._process = None
        self._conn = None
        self._failure_text = ""

    @property
    def game_file(self) -> Path:
        path = Path(self.task.data["game_file"])
        return path if path.is_absolute() else alfworld_data_dir() / path

    def _reset(self) -> str:
        self.close()
        if not self.game_file.exists():
            raise FileNotFoundError(f"task {self.task.id}: game file {self.game_file} not found "
                                    f"(is $ALFWORLD_DATA set? see setup.sh)")
        ctx = _context()
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(target=_serve_game, daemon=True, name=f"alfworld-{self.task.id}",
                                    args=(child_conn, str(self.game_file), self.memory_limit_mb))
        self._process.start()
        child_conn.close()
        reply = self._request(("reset",), self.reset_timeout, "reset")
        if reply is None:
            return self._failure_text
        return task_text(reply[0])

    def _act(self, action: str) -> tuple[str, float, bool, bool]:
        reply = self._request(("step", action), self.step_timeout, "step")
        if reply is None:
            return self._failure_text, 0.0, False, False  # the episode was terminated already
        feedback, won = reply
        return format_observation(feedback), float(won), won, won

    def _request(self, message: tuple, timeout: float, kind: str) -> tuple[str, bool] | None:
        """Send a request to the game process; on timeout or crash end the episode and return None."""
        try:
            self._conn.send(message)
            if not self._conn.poll(timeout):
                self._fail(f"{kind}_timeout", f"The game did not answer the {kind} within {timeout:g} s; "
                                              "the episode ends.")
                return None
            status, text, won = self._conn.recv()
        except (EOFError, OSError):
            status, text, won = "error", "the game process died", False
        if status != "ok":
            self._fail("env_error", f"The game failed during {kind} ({text}); the episode ends.")
            return None
        return text, won

    def _fail(self, reason: str, text: str) -> None:
        self._failure_text = text
        self.close(kill=True)
        self.terminate(reason)

    def close(self, kill: bool = False) -> None:
        """Stop the game process (politely, unless `kill`: a hung game gets no say)."""
        if self._conn is not None:
            if not kill:
                try:
                    self._conn.send(("close",))
                except OSError:
                    pass
            self._conn.close()
            self._conn = None
        if self._process is not None:
            if not kill:
                self._process.join(timeout=1.0)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout=5.0)
            self._process = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
