"""The episode loop, the per-task output files and the run's metrics.

One episode: env.reset() gives the task text; the model sees the instruction,
"OK", the 1-shot example and the task; then agent -> env.step -> observation
until the env says done. The stored record has FastChat turns (instruction,
"OK", task, then gpt/human turns; the example is left out).

Failures end one episode with a `terminate_reason`, never the run:
"context_overflow" (a result: the model cannot go on), "model_error: ..." and
"env_error: ..." (infrastructure failures: the task is redone by a rerun).

Each episode's meta["cost"] says what it spent: model calls, prompt and generated tokens (as the agent
reported them; None when it reports none), env steps and wall seconds. metrics.json holds their sums.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from eval_agent.agents.base import Agent, ContextOverflowError, ModelError
from eval_agent.config import TaskConfig
from eval_agent.envs.base import UNKNOWN
from eval_agent.metrics import DEFINITIONS, summarise
from eval_agent.prompt import build_messages
from eval_agent.tasks.base import Task
from fastchat.records import record_turns, trajectory_record

log = logging.getLogger(__name__)

# terminate reasons that say nothing about the model's ability: a rerun redoes these tasks
# Episodes that ended because the model server or the simulator broke: a rerun redoes them. A reset or
# step timeout is the game's own fault (it would time out again), so it is a failed episode, not one of these.
INFRASTRUCTURE_FAILURES = ("model_error", "env_error")


def is_infrastructure_failure(reason: str | None) -> bool:
    return bool(reason) and reason.split(":", 1)[0].strip() in INFRASTRUCTURE_FAILURES


class EnvPool:
    """One env instance per worker thread. Envs with `switch_task(task)` (ScienceWorld: one JVM) are
    reused across that thread's tasks; others are built anew for each task and closed after it."""

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        self.env_class = cfg.env_class()
        # an env class that sets `thread_safe = False` has its calls serialised across threads
        self.lock = nullcontext() if getattr(self.env_class, "thread_safe", True) else threading.Lock()
        self._local = threading.local()
        self._open: set = set()
        self._guard = threading.Lock()

    def acquire(self, task: Task):
        env = getattr(self._local, "env", None)
        with self.lock:
            if env is not None:
                try:
                    env.switch_task(task)
                    return env
                except Exception:
                    self._local.env = None
                    self._close(env)
                    raise
            env = self.env_class(task, max_steps=self.cfg.max_steps, success_reward=self.cfg.success_reward,
                                     **self.cfg.env_options)
        with self._guard:
            self._open.add(env)
        return env

    def release(self, env, healthy: bool) -> None:
        """Keep a healthy reusable env for this thread's next task; close anything else."""
        if healthy and hasattr(env, "switch_task"):
            self._local.env = env
            return
        self._local.env = None
        self._close(env)

    def _close(self, env) -> None:
        with self._guard:
            self._open.discard(env)
        try:
            env.close()
        except Exception:
            log.exception("env.close() failed")

    def close_all(self) -> None:
        with self._guard:
            envs = list(self._open)
        for env in envs:
            self._close(env)


def run_episode(cfg: TaskConfig, task: Task, agent: Agent, icl_num: int, instruction: str,
                icl_messages: list[dict[str, str]], envs: EnvPool | None = None, max_steps: int | None = None,
                verbose: bool = False, raise_errors: bool = False, replay: list[str] = ()) -> dict[str, Any]:
    """Play one task; return its episode record {"id", "conversations", "meta"} (fastchat.records).

    `max_steps` lowers the env's step limit (for small runs). `replay`: answers given in the agent's place for
    the first steps (a trajectory's prefix, replayed through the real env), after which the agent goes on.
    Model and env failures end the episode with a terminate reason; with `raise_errors` (--debug) an
    unexpected exception propagates instead, traceback and all.
    """
    pool = envs or EnvPool(cfg)
    env = None
    healthy = False
    started = time.monotonic()
    calls: list[tuple[int, int] | None] = []  # per model call: the tokens the agent reported, or None
    versions: set[int] = set()  # the policy versions the agent's answers came from (online RL)
    turns: list[dict[str, str]] = []
    step_scores: list[float] = []  # the episode's reward after each agent step (online RL's per-step rewards)
    step_outcomes: list[str] = []  # what became of each agent step (envs.base STEP_OUTCOMES): behaviour statistics
    reset_score = None  # the simulator's score before the first step, where step scores rise from
    final_observation = None
    try:
        env = pool.acquire(task)
        if max_steps is not None:
            env.max_steps = min(env.max_steps, max_steps)
        with pool.lock:
            first_observation = env.reset()
            reset_score = env.score_at_reset()
        turns = record_turns(instruction, first_observation)
        messages = build_messages(instruction, icl_messages, first_observation, icl_num)
        _show(verbose, task, "task", first_observation)
        replay = list(replay)
        while not env.state.finished:
            answer = replay.pop(0) if replay else _answer(agent, messages, calls, versions, env, task, raise_errors)
            if answer is None:
                break
            _show(verbose, task, "model", answer)
            messages.append({"role": "assistant", "content": answer})
            turns.append({"from": "gpt", "value": answer})
            with pool.lock:
                observation, score, done, info = env.step(answer)
            step_scores.append(score)
            step_outcomes.append(info.get("outcome", UNKNOWN))
            _show(verbose, task, "env", observation)
            if done:
                final_observation = observation
            else:
                messages.append({"role": "user", "content": observation})
                turns.append({"from": "human", "value": observation})
        healthy = True  # model failures leave the env usable; env exceptions do not
    except Exception as e:  # a broken env must not end the run
        if raise_errors:
            raise
        log.exception("task %s: environment error", task.id)
        reason = f"env_error: {type(e).__name__}: {e}"
        if env is None:
            state = {"steps": 0, "reward": 0.0, "finished": True, "success": False, "terminate_reason": reason}
        else:
            env.terminate(reason)
            state = env.state.to_dict()
    else:
        state = env.state.to_dict()
    finally:
        if env is not None:
            pool.release(env, healthy)
        if envs is None:
            pool.close_all()
    meta = {**state, "final_observation": final_observation, "step_scores": step_scores,
            "reset_score": reset_score, "step_outcomes": step_outcomes, "policy_versions": sorted(versions),
            "cost": episode_cost(calls, state["steps"], time.monotonic() - started)}
    return trajectory_record(task.id, turns, meta=meta)


def _answer(agent: Agent, messages: list[dict[str, str]], calls: list, versions: set, env, task: Task,
            raise_errors: bool) -> str | None:
    """The agent's next answer, or None after ending the episode on a model failure."""
    try:
        return _ask(agent, messages, calls, versions)
    except ContextOverflowError:
        env.terminate("context_overflow")
    except ModelError as e:
        env.terminate(f"model_error: {e}")
    except Exception as e:  # a bug in an agent class: still one failed episode, not a dead run
        if raise_errors:
            raise
        log.exception("task %s: the agent failed", task.id)
        env.terminate(f"model_error: {type(e).__name__}: {e}")
    return None


def _ask(agent: Agent, messages: list[dict[str, str]], calls: list, versions: set) -> str:
    """One model call; what the agent reported it cost goes to `calls`, even when the call fails, and the policy
    version of its answer (when the agent knows it) to `versions`."""
    try:
        return agent(messages)
    finally:
        calls.append(agent.take_usage())
        if (version := agent.take_policy_version()) is not None:
            versions.add(version)


def episode_cost(calls: list[tuple[int, int] | None], env_steps: int, seconds: float) -> dict[str, Any]:
    reported = [c for c in calls if c is not None]
    return {"model_calls": len(calls),
            "prompt_tokens": sum(c[0] for c in reported) if reported else None,
            "completion_tokens": sum(c[1] for c in reported) if reported else None,
            "env_steps": env_steps, "episode_seconds": round(seconds, 3)}


def sum_costs(costs: list[dict[str, Any]]) -> dict[str, Any]:
    """Field-by-field sums of cost records; a field no record has a number for stays None."""
    fields = dict.fromkeys(k for c in costs for k in c)
    sums = {}
    for field in fields:
        values = [c[field] for c in costs if c.get(field) is not None]
        sums[field] = round(sum(values), 3) if values else None
    return sums


def _show(verbose: bool, task: Task, who: str, text: str) -> None:
    if verbose:
        log.info("[%s] %s:\n%s", task.id, who, text)


# -- output files ----------------------------------------------------------------------------

def task_filename(task_id: str, sample: int = 0, samples_per_task: int = 1) -> str:
    """<id>.json, or <id>__s<k>.json for sample k when each task is played several times."""
    stem = re.sub(r"[^\w.\-]+", "_", str(task_id))
    return f"{stem}__s{sample}.json" if samples_per_task > 1 else f"{stem}.json"


def read_result(path: Path) -> dict[str, Any] | None:
    """The stored record, or None when missing or unreadable (a rerun then redoes the task)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("meta"), dict):
        return None
    return data


def read_episodes(folder: Path) -> dict[str, dict[str, Any]]:
    """{file stem: record} of a folder's episode files in name order; metrics files and unreadable files are left
    out."""
    found = {}
    for path in sorted(folder.glob("*.json")):
        if not path.name.startswith("metrics") and (record := read_result(path)) is not None:
            found[path.stem] = record
    return found


def is_complete(record: dict[str, Any] | None) -> bool:
    """A finished episode that did not end on an infrastructure failure is kept by reruns."""
    if record is None:
        return False
    meta = record["meta"]
    return bool(meta.get("finished")) and not is_infrastructure_failure(meta.get("terminate_reason"))


# -- metrics ------------------------------------------------------------------------------------

def compute_metrics(records: list[dict[str, Any] | None], num_tasks: int,
                    samples_per_task: int = 1) -> dict[str, Any]:
    """metrics.json: the metrics of eval_agent.metrics over the shard's tasks x samples (a missing record counts
    as reward 0), their definitions, and what the episodes ended on and cost."""
    metas = [r["meta"] for r in records if r is not None]
    reasons = Counter(str(m.get("terminate_reason")) for m in metas)
    kinds = Counter(reason_kind(r) for r in reasons.elements())
    infra = {k: n for k, n in kinds.items() if is_infrastructure_failure(k)}
    examples = {}
    for m in metas:  # one full message per failure kind, to see what went wrong without opening files
        reason = str(m.get("terminate_reason"))
        if is_infrastructure_failure(reason):
            examples.setdefault(reason_kind(reason), reason[:500])
    return {
        **summarise(records, num_tasks, samples_per_task),
        "definitions": DEFINITIONS,
        "num_infrastructure_failures": sum(infra.values()),
        "terminate_reasons": dict(sorted(kinds.items())),
        "infrastructure_failures": dict(sorted(infra.items())),
        "failure_examples": examples,
        # episode files written before costs were recorded have none
        "cost": sum_costs([m["cost"] for m in metas if "cost" in m]),
    }


def reason_kind(reason: str) -> str:
    """Group 'model_error: <details>' under 'model_error'."""
    return reason.split(":", 1)[0].strip()
