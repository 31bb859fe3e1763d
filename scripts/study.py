"""A study: several methods (arms) x several seeds, each seed's arms started from one shared SFT start, run unit by
unit into result files that are committed, and a table built from those files only (docs/study.md).

    python -m scripts.study scripts/studies/cpu_sciworld.yaml                  # run what is not done, then the table
    python -m scripts.study scripts/studies/cpu_sciworld.yaml --seeds 0 --arms eto bon   # only these units
    python -m scripts.study scripts/studies/cpu_sciworld.yaml --dry_run        # the plan: done, to run, commands
    python -m scripts.study scripts/studies/cpu_sciworld.yaml --table_only     # table.md, table.json, figure.png

The study file (YAML) names the task, the model, where run folders go (save_path) and where result files go
(results, relative to the repository root), the seeds (each run's --subset_seed), the knobs every run gets (shared)
and the arms (a name, a method and its own knobs). Per seed it runs, one after the other, as subprocesses of
`python -m scripts.eto_pipeline` with their output in <save_path>/<name>/logs/<run>.log:

- the start `start-s<seed>`: --method eto --iterations 0 + shared: eval_base (with eval_base 1), SFT, eval_sft;
- each arm `<arm>-s<seed>`: shared + the arm's knobs + --method + --from_run start-s<seed>, which takes over the
  start's SFT model and evaluations instead of making them again (Pipeline.start_from_run).

Each run is a unit. A finished unit writes <results>/<run>.json: its command, the commit, its own test evaluations
(row and per-task rewards) and its own cost. A unit whose result file exists is done, whether or not its run folder
is still there, so a study goes on from its committed result files on a fresh machine; an arm whose start's run
folder is gone re-makes the start (the pipeline resumes a half-finished one) and records whether the re-made start's
evaluations equal the committed ones (start_reproduced). The table (<results>/table.md, table.json, figure.png) is
built from the result files alone: per seed and pooled over seeds, with paired differences against SFT and against
ETO's first iteration; units not finished show as "not run yet" with the command that runs them.
"""
from __future__ import annotations

import argparse
import datetime
import difflib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eval_agent.config import ConfigError, load_task_config
from eval_agent.metrics import bootstrap_interval
from eval_agent.run_layout import RunLayout, eval_stage, iteration_number, rl_step_number
from eval_agent.runner import sum_costs
from fastchat.records import write_json_atomic, write_text_atomic
from scripts.pipeline.methods import METHODS
from scripts.pipeline.services import run_logged
from scripts.pipeline.settings import KNOBS, START_KNOBS, SettingsError, read_value
from scripts.pipeline.summary import (
    BEST_OF_K_LABEL,
    COST_LABELS,
    TEST_STAGE_LABELS,
    behaviour_table,
    best_of_k_stages,
    cost_total,
    paired_difference,
    stage_row,
)

PROG = "python -m scripts.study"
REPO = Path(__file__).resolve().parents[1]
START = "start"  # the start runs: start-s<seed>
FIELDS = {"name": "the study's name: its folder under save_path", "task": "the task (webshop, sciworld, alfworld, ...)",
          "model": 'the base model folder ("": the embedded default model)',
          "save_path": "the root of the run folders (<save_path>/<name>/<run>), relative to the repository root",
          "results": "the folder of the result files and the table, relative to the repository root",
          "seeds": "a list of integers: each run's --subset_seed", "shared": "knob -> value, given to every run",
          "arms": "a list of {name, method, flags: knob -> value}"}
REQUIRED = ("name", "task", "save_path", "results", "seeds", "arms")
ARM_FIELDS = ("name", "method", "flags")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# set by the runner, never by the study file
RUNNER_KNOBS = {"method": "each arm's method field", "subset_seed": "the seeds field", "from_run": "the runner"}
# the knobs that make a start: an arm must take them from shared, or --from_run refuses the start (sft_data: its hash)
ARM_FORBIDDEN = {k for k in START_KNOBS if k in KNOBS} | {"sft_data"}
COST_SHOWN = ("train_tokens", "completion_tokens", "env_steps", "wall_seconds", "gpu_seconds")
RESULT_FORMAT = 1


class StudyError(ValueError):
    """A study that cannot be run or tabled as it is; the message says where and what to do."""


class UnitFailed(StudyError):
    """A unit's run exited with an error."""


# --- the study file ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arm:
    name: str
    method: str
    flags: dict[str, Any] = field(default_factory=dict)  # knob -> checked value


@dataclass
class Study:
    path: Path  # the study file
    name: str
    task: str
    model: str
    save_path: str
    results: str
    seeds: list[int]
    shared: dict[str, Any]
    arms: list[Arm]

    @property
    def save_arg(self) -> str:
        """The runs' save_path argument, as the study file gives it (relative: to the repository root)."""
        return f"{self.save_path.rstrip('/')}/{self.name}"

    @property
    def folder(self) -> Path:
        """<save_path>/<name>: the run folders and logs/."""
        return _in_repo(self.save_arg)

    @property
    def results_dir(self) -> Path:
        return _in_repo(self.results)

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def units(self, seeds: list[int] | None = None, arms: list[str] | None = None) -> list[Unit]:
        """Per seed the start, then the arms in the study file's order."""
        chosen = [a for a in self.arms if arms is None or a.name in arms]
        return [u for seed in (self.seeds if seeds is None else seeds)
                for u in [Unit(self, seed, None)] + [Unit(self, seed, a) for a in chosen]]

    def shown_path(self) -> str:
        """The study file in commands: relative to the repository root when it lies in it."""
        resolved = self.path.resolve()
        return str(resolved.relative_to(REPO)) if REPO in resolved.parents else str(self.path)


def _in_repo(text: str) -> Path:
    path = Path(text)
    return path if path.is_absolute() else REPO / path


def load_study(path: Path | str) -> Study:
    """The study file `path`, checked; StudyError naming the file and the field otherwise."""
    path = Path(path)
    label = str(path)

    def fail(where: str, problem: str) -> StudyError:
        return StudyError(f"{label}: {where}: {problem}" if where else f"{label}: {problem}")

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise fail("", f"cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise fail("", "not valid YAML" + (f" (line {mark.line + 1})" if mark else "")) from None
    if not isinstance(data, dict):
        raise fail("", f"expected a mapping with the fields {', '.join(FIELDS)}, got {type(data).__name__}")
    for key in data:
        if key not in FIELDS:
            close = difflib.get_close_matches(str(key), FIELDS, n=1)
            raise fail(str(key), "not a field of a study" + (f" (did you mean {close[0]}?)" if close else "")
                       + f"; the fields: {', '.join(FIELDS)}")
    for key in REQUIRED:
        if key not in data or data[key] is None:
            raise fail(key, f"missing: {FIELDS[key]}")

    def text(key: str, value: Any, name_like: bool = False) -> str:
        if not isinstance(value, str) or (not value and key != "model"):
            raise fail(key, f"expected {'a name' if name_like else 'text'}, got {value!r}")
        if name_like and not NAME.fullmatch(value):
            raise fail(key, f"{value!r}: a name of letters, digits, '_', '.' and '-' (a folder name)")
        return value

    name = text("name", data["name"], name_like=True)
    task = text("task", data["task"])
    try:
        load_task_config(task)
    except ConfigError as e:
        raise fail("task", str(e)) from None
    model = text("model", data.get("model", "") or "")
    save_path, results = text("save_path", data["save_path"]), text("results", data["results"])
    seeds = data["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise fail("seeds", f"expected a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise fail("seeds", f"a seed is listed twice: {seeds}")

    def knobs(where: str, raw: Any, forbidden: dict[str, str]) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise fail(where, f"expected a mapping of knob names to values, got {type(raw).__name__}")
        found = {}
        for key, value in raw.items():
            at = f"{where}.{key}"
            if key not in KNOBS:
                close = difflib.get_close_matches(str(key), KNOBS, n=1)
                raise fail(at, "not a knob" + (f" (did you mean {close[0]}?)" if close else "")
                           + "; the knobs: docs/knobs.md")
            if key in forbidden:
                raise fail(at, forbidden[key])
            try:
                found[key] = read_value(key, value, f"{label}: {at}", from_file=True)
            except SettingsError as e:
                raise StudyError(str(e)) from None
        return found

    set_by_runner = {k: f"set by the runner ({why}), not by the study file" for k, why in RUNNER_KNOBS.items()}
    shared = knobs("shared", data.get("shared"), {
        **set_by_runner, "self_play": "a self-play run makes its own start from the base model's explorations; the "
                                      "arms of a study share an SFT start (--from_run)"})
    arms_raw = data["arms"]
    if not isinstance(arms_raw, list) or not arms_raw:
        raise fail("arms", f"expected a non-empty list of {{name, method, flags}}, got {arms_raw!r}")
    arms: list[Arm] = []
    for i, raw in enumerate(arms_raw):
        where = f"arms[{i}]"
        if not isinstance(raw, dict):
            raise fail(where, f"expected a mapping with name, method and flags, got {raw!r}")
        for key in raw:
            if key not in ARM_FIELDS:
                raise fail(f"{where}.{key}", f"not a field of an arm; the fields: {', '.join(ARM_FIELDS)}")
        for key in ("name", "method"):
            if raw.get(key) is None:
                raise fail(f"{where}.{key}", "missing")
        arm_name = text(f"{where}.name", raw["name"], name_like=True)
        if arm_name == START:
            raise fail(f"{where}.name", f"{START!r} is the name of the shared start runs; give the arm another")
        if arm_name in [a.name for a in arms]:
            raise fail(f"{where}.name", f"{arm_name!r} is used twice; arm names must differ")
        method = raw["method"]
        if method not in METHODS:
            raise fail(f"{where}.method", f"expected one of {', '.join(METHODS)}, got {method!r}")
        forbidden = {**set_by_runner, **{k: "a setting of the shared start (START_KNOBS in scripts/pipeline/"
                                            "settings.py): every arm of a seed takes over the same start, so put it "
                                            "in shared" for k in ARM_FORBIDDEN}}
        arms.append(Arm(arm_name, method, knobs(f"{where}.flags", raw.get("flags"), forbidden)))
    return Study(path=path, name=name, task=task, model=model, save_path=save_path, results=results, seeds=seeds,
                 shared=shared, arms=arms)


# --- units ------------------------------------------------------------------------------------------------------

def flag_text(value: Any) -> str:
    """A knob's value as its flag takes it: bools 1/0, lists space-separated."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list):
        return " ".join(flag_text(x) for x in value)
    return repr(value) if isinstance(value, float) else str(value)


def portable(arg: str) -> str:
    """An argument as a result file records it: an absolute path relative to the repository root when it lies in
    it; any other absolute path is this machine's, and only its last part is kept."""
    if not arg.startswith("/"):
        return arg
    path = Path(arg)
    resolved = path.resolve()
    if resolved == REPO or REPO in resolved.parents:
        return str(resolved.relative_to(REPO)) or "."
    return f"<outside the repository>/{path.name}"


@dataclass(frozen=True)
class Unit:
    study: Study
    seed: int
    arm: Arm | None  # None: the seed's start

    @property
    def run(self) -> str:
        return f"{self.arm.name if self.arm else START}-s{self.seed}"

    @property
    def method(self) -> str:
        return self.arm.method if self.arm else "eto"

    @property
    def start(self) -> Unit:
        return Unit(self.study, self.seed, None)

    @property
    def run_dir(self) -> Path:
        return self.study.folder / self.run

    @property
    def result_file(self) -> Path:
        return self.study.results_dir / f"{self.run}.json"

    @property
    def log(self) -> Path:
        return RunLayout(self.study.folder).log(self.run)  # the study folder keeps its runs' logs as a run does

    def knobs(self) -> dict[str, str]:
        """The run's flags, knob -> text: shared, the arm's, then what the runner sets."""
        values = dict(self.study.shared)
        if self.arm is None:
            values.update(method="eto", iterations=0, subset_seed=self.seed)
        else:
            values.update(self.arm.flags)
            values.update(method=self.arm.method, subset_seed=self.seed, from_run=self.start.run)
        return {k: flag_text(v) for k, v in values.items()}

    def args(self) -> list[str]:
        """scripts.eto_pipeline's arguments."""
        flags = [x for k, v in self.knobs().items() for x in (f"--{k}", v)]
        return [self.study.task, self.run, self.study.model, self.study.save_arg, *flags]

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "scripts.eto_pipeline", *self.args()]

    def command(self) -> str:
        """The run's command as result files record it (run from the repository root)."""
        return shlex.join(["python", "-m", "scripts.eto_pipeline", *(portable(a) for a in self.args())])

    def study_command(self) -> str:
        """The command that runs this unit (a missing start with its seed's arms)."""
        only = f" --seeds {self.seed}" + (f" --arms {self.arm.name}" if self.arm else "")
        return f"{PROG} {self.study.shown_path()}{only}"

    def identity(self) -> dict:
        """What makes the unit this unit; a result file made with another identity is another unit's."""
        return {"study": self.study.name, "unit": self.run, "seed": self.seed,
                "arm": self.arm.name if self.arm else None, "method": self.method, "task": self.study.task,
                "model": portable(self.study.model), "knobs": self.knobs()}


def read_result(unit: Unit) -> dict | None:
    """The unit's result file, None when there is none; StudyError when it was made with other settings."""
    path = unit.result_file
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise StudyError(f"{path}: not a readable result file ({e}); delete it to rerun the unit") from None
    want = unit.identity()
    differ = [k for k in want if k != "knobs" and result.get(k) != want[k]]
    knobs_then, knobs_now = result.get("knobs") or {}, want["knobs"]
    differ += [f"--{k}: {knobs_then.get(k)!r} there, {knobs_now.get(k)!r} in the study" for k in
               sorted(set(knobs_then) | set(knobs_now)) if knobs_then.get(k) != knobs_now.get(k)]
    if differ:
        lines = "\n".join(f"  {d if d.startswith('--') else f'{d}: {result.get(d)!r} there, {want[d]!r} here'}"
                          for d in differ)
        raise StudyError(f"{path} was made with other settings than {unit.study.path} gives unit {unit.run}:\n{lines}\n"
                         "delete the result file (and the run folder) to rerun the unit, or restore the study's value")
    return result


# --- a finished run's results -----------------------------------------------------------------------------------

def stage_order(stage: str) -> tuple[float, str]:
    """base, SFT, then iterations / RL steps by number, then any other evaluation (bon)."""
    if stage in TEST_STAGE_LABELS:
        return list(TEST_STAGE_LABELS).index(stage) - len(TEST_STAGE_LABELS), stage
    number = iteration_number(stage)
    number = rl_step_number(stage) if number is None else number
    return (float("inf") if number is None else float(number)), stage


def own_evaluations(run_dir: Path) -> list[dict]:
    """The test evaluations the run made itself (stages it took over with --from_run left out): their summary row
    and per-task rewards (summary.stage_row: a best-of-K evaluation's task reward is its best sample's)."""
    layout = RunLayout(run_dir)
    summary = json.loads(layout.summary_json.read_text(encoding="utf-8"))
    taken, best = summary.get("taken_over") or {}, best_of_k_stages()
    labels = {c["stage"]: c["label"] for c in summary.get("test_reward_by_stage", [])}
    found = []
    for row in summary["results"]:
        stage = row["stage"]
        if row["split"] != "test" or stage in taken:
            continue
        record = json.loads(layout.stage_record(stage).read_text(encoding="utf-8"))
        _, rewards = stage_row(stage, record["metrics"], layout.episode_dir(stage), stage in best)
        if not rewards:
            raise StudyError(f"{layout.episode_dir(stage)}: no episode files, so no per-task rewards to pair")
        found.append({"stage": stage, "label": labels.get(stage, stage.removeprefix(eval_stage(""))),
                      "best_of_k": stage in best, "row": row, "rewards": rewards})
    return sorted(found, key=lambda e: stage_order(e["stage"]))


def own_cost(run_dir: Path) -> dict:
    """The sums of the run's own stages' costs (summary.json costs; taken-over stages left out); peaks: the max."""
    summary = json.loads(RunLayout(run_dir).summary_json.read_text(encoding="utf-8"))
    taken = summary.get("taken_over") or {}
    return cost_total([r for r in summary["costs"]["stages"] if r["stage"] not in taken])


def git_state(results_dir: Path) -> dict:
    """The commit the runs ran from and whether the tree differed from it (the result files' folder left out)."""
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    spec = ["--", "."]
    if REPO in results_dir.resolve().parents:
        spec.append(f":(exclude){results_dir.resolve().relative_to(REPO)}")
    status = git("status", "--porcelain", *spec)
    return {"commit": commit.strip() if commit else None, "dirty": None if status is None else bool(status.strip())}


def start_check(start: Unit, committed: dict) -> tuple[bool, list[str]]:
    """Whether the start's run folder has the committed start's evaluations, task for task; what differs."""
    now = {e["stage"]: e["rewards"] for e in own_evaluations(start.run_dir)}
    differ = []
    for e in committed["evaluations"]:
        mine = now.get(e["stage"])
        if mine is None:
            differ.append(f"{e['stage']}: not in the re-made run")
            continue
        tasks = sorted(set(mine) | set(e["rewards"]))
        changed = [t for t in tasks if mine.get(t) != e["rewards"].get(t)]
        if changed:
            differ.append(f"{e['stage']}: {len(changed)} of {len(tasks)} tasks differ (e.g. {changed[0]}: "
                          f"{e['rewards'].get(changed[0])} committed, {mine.get(changed[0])} now)")
    return not differ, differ


def export(unit: Unit, **extra) -> dict:
    """Write the finished unit's result file (atomically)."""
    result = {"format": RESULT_FORMAT, **unit.identity(), "command": unit.command(),
              "from_run": unit.start.run if unit.arm else None, "git": git_state(unit.study.results_dir),
              "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **extra,
              "evaluations": own_evaluations(unit.run_dir), "cost": own_cost(unit.run_dir)}
    write_json_atomic(unit.result_file, result, indent=1)
    return result


# --- running ----------------------------------------------------------------------------------------------------

def run_environment() -> dict[str, str]:
    """This process's environment without knob variables (ETO_<KNOB>, and the bare <KNOB> of earlier releases):
    a run's settings are the study file's, all of them on its command line."""
    names = {f"ETO_{k.upper()}" for k in KNOBS} | {k.upper() for k in KNOBS}
    dropped = sorted(n for n in names if n in os.environ)
    if dropped:
        print(f"[study] not passed to the runs (the study file sets their knobs): {', '.join(dropped)}", flush=True)
    return {k: v for k, v in os.environ.items() if k not in names}


def launch(unit: Unit, env: dict[str, str]) -> int:
    """Run the unit's pipeline from the repository root, its output appended to its log; its exit status. The run
    is its own process group, stopped (it stops what it started) when this process is interrupted."""
    header = f"\n[study {datetime.datetime.now().isoformat(timespec='seconds')}] $ {shlex.join(unit.argv())}"
    return run_logged(unit.argv(), unit.log, header, env, REPO)


def execute(unit: Unit, env: dict[str, str], position: str) -> float:
    """Run the unit (one progress line); its seconds. UnitFailed with its log's last lines when it fails."""
    print(f"[study] {position} {unit.run}: running (log: {unit.log})", flush=True)
    started = time.time()
    code = launch(unit, env)
    if code != 0:
        tail = unit.log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:] if unit.log.exists() else []
        raise UnitFailed(f"{unit.run} failed (exit {code}); its log: {unit.log}\n" + "\n".join(f"  {x}" for x in tail)
                         + "\nfix the cause and rerun the same command: the study goes on from there")
    return time.time() - started


def run_finished(unit: Unit) -> bool:
    """Whether the unit's run folder holds its finished run (the pipeline writes the summary last)."""
    return RunLayout(unit.run_dir).summary_json.is_file()


def headline(result: dict) -> str:
    return ", ".join(f"{e['label']} {reward_of(e['row'], e['best_of_k']):.3f}" for e in result["evaluations"])


def run_study(study: Study, seeds: list[int], arms: list[str], dry_run: bool = False) -> int:
    """Run every chosen unit that has no result file (see the module docstring), then write the table."""
    units = study.units(seeds, arms)
    env = {} if dry_run else run_environment()
    if not dry_run and "sft_data" in study.shared and not _in_repo(study.shared["sft_data"]).exists():
        raise StudyError(f"{study.path}: shared.sft_data: {study.shared['sft_data']} does not exist (relative to the "
                         f"repository root {REPO}); build it first (see the study file's comments)")
    print(f"[study] {study.name}: {study.task}, seeds {', '.join(map(str, seeds))}, arms "
          f"{', '.join(a.name for a in study.arms if a.name in arms)}; run folders {study.folder}, results "
          f"{study.results_dir}", flush=True)
    for i, unit in enumerate(units, start=1):
        position = f"{i}/{len(units)}"
        done = read_result(unit)
        if done is not None:
            print(f"[study] {position} {unit.run}: done ({_shown(unit.result_file)}: {headline(done)})", flush=True)
            continue
        extra: dict[str, Any] = {}
        if unit.arm is not None:
            start = unit.start
            committed = read_result(start)
            remade = committed is not None and not run_finished(start)
            if dry_run:
                if remade:
                    print(f"[study] {position} {unit.run}: would re-make {start.run} first (its run folder is "
                          f"missing or unfinished; its result file stays): {start.command()}")
                print(f"[study] {position} {unit.run}: would run: {unit.command()}")
                continue
            if committed is None:  # the start comes first in every seed; not reached
                raise StudyError(f"{start.result_file}: missing; the start must finish before its arms")
            if remade:
                print(f"[study] {position} {unit.run}: {start.run}'s run folder is missing or unfinished; re-making "
                      f"it from its command (its committed result file stays)", flush=True)
                seconds = execute(start, env, position)
                print(f"[study] {position} {start.run}: re-made in {seconds:.0f} s", flush=True)
            same, differ = start_check(start, committed)
            if not same:
                warn(f"{start.run} was re-made and its evaluations differ from the committed "
                     f"{_shown(start.result_file)}:\n" + "\n".join(f"    {d}" for d in differ) +
                     f"\n  {unit.run} is trained from the re-made start; its result file says start_reproduced: "
                     "false and the table marks it")
            extra = {"start_reproduced": same, "start_remade": remade}
        elif dry_run:
            print(f"[study] {position} {unit.run}: would run: {unit.command()}")
            continue
        seconds = execute(unit, env, position)
        result = export(unit, **extra)
        print(f"[study] {position} {unit.run}: finished in {seconds:.0f} s -> {_shown(unit.result_file)} "
              f"({headline(result)})", flush=True)
        try:  # the table of what has finished so far
            write_table(study)
        except StudyError as e:
            warn(f"the table cannot be built yet: {e}")
    if dry_run:
        return 0
    table = write_table(study)
    print(table["markdown"])
    print(f"[study] table: {_shown(study.results_dir / 'table.md')}, table.json, figure.png")
    return 0


def warn(text: str) -> None:
    bar = "!" * 100
    print(f"{bar}\n[study] WARNING: {text}\n{bar}", file=sys.stderr, flush=True)


def _shown(path: Path) -> str:
    resolved = path.resolve()
    return str(resolved.relative_to(REPO)) if REPO in resolved.parents else str(path)


# --- the table --------------------------------------------------------------------------------------------------

def reward_of(row: dict, best_of_k: bool) -> float:
    return row["best_of_k_reward"] if best_of_k else row["average_reward"]


def row_name(unit: Unit, evaluation: dict) -> str:
    if unit.arm is None:
        return TEST_STAGE_LABELS.get(evaluation["stage"], evaluation["label"])
    if evaluation["best_of_k"] or evaluation["label"] == BEST_OF_K_LABEL:
        return unit.arm.name
    return f"{unit.arm.name} {evaluation['label']}"


def build_table(study: Study) -> dict:
    """The table of the module docstring, from the result files only."""
    units = study.units()
    results = {u.run: read_result(u) for u in units}
    rows: dict[str, dict] = {}  # row name -> row, in the table's order
    groups = [None, *study.arms]
    cells: dict[tuple[str, int], dict] = {}
    for group in groups:
        group_units = [u for u in units if u.arm == group]
        found = {}
        for u in group_units:
            for e in (results[u.run] or {}).get("evaluations", []):
                found.setdefault(row_name(u, e), e["stage"])
                cells[(row_name(u, e), u.seed)] = {"unit": u, "evaluation": e}
        if not found:  # no seed has run yet: the rows are known once one has
            if group is None:
                found = {n: s for s, n in TEST_STAGE_LABELS.items()
                         if study.shared.get("eval_base") or s != eval_stage("base")}
            else:
                found = {group.name: None}
        for name, stage in sorted(found.items(), key=lambda x: stage_order(x[1] or "")):
            rows[name] = {"row": name, "arm": group.name if group else START, "stage": stage,
                          "method": group.method if group else None}
    # paired: the evaluations of a seed must have played the same tasks
    for seed in study.seeds:
        sets = {f"{c['unit'].run} {c['evaluation']['stage']}": sorted(c["evaluation"]["rewards"])
                for (_, s), c in cells.items() if s == seed}
        distinct = {tuple(v) for v in sets.values()}
        if len(distinct) > 1:
            first = next(iter(sets))
            odd = [k for k, v in sets.items() if v != sets[first]]
            raise StudyError(f"seed {seed}: the evaluations did not play the same test tasks, so their differences "
                             f"cannot be paired: {first} has {len(sets[first])} tasks, "
                             + ", ".join(f"{k} {len(sets[k])} ({len(set(sets[k]) ^ set(sets[first]))} differ)"
                                         for k in odd)
                             + "; every run of a seed must have the same test_tasks and subset_seed")
    rewards: dict[str, dict[tuple[int, str], float]] = {name: {} for name in rows}
    flagged = set()
    for name, row in rows.items():
        per_seed = {}
        for seed in study.seeds:
            unit = Unit(study, seed, None if row["arm"] == START else study.arm(row["arm"]))
            cell = cells.get((name, seed))
            if results[unit.run] is None:
                per_seed[str(seed)] = {"status": "not run yet", "command": unit.study_command()}
            elif cell is None:
                per_seed[str(seed)] = {"status": "no evaluation", "unit": unit.run}
            else:
                e, r = cell["evaluation"], cell["evaluation"]["row"]
                best = e["best_of_k"]
                samples = r.get("samples_per_task") or 1
                per_seed[str(seed)] = {
                    "status": "done", "unit": unit.run, "stage": e["stage"], "tasks": r["tasks"],
                    "samples_per_task": samples, "average_reward": reward_of(r, best),
                    "reward_ci95": r.get("best_of_k_ci95" if best else "reward_ci95"),
                    "success_rate": r["success_rate"], "success_ci95": r.get("success_ci95"),
                    "num_success": r.get("num_success"), "episodes": r["tasks"] * samples,
                    "behaviour": r.get("behaviour")}
                if results[unit.run].get("start_reproduced") is False:
                    per_seed[str(seed)]["start_reproduced"] = False
                    flagged.add(name)
                rewards[name].update({(seed, t): v for t, v in e["rewards"].items()})
        done = [c for c in per_seed.values() if c["status"] == "done"]
        values = [rewards[name][k] for k in sorted(rewards[name])]
        row["best_of_k"] = any(c["evaluation"]["best_of_k"] for (n, _), c in cells.items() if n == name)
        row["per_seed"] = per_seed
        row["pooled"] = None if not done else {
            "seeds": [int(s) for s, c in per_seed.items() if c["status"] == "done"], "tasks": len(values),
            "average_reward": sum(values) / len(values), "reward_ci95": list(bootstrap_interval(values)),
            "num_success": sum(c["num_success"] or 0 for c in done), "episodes": sum(c["episodes"] for c in done)}
        row["start_reproduced"] = name not in flagged
    differences = []
    eto = next((a for a in study.arms if a.method == "eto"), None)
    references = ["SFT"] + ([f"{eto.name} iter1"] if eto else [])
    arm_rows = [n for n, r in rows.items() if r["arm"] != START]
    wanted = [("SFT", "base")] if "base" in rows else []
    for ref in references:
        # an arm with no result yet has one row, its name; no difference of it against its own first iteration
        wanted += [(n, ref) for n in arm_rows if n != ref and not (ref != "SFT" and rows[n]["stage"] is None
                                                                    and rows[n]["arm"] == eto.name)]
    for after, before in wanted:
        per_seed, pooled_before, pooled_after = {}, {}, {}
        for seed in study.seeds:
            cell_a = rows[after]["per_seed"][str(seed)] if after in rows else {"status": "not run yet"}
            cell_b = rows[before]["per_seed"][str(seed)] if before in rows else {"status": "not run yet"}
            if cell_a["status"] == cell_b["status"] == "done":
                a = {t: v for (s, t), v in rewards[after].items() if s == seed}
                b = {t: v for (s, t), v in rewards[before].items() if s == seed}
                per_seed[str(seed)] = {"status": "done", **paired_difference(b, a)}
                pooled_after.update({(seed, t): v for t, v in a.items()})
                pooled_before.update({(seed, t): v for t, v in b.items()})
            else:
                per_seed[str(seed)] = {"status": next(c["status"] for c in (cell_a, cell_b) if c["status"] != "done")}
        seeds_done = [int(s) for s, d in per_seed.items() if d["status"] == "done"]
        differences.append({"label": f"{after} - {before}", "after": after, "before": before, "per_seed": per_seed,
                            "pooled": {"seeds": seeds_done, **paired_difference(pooled_before, pooled_after)}
                            if seeds_done else None})
    costs = []
    for group in groups:
        group_units = [u for u in units if u.arm == group]
        made = [u for u in group_units if results[u.run] is not None]
        total = sum_costs([{f: results[u.run]["cost"].get(f) for f in COST_LABELS if not f.startswith("peak")}
                           for u in made])
        costs.append({"row": "shared start" if group is None else group.name,
                      "seeds": [u.seed for u in made], "not_run_yet": [u.seed for u in group_units if u not in made],
                      **{f: total.get(f) for f in COST_LABELS if not f.startswith("peak")}})
    grand = sum_costs([{f: c[f] for f in c if f in COST_LABELS} for c in costs])
    costs.append({"row": "total", "seeds": None, "not_run_yet": None, **grand})
    missing = [{"unit": u.run, "seed": u.seed, "arm": u.arm.name if u.arm else None, "command": u.study_command(),
                "run_command": u.command()} for u in units if results[u.run] is None]
    return {"study": study.name, "task": study.task, "model": portable(study.model) or "(embedded default)",
            "study_file": study.shown_path(), "seeds": study.seeds,
            "arms": [{"name": a.name, "method": a.method, "flags": {k: flag_text(v) for k, v in a.flags.items()}}
                     for a in study.arms],
            "shared": {k: flag_text(v) for k, v in study.shared.items()},
            "units": {"finished": len(units) - len(missing), "all": len(units)},
            "rows": list(rows.values()), "paired_differences": differences, "costs": costs, "not_run_yet": missing,
            "definitions": DEFINITIONS}


DEFINITIONS = {
    "average_reward": "per seed: the evaluation's average reward over its test tasks (a best-of-K row: the mean of "
                      "each task's best sample), with its 95% bootstrap interval over tasks",
    "success_rate": "per seed: the original ETO's success over the episodes (a best-of-K row: over all K samples)",
    "pooled": "every (seed, task) reward of the row's finished seeds together: their mean and a 95% bootstrap "
              "interval over them (eval_agent.metrics.bootstrap_interval); success: successes / episodes",
    "paired_differences": "after - before on the same test tasks: per seed over that seed's tasks, pooled over the "
                          "(seed, task) pairs of the seeds where both rows ran, in (seed, task id) order; mean, 95% "
                          "bootstrap interval of the differences, tasks better / worse / same "
                          "(scripts.pipeline.summary.paired_difference)",
    "cost": "the sums of each run's own stages (stages taken over from the start are counted in the start)",
}


def _num(value: float | None, places: int = 3) -> str:
    return "-" if value is None else f"{value:.{places}f}"


def _ci(ci: list | None, places: int = 3, sign: str = "") -> str:
    return "" if not ci else f" [{ci[0]:{sign}.{places}f}, {ci[1]:{sign}.{places}f}]"


def _amount(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if isinstance(value, float) else f"{value:,}"


def _pending(per_seed: dict) -> str:
    """A pooled cell without a finished seed: not run yet, or no evaluation where units ran without one."""
    return "not run yet" if all(c["status"] == "not run yet" for c in per_seed.values()) else "-"


def markdown(table: dict) -> str:
    seeds = table["seeds"]
    units = table["units"]
    lines = [f"# Study `{table['study']}`: {table['task']}, seeds {', '.join(map(str, seeds))}", "",
             f"Built by `{PROG} {table['study_file']} --table_only` from the result files beside this file only: "
             f"{units['finished']} of {units['all']} units finished. Model: {table['model']}. Shared knobs: "
             + (" ".join(f"`--{k} {v}`" for k, v in table["shared"].items()) or "none") + ".", "",
             "Arms: " + "; ".join(f"{a['name']} (`--method {a['method']}`"
                                  + "".join(f" `--{k} {v}`" for k, v in a["flags"].items()) + ")"
                                  for a in table["arms"]) + ".", "",
             "## Test reward", ""]
    head = ["row"]
    for s in seeds:
        head += [f"seed {s}: avg reward [95% CI]", "success [95% CI]", "tasks"]
    head += ["pooled: avg reward [95% CI]", "success", "tasks"]
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in table["rows"]:
        name = row["row"] + (" (best-of-K)" if row["best_of_k"] else "") + ("" if row["start_reproduced"] else " (!)")
        cells = [name]
        for s in seeds:
            c = row["per_seed"][str(s)]
            if c["status"] == "done":
                cells += [f"{_num(c['average_reward'])}{_ci(c['reward_ci95'])}",
                          f"{_num(c['success_rate'], 2)}{_ci(c['success_ci95'], 2)}", str(c["tasks"])]
            else:
                cells += [c["status"], "", ""]
        p = row["pooled"]
        cells += [_pending(row["per_seed"]), "", ""] if p is None else [
            f"{_num(p['average_reward'])}{_ci(p['reward_ci95'])}", f"{p['num_success']}/{p['episodes']}",
            str(p["tasks"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "avg reward: the paper's metric, with a 95% bootstrap interval over the seed's test tasks. best-of-K "
              "rows: each task's best of its K samples (success over all K samples). pooled: every (seed, task) "
              "reward of the seeds that ran, with a bootstrap interval over them."]
    if any(not r["start_reproduced"] for r in table["rows"]):
        lines += ["", "(!): the run's start was re-made and its evaluations differ from the committed start's "
                  "(start_reproduced: false in its result file): its differences against SFT mix two SFT models."]
    if table["paired_differences"]:
        lines += ["", "## Paired differences (same test tasks)", ""]
        head = ["difference"]
        for s in seeds:
            head += [f"seed {s}: mean [95% CI]", "better / worse / same"]
        head += ["pooled: mean [95% CI]", "better / worse / same"]
        lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for d in table["paired_differences"]:
            cells = [d["label"]]
            for s in seeds:
                c = d["per_seed"][str(s)]
                cells += ([f"{c['mean']:+.3f}{_ci(c['ci95'], sign='+')}", f"{c['better']} / {c['worse']} / {c['same']}"]
                          if c["status"] == "done" else [c["status"], ""])
            p = d["pooled"]
            cells += [_pending(d["per_seed"]), ""] if p is None else [f"{p['mean']:+.3f}{_ci(p['ci95'], sign='+')}",
                                                            f"{p['better']} / {p['worse']} / {p['same']}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Per seed over that seed's test tasks; pooled over the (seed, task) pairs of the seeds where "
                  "both rows ran. Every run of a seed played the same test tasks."]
    acted = [(f"{row['row']}, seed {s}", c.get("behaviour")) for row in table["rows"] for s, c in
             row["per_seed"].items() if c["status"] == "done"]
    if any(a for _, a in acted):
        lines += ["", "## Behaviour", ""] + behaviour_table(acted)[1:]
    shown = [f for f in COST_SHOWN if any(c.get(f) is not None for c in table["costs"])]
    lines += ["", "## Cost (each run's own stages, summed over seeds)", "",
              "| | seeds | " + " | ".join(COST_LABELS[f] for f in shown) + " |", "|---" * (len(shown) + 2) + "|"]
    for c in table["costs"]:
        seeds_cell = "" if c["seeds"] is None else (", ".join(map(str, c["seeds"])) or "-") + (
            f" (not run yet: {', '.join(map(str, c['not_run_yet']))})" if c["not_run_yet"] else "")
        lines.append(f"| {c['row']} | {seeds_cell} | " + " | ".join(_amount(c.get(f)) for f in shown) + " |")
    if table["not_run_yet"]:
        lines += ["", "## Not run yet", "", "| unit | command |", "|---|---|"]
        lines += [f"| {m['unit']} | `{m['command']}` |" for m in table["not_run_yet"]]
    lines += ["", "![pooled test reward per row](figure.png)"]
    return "\n".join(lines)


def plot(table: dict, path: Path) -> None:
    """A bar per row: the pooled average reward with its 95% interval; rows not run yet have no bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["rows"]
    arms = [START] + [a["name"] for a in table["arms"]]
    palette = plt.get_cmap("tab10")
    xs = list(range(len(rows)))
    ys = [r["pooled"]["average_reward"] if r["pooled"] else 0.0 for r in rows]
    cis = [r["pooled"]["reward_ci95"] if r["pooled"] else [y, y] for y, r in zip(ys, rows)]
    err = [[max(0.0, y - ci[0]) for y, ci in zip(ys, cis)], [max(0.0, ci[1] - y) for y, ci in zip(ys, cis)]]
    colors = ["0.6" if r["arm"] == START else palette(arms.index(r["arm"]) % 10) for r in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(rows) + 2), 3.8))
    ax.bar(xs, ys, yerr=err, capsize=4, color=colors)
    for x, r in zip(xs, rows):
        if r["pooled"] is None:
            ax.text(x, 0, "not run yet", rotation=90, ha="center", va="bottom", fontsize=7)
    labels = [r["row"] + ("" if not r["pooled"] or len(r["pooled"]["seeds"]) == len(table["seeds"]) else
                          f"\n(seeds {', '.join(map(str, r['pooled']['seeds']))})") for r in rows]
    ax.set_xticks(xs, labels, rotation=30, ha="right")
    ax.set_ylabel("test average reward (95% CI)")
    ax.axhline(0, color="black", linewidth=0.6)
    low = min([0.0] + [ci[0] * 1.15 for ci in cis])
    ax.set_ylim(low, max([0.05] + [ci[1] * 1.15 for ci in cis]))
    ax.set_title(f"{table['study']}: {table['task']}, pooled over seeds {', '.join(map(str, table['seeds']))}",
                 fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def write_table(study: Study) -> dict:
    table = build_table(study)
    table["markdown"] = markdown(table)
    folder = study.results_dir
    write_json_atomic(folder / "table.json", {k: v for k, v in table.items() if k != "markdown"}, indent=1)
    write_text_atomic(folder / "table.md", table["markdown"] + "\n")
    plot(table, folder / "figure.png")
    return table


# --- the command line -------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="the study file (YAML; docs/study.md)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED", help="run only these seeds of the study file")
    p.add_argument("--arms", nargs="+", metavar="ARM", help="run only these arms (each seed's start runs too)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry_run", action="store_true", help="print the plan: each unit done or to run, with its "
                                                             "command; run nothing, write nothing")
    mode.add_argument("--table_only", action="store_true", help="write the table from the result files; run nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        study = load_study(args.study)
        for what, chosen, known in (("seed", args.seeds, study.seeds), ("arm", args.arms,
                                                                        [a.name for a in study.arms])):
            unknown = [x for x in chosen or [] if x not in known]
            if unknown:
                raise StudyError(f"--{what}s: {', '.join(map(str, unknown))} not in {args.study} "
                                 f"({', '.join(map(str, known))})")
        if args.table_only:
            table = write_table(study)
            print(table["markdown"])
            return 0
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        return run_study(study, args.seeds or study.seeds, args.arms or [a.name for a in study.arms], args.dry_run)
    except StudyError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1 if isinstance(e, UnitFailed) else 2
    except KeyboardInterrupt:
        print("[study] interrupted; finished units keep their result files, rerun the same command to go on",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
