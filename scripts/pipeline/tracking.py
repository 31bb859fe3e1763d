"""--report_to for a pipeline run: where each stage's trainer writes its curves (stage_env), and the pipeline's own
curves (RunTracker): each episode stage's metrics and each stage's cost, in the same place, one run per pipeline run.

TensorBoard: <run>/tensorboard/ is the run; each trainer writes <run>/tensorboard/<stage>/ and the pipeline
<run>/tensorboard/pipeline/. W&B (offline unless WANDB_MODE says otherwise, files under <run>/wandb/): the group
<exp_name> is the run; the pipeline's own W&B run is named <exp_name>, each trainer's <exp_name>/<stage>.

The pipeline's curves are indexed by the stage's place in the run (the count of finished stages), so that each
family of stages makes one curve: eval/average_reward over the evaluations, cost/dpo/gpu_seconds over the DPO
iterations; the text "stage" at each index names the stage.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from eval_agent.metrics import TYPE_STATISTICS
from eval_agent.run_layout import EPISODE_KINDS, RunLayout

TENSORBOARD_DIR = "tensorboard"
PIPELINE_WRITER = "pipeline"  # the pipeline's own folder under <run>/tensorboard/
WANDB_PROJECT = "eto"  # unless WANDB_PROJECT is set
HEADLINE_METRICS = ("average_reward", "success_rate", "solved_rate", "best_of_k_reward", "pass_at_k")
_ROUND = re.compile(r"_(?:iter|step)\d+$")  # explore_iter2 -> explore, update_step3 -> update


def stage_family(stage: str) -> str:
    """The curve a stage adds a point to: its episode kind (eval_sft, eval_iter1 -> eval), else its name without
    the iteration or RL step (dpo_iter2 -> dpo)."""
    kind = stage.split("_", 1)[0]
    return kind if kind in EPISODE_KINDS else _ROUND.sub("", stage)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def stage_scalars(record: dict) -> dict[str, float]:
    """The numbers of a stage record (Pipeline.finish) to plot: seconds and cost under cost/<family>/, and for an
    episode stage the headline metrics and those of each task type under <family>/."""
    family = stage_family(record["stage"])
    cost = {"seconds": record["seconds"], **record.get("cost", {})}
    scalars = {f"cost/{family}/{key}": value for key, value in cost.items() if is_number(value)}
    metrics = record.get("metrics") or {}
    scalars.update({f"{family}/{key}": metrics[key] for key in HEADLINE_METRICS if is_number(metrics.get(key))})
    for task_type, row in (metrics.get("by_task_type") or {}).items():
        scalars.update({f"{family}/by_task_type/{task_type}/{key}": row[key] for key in TYPE_STATISTICS
                        if is_number(row.get(key))})
    return scalars


class RunTracker:
    """The pipeline run in the --report_to writer; opened on the first stage it logs."""

    def __init__(self, report_to: str, layout: RunLayout, run_name: str):
        self.report_to, self.layout, self.run_name = report_to, layout, run_name
        self.writer = None  # a tensorboard SummaryWriter or a wandb run

    @property
    def tensorboard_root(self) -> Path:
        return self.layout.root / TENSORBOARD_DIR

    def stage_env(self, stage: str) -> dict[str, str]:
        """Environment of the stage's process: where transformers' writer (--report_to) puts this stage's curves."""
        if self.report_to == "tensorboard":
            return {"TENSORBOARD_LOGGING_DIR": str(self.tensorboard_root / stage)}
        if self.report_to == "wandb":
            return {"WANDB_PROJECT": os.environ.get("WANDB_PROJECT", WANDB_PROJECT),
                    "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "WANDB_DIR": str(self.layout.root),
                    "WANDB_RUN_GROUP": self.run_name, "WANDB_NAME": f"{self.run_name}/{stage}"}
        return {}

    def open(self):
        if self.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(log_dir=str(self.tensorboard_root / PIPELINE_WRITER))
        import wandb

        env = self.stage_env(PIPELINE_WRITER)
        return wandb.init(project=env["WANDB_PROJECT"], mode=env["WANDB_MODE"], dir=env["WANDB_DIR"],
                          group=self.run_name, name=self.run_name, job_type=PIPELINE_WRITER)

    def log_stage(self, record: dict, step: int) -> None:
        """A finished stage's record as the point `step` of its curves."""
        if self.report_to == "none":
            return
        if self.writer is None:
            self.writer = self.open()
        scalars = stage_scalars(record)
        if self.report_to == "tensorboard":
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.add_text("stage", record["stage"], step)
            self.writer.flush()
        else:
            self.writer.log({**scalars, "stage": record["stage"]}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            (self.writer.close if self.report_to == "tensorboard" else self.writer.finish)()
            self.writer = None
