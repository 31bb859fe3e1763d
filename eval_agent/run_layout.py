"""The layout of a run folder (<save_path>/<exp_name>): the one place its paths and stage names are built.

    settings.json                    the run's settings and the expert data's hash
    stages/<stage>.json              a finished stage's record
    logs/<name>.log                  a stage's output (and its servers')
    models/<stage>                   a trained model: sft, sft_iter<i>, dpo_iter<i>, update_step<s> (online RL)
    data/<name>                      files the run trained on or played from (online RL: rl_step<s>.json)
    eval/<name>/, explore/<name>/    the episodes of stage eval_<name> / explore_<name> (eval_sft, explore_iter1)
    rollout/step<s>/                 the episodes of online RL's step s (stage rollout_step<s>; eval_step<s>: eval/)
    pairs/iter<i>.json               iteration i's trajectory pairs; pairs/iter<i>_<rule>.json: another rule's
                                     (step: pairs/iter<i>_step.json), each with <pairs>.stats.json (counts) beside
                                     it and, for rules that play rollouts, <pairs>.rollouts/
    summary.json, summary.md, summary.png
    tmp/                             scratch, deleted when the run ends

The pipeline (scripts/) writes run folders and the viewer (eval_agent) reads them; eval_agent must not import
scripts, so the layout lives here for both. It is the layout runs have always had on disk: old run folders read
alike.
"""
from __future__ import annotations

import re
from pathlib import Path

EVAL, EXPLORE, ROLLOUT = "eval", "explore", "rollout"
EPISODE_KINDS = (EVAL, EXPLORE, ROLLOUT)  # <run>/eval/<name>, <run>/explore/<name>, <run>/rollout/<name>
TRAIN_KINDS = (EXPLORE, ROLLOUT)  # the episode kinds that play the train split
PAIRS = "pairs"
RL_DATA, UPDATE = "rl_data", "update"  # online RL's other stages of a step: rl_data_step<s>, update_step<s>
_ITERATION = re.compile(r"(?:^|_)iter(\d+)")  # iter1, eval_iter1, pairs_iter1_step
_STEP = re.compile(r"(?:^|_)step(\d+)$")  # step1, rollout_step1, eval_step10
_PAIRS_STAGE = re.compile(rf"(?:\w+_)?{PAIRS}_iter\d+")  # pairs_iter1, step_pairs_iter1


def iteration(it: int) -> str:
    """The name of iteration `it` in stage, folder and file names: iter1."""
    return f"iter{it}"


def iteration_number(name: str) -> int | None:
    """The iteration a stage or file name ends with (eval_iter2, explore_iter0, iter1), else None."""
    match = _ITERATION.search(name)
    return int(match.group(1)) if match and match.end() == len(name) else None


def iteration_stage(step: str, it: int) -> str:
    """A stage of iteration `it`: explore_iter1, dpo_iter1, sft_iter1, rft_data_iter0, eval_iter2."""
    return f"{step}_{iteration(it)}"


def rl_step(step: int) -> str:
    """The name of online RL's step `step` in stage, folder and file names: step1."""
    return f"step{step}"


def rl_step_stage(kind: str, step: int) -> str:
    """A stage of online RL's step `step`: rollout_step1, rl_data_step1, update_step1, eval_step2."""
    return f"{kind}_{rl_step(step)}"


def rl_step_number(name: str) -> int | None:
    """The RL step a stage or file name ends with (rollout_step2, eval_step10, rl_step1), else None."""
    match = _STEP.search(name)
    return int(match.group(1)) if match else None


def eval_stage(name: str) -> str:
    """An evaluation outside the iterations: eval_base, eval_sft, eval_bon."""
    return f"{EVAL}_{name}"


def pairs_stage(it: int, rule: str | None = None) -> str:
    """The stage that builds iteration `it`'s pairs: pairs_iter1 (the trajectory pairs), <rule>_pairs_iter1 for
    another rule's (step_pairs_iter1)."""
    return iteration_stage(PAIRS if rule is None else f"{rule}_{PAIRS}", it)


def is_pairs_stage(stage: str) -> bool:
    return _PAIRS_STAGE.fullmatch(stage) is not None


def split_of(stage: str) -> str:
    """The split an episode stage plays: train for explorations and RL rollouts, test for evaluations."""
    return "train" if stage.startswith(tuple(f"{kind}_" for kind in TRAIN_KINDS)) else "test"


def pair_stats_file(pairs_file: Path) -> Path:
    """The pair builder's counts (and the rollouts' cost) beside its pairs: iter1.json -> iter1.stats.json."""
    return pairs_file.with_name(pairs_file.stem + ".stats.json")


def rollouts_dir(pairs_file: Path) -> Path:
    """The rollout episodes a rule plays for these pairs (reused by a rerun): iter1_step.json -> iter1_step.rollouts."""
    return pairs_file.with_name(pairs_file.stem + ".rollouts")


class RunLayout:
    """The paths of the run folder `root` (see the module docstring)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    # -- files of the whole run --------------------------------------------------------------------------
    @property
    def settings(self) -> Path:
        return self.root / "settings.json"

    @property
    def summary_json(self) -> Path:
        return self.root / "summary.json"

    @property
    def summary_md(self) -> Path:
        return self.root / "summary.md"

    @property
    def summary_png(self) -> Path:
        return self.root / "summary.png"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def write_probe(self) -> Path:
        """A file created and deleted before the first stage, to learn whether the folder is writable."""
        return self.root / ".write_probe"

    # -- stages, logs, models, data ----------------------------------------------------------------------
    @property
    def stages_dir(self) -> Path:
        return self.root / "stages"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def stage_record(self, stage: str) -> Path:
        return self.stages_dir / f"{stage}.json"

    def stage_records(self) -> list[Path]:
        """The records of the finished stages, in the order they finished."""
        return sorted(self.stages_dir.glob("*.json"), key=lambda p: p.stat().st_mtime)

    def log(self, name: str) -> Path:
        """A stage's log (logs/sft.log), or a server's (logs/eval_sft.worker0.log)."""
        return self.logs_dir / f"{name}.log"

    def model(self, stage: str) -> Path:
        return self.root / "models" / stage

    def data(self, name: str) -> Path:
        return self.root / "data" / name

    def rl_data(self, step: int) -> Path:
        """Online RL step `step`'s training records: data/rl_step1.json."""
        return self.data(f"rl_{rl_step(step)}.json")

    # -- episodes ----------------------------------------------------------------------------------------
    def episode_dir(self, stage: str) -> Path:
        """eval_base -> eval/base, eval_iter2 -> eval/iter2, explore_iter1 -> explore/iter1,
        rollout_step1 -> rollout/step1."""
        kind, _, name = stage.partition("_")
        if kind not in EPISODE_KINDS or not name:
            raise ValueError(f"{stage!r} is not an evaluation, exploration or rollout stage "
                             f"({', '.join(f'{k}_*' for k in EPISODE_KINDS)})")
        return self.root / kind / name

    def episode_stages(self) -> dict[str, Path]:
        """{stage: folder} of the episode folders on disk (unordered)."""
        return {f"{kind}_{d.name}": d for kind in EPISODE_KINDS for d in (self.root / kind).glob("*") if d.is_dir()}

    def is_run(self) -> bool:
        """Whether this is a run folder (it has stage records or episode folders)."""
        return any(d.is_dir() for d in (self.stages_dir, *(self.root / kind for kind in EPISODE_KINDS)))

    # -- pairs -------------------------------------------------------------------------------------------
    def pairs_file(self, it: int, rule: str | None = None) -> Path:
        """Iteration `it`'s trajectory pairs (pairs/iter1.json), or another rule's (pairs/iter1_step.json)."""
        return self.root / PAIRS / f"{iteration(it)}{'' if rule is None else '_' + rule}.json"

    def pair_sets(self) -> dict[str, Path]:
        """{name: pair file} of the pair files on disk: pairs/iter1.json is pairs_iter1 (stats files left out)."""
        return {f"{PAIRS}_{p.stem}": p for p in sorted((self.root / PAIRS).glob("*.json"))
                if not p.name.endswith(".stats.json")}

    @staticmethod
    def explored_by(pair_set: str) -> str:
        """The exploration a pair set was built from: pairs_iter1 and pairs_iter1_step come from explore_iter1."""
        match = _ITERATION.search(pair_set)
        if match is None:  # a pair file named otherwise: pairs/<name>.json is taken to come from explore/<name>
            return f"{EXPLORE}_{pair_set.removeprefix(PAIRS + '_')}"
        return iteration_stage(EXPLORE, int(match.group(1)))
