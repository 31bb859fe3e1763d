"""--report_to and progress lines (docs/training.md, "Training curves"; docs/pipeline.md): the trainers' losses per
step and the pipeline's evaluation metrics and stage costs in one TensorBoard run folder (and W&B offline), read
back with TensorBoard's own event reader; progress with counts and time left, one line per 10% in a log."""
from __future__ import annotations

import importlib.util
import io
import json
import re
import shutil
import time
from pathlib import Path

import pytest

from fastchat.reporting import LOGGING_EXTRA, Progress, missing_writers
from scripts import eto_pipeline
from scripts.pipeline.services import StageFailed
from scripts.pipeline.stages import Pipeline
from scripts.pipeline.tracking import stage_scalars
from tests.test_train_dpo import make_pairs
from tests.test_train_sft import sft_records

REPO = Path(__file__).resolve().parent.parent
PROGRESS_LINE = re.compile(r"^(?P<desc>.+): (?P<done>\d+)/(?P<total>\d+) (?P<unit>\w+) \((?P<pct>\d+)%\), "
                           r"(?P<elapsed>[\d:]+) elapsed, ETA (?P<eta>[\d:]+|\?)")


def need_tensorboard():
    """The writer is an optional extra of the package but these tests need it: a missing one fails, naming it."""
    if importlib.util.find_spec("tensorboard") is None:
        pytest.fail(f"the tensorboard package is not installed: {LOGGING_EXTRA} (the 'logging' extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the event files in `folder`, as TensorBoard reads them."""
    events = need_tensorboard()(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def progress_lines(text: str, unit: str) -> list[re.Match]:
    return [m for line in text.splitlines() if (m := PROGRESS_LINE.match(line)) and m["unit"] == unit]


def pipeline_for(tmp_path: Path, report_to: str) -> Pipeline:
    (tmp_path / "sft.json").write_text("[]")
    return Pipeline(eto_pipeline.parse_args(["alfworld", "curves", str(tmp_path / "model"), str(tmp_path / "runs"),
                                             "--sft_data", str(tmp_path / "sft.json"), "--report_to", report_to]))


def finish_three_stages(pipeline: Pipeline) -> list[dict]:
    """Stage records as the pipeline writes them: two evaluations around a DPO update (made-up numbers)."""
    def metrics(reward: float) -> dict:
        return {"average_reward": reward, "success_rate": 0.75, "solved_rate": 0.25, "best_of_k_reward": reward,
                "pass_at_k": 0.25, "num_tasks": 4, "cost": {"env_steps": 40},
                "by_task_type": {"pick": {"tasks": 2, "average_reward": reward + 0.25, "success_rate": 1.0,
                                          "solved_rate": 0.5, "ci95": {"average_reward": [0.0, 1.0]}}}}

    episode_cost = {"env_steps": 40, "prompt_tokens": 1000, "completion_tokens": 200}
    return [pipeline.finish("eval_sft", time.time(), [], cost=episode_cost, metrics=metrics(0.5)),
            pipeline.finish("dpo_iter1", time.time(), [], cost={"train_tokens": 5000, "optimizer_steps": 6,
                                                        "peak_rss_mib": 900.5, "peak_cuda_mib": None}, lr=1e-6),
            pipeline.finish("eval_iter1", time.time(), [], cost=episode_cost, metrics=metrics(0.625))]


def test_pipeline_logs_each_evaluation_and_stage_cost_to_the_run(tmp_path):
    pipeline = pipeline_for(tmp_path, "tensorboard")
    assert pipeline.common_train_flags()[-2:] == ["--report_to", "tensorboard"]
    assert pipeline.tracker.stage_env("sft") == {"TENSORBOARD_LOGGING_DIR": str(pipeline.run_dir / "tensorboard/sft")}
    records = finish_three_stages(pipeline)
    pipeline.tracker.close()

    scalars = read_scalars(pipeline.run_dir / "tensorboard" / "pipeline")
    # each family of stages one curve, indexed by the stage's place in the run
    assert scalars["eval/average_reward"] == [(1, 0.5), (3, 0.625)]
    assert scalars["eval/success_rate"] == [(1, 0.75), (3, 0.75)]
    assert scalars["eval/by_task_type/pick/average_reward"] == [(1, 0.75), (3, 0.875)]
    assert scalars["cost/eval/env_steps"] == [(1, 40), (3, 40)]
    assert scalars["cost/dpo/optimizer_steps"] == [(2, 6)] and scalars["cost/dpo/train_tokens"] == [(2, 5000)]
    assert "cost/dpo/peak_cuda_mib" not in scalars  # None: not measured on CPU
    assert set(scalars) == {tag for record in records for tag in stage_scalars(record)}


def test_sft_and_dpo_write_their_loss_per_step_into_the_pipeline_run(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The trainers' own transformers writer, pointed by the pipeline at <run>/tensorboard/<stage>: the loss of each
    optimizer step as the trainer logged it (trainer_state.json); and their progress lines."""
    from fastchat.train.train import main as sft_main
    from fastchat.train.train_dpo import main as dpo_main

    need_tensorboard()
    pipeline = pipeline_for(tmp_path, "tensorboard")
    sft_data, pairs = tmp_path / "sft_data.json", tmp_path / "pairs.json"
    sft_data.write_text(json.dumps(sft_records(8)))
    pairs.write_text(json.dumps(make_pairs(4)))
    common = ["--model_name_or_path", str(tiny_model_dir), "--per_device_train_batch_size", "2", "--max_steps", "3",
              "--logging_steps", "1", "--model_max_length", "128", "--report_to", "tensorboard"]
    runs = {"sft": (sft_main, sft_data, "train/loss"), "dpo_iter1": (dpo_main, pairs, "train/rewards/margins")}
    for stage, (main, data, other) in runs.items():
        for name, value in pipeline.tracker.stage_env(stage).items():
            monkeypatch.setenv(name, value)
        out = pipeline.layout.model(stage)
        main([*common, "--data_path", str(data), "--output_dir", str(out)])

        history = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
        scalars = read_scalars(pipeline.run_dir / "tensorboard" / stage)
        assert [step for step, _ in scalars["train/loss"]] == [h["step"] for h in history] == [1, 2, 3]
        assert [v for _, v in scalars["train/loss"]] == pytest.approx([h["loss"] for h in history], rel=1e-6)
        assert other in scalars

        lines = progress_lines(capsys.readouterr().err, "steps")
        assert [(m["desc"], m["done"], m["total"]) for m in lines] == [("training", str(n), "3") for n in (1, 2, 3)]
        assert all(m["eta"] != "?" for m in lines)


def test_progress_in_a_log_is_one_line_per_tenth_with_counts_and_time_left():
    log = io.StringIO()  # not a terminal
    with Progress(1000, "training", "steps", stream=log) as bar:
        for _ in range(1000):
            bar.update()
    lines = progress_lines(log.getvalue(), "steps")
    assert len(log.getvalue().splitlines()) == len(lines) == 10
    assert [int(m["done"]) for m in lines] == list(range(100, 1001, 100))
    assert [int(m["pct"]) for m in lines] == list(range(10, 101, 10)) and lines[-1]["eta"] == "00:00"

    resumed = io.StringIO()  # a run resumed at step 500 reports only the steps it makes, its ETA from their pace
    with Progress(1000, "training", "steps", initial=500, stream=resumed) as bar:
        for _ in range(500):
            bar.update(loss="0.5")
    lines = progress_lines(resumed.getvalue(), "steps")
    assert [int(m["done"]) for m in lines] == list(range(600, 1001, 100))
    assert lines[0].string.endswith(", loss=0.5")


def test_evaluation_reports_episodes_done_with_time_left(tmp_path, capsys):
    from eval_agent.main import parse_args, run
    from tests.test_costs import keyroom_agent

    folder = tmp_path / "tasks"
    shutil.copytree(REPO / "tests" / "newtask", folder, ignore=shutil.ignore_patterns("__pycache__"))
    args = parse_args(["--task_path", str(folder), "--exp_config", "keyroom", "--split", "train",
                       "--samples_per_task", "5", "--output_path", str(tmp_path / "explore"), "--num_workers", "2"])
    assert run(args, agent=keyroom_agent(folder, reports=False)) == 0
    lines = progress_lines(capsys.readouterr().err, "episodes")
    assert len(lines) == 10  # 40 episodes, one line per 10%
    assert [int(m["done"]) for m in lines] == list(range(4, 41, 4))
    assert all(m["desc"] == "keyroom/train" and m["total"] == "40" for m in lines)
    assert "avg_reward=" in lines[-1].string


def test_a_missing_writer_is_named_with_its_flag_and_extra(monkeypatch, tmp_path):
    from fastchat.train.common import EtoTrainingArguments

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert missing_writers("wandb") == [f"--report_to wandb: the wandb package is not installed ({LOGGING_EXTRA} "
                                        "installs the writers)"]
    with pytest.raises(SystemExit, match=re.escape("--report_to wandb: the wandb package is not installed")):
        EtoTrainingArguments(output_dir=str(tmp_path), report_to="wandb")
    pipeline = pipeline_for(tmp_path, "wandb")
    with pytest.raises(StageFailed) as e:
        pipeline.preflight()
    assert "--report_to wandb: the wandb package is not installed" in e.value.detail


def read_wandb_run(run_folder: Path) -> tuple[str, str, dict[int, dict]]:
    """(name, group, {step: {key: value}}) of an offline W&B run, from its run-<id>.wandb file: W&B's record log
    (LevelDB's log format: a 7-byte header, then 32 KiB blocks of chunks, each crc32, length, type (1 whole,
    2 first, 3 middle, 4 last)) of protobuf Records. wandb has no reader for it; `wandb sync` would send it."""
    import struct

    from wandb.proto import wandb_internal_pb2

    [path] = run_folder.glob("run-*.wandb")
    data, block, pos, chunks = path.read_bytes(), 32768, 7, b""
    name = group = None
    history = {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks, pos = chunks + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            if record.WhichOneof("record_type") == "run":
                name, group = record.run.display_name, record.run.run_group
            elif record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return name, group, history


def test_wandb_offline_runs_hold_the_same_keys(tiny_model_dir, tmp_path, monkeypatch):
    """One SFT stage and the pipeline's own run, offline, in the group named after the pipeline run."""
    wandb = pytest.importorskip("wandb", reason=f"wandb is optional ({LOGGING_EXTRA}); TensorBoard is tested above")
    from fastchat.train.train import main as sft_main

    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default: nothing leaves the machine
    pipeline = pipeline_for(tmp_path, "wandb")
    env = pipeline.tracker.stage_env("sft")
    assert env["WANDB_MODE"] == "offline"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    data = tmp_path / "sft_data.json"
    data.write_text(json.dumps(sft_records(4)))
    out = pipeline.layout.model("sft")
    sft_main(["--model_name_or_path", str(tiny_model_dir), "--data_path", str(data), "--output_dir", str(out),
              "--per_device_train_batch_size", "2", "--max_steps", "2", "--logging_steps", "1",
              "--model_max_length", "128", "--report_to", "wandb", "--disable_tqdm", "true"])
    wandb.finish()  # as the trainer's process does at exit (transformers leaves its run open)
    records = finish_three_stages(pipeline)
    pipeline.tracker.close()

    runs = {name: (group, history) for name, group, history in
            map(read_wandb_run, (pipeline.run_dir / "wandb").glob("offline-run-*"))}
    assert set(runs) == {"curves", "curves/sft"} and {group for group, _ in runs.values()} == {"curves"}
    steps = runs["curves"][1]
    assert {step: set(items) - {"stage"} for step, items in steps.items()} == \
        {step: set(stage_scalars(record)) for step, record in enumerate(records, 1)}
    assert steps[3]["eval/average_reward"] == 0.625 and steps[3]["stage"] == "eval_iter1"

    logged = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    losses = [items["train/loss"] for items in runs["curves/sft"][1].values() if "train/loss" in items]
    assert losses == pytest.approx([h["loss"] for h in logged], rel=1e-6)
