"""run_eto.sh --from_run: a method started from another run's SFT model and evaluations, as the study runner
starts every arm of a seed (scripts/pipeline/stages.py Pipeline.start_from_run)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from scripts import eto_pipeline
from tests.test_pipeline import pipeline_cmd


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def episodes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("*.json")}


@pytest.mark.slow
def test_a_run_from_another_runs_start_trains_on_its_sft_model_and_reuses_its_evaluations(tiny_model_dir, tmp_path):
    save = tmp_path / "runs"
    parent = run(pipeline_cmd("alfworld", "start", tiny_model_dir, save, "--iterations", "0"), tmp_path)
    assert parent.returncode == 0, parent.stdout[-3000:] + parent.stderr[-3000:]
    child_cmd = pipeline_cmd("alfworld", "eto", tiny_model_dir, save, "--from_run", "start")
    child = run(child_cmd, tmp_path)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    start, eto = save / "start", save / "eto"

    # no SFT and no evaluation of the start ran in the child: no log of them, no model of its own
    assert not any((eto / "logs").glob("sft*")) and not any((eto / "logs").glob("eval_sft*"))
    assert not (eto / "models" / "sft").exists()
    record = json.loads((eto / "stages" / "sft.json").read_text())
    assert record["from_run"] == str(start.resolve()) and record["cost"] == {}
    weights = sorted((start / "models" / "sft").glob("*.safetensors"))
    assert weights and set(record["model_sha256"]) == {w.name for w in weights}
    # DPO trained the parent's SFT model, bit for bit: the trainer was given that folder
    assert f"--model_name_or_path {start.resolve() / 'models' / 'sft'} " in (eto / "logs" / "dpo_iter1.log").read_text()
    for stage in ("base", "sft"):
        assert episodes(eto / "eval" / stage) == episodes(start / "eval" / stage)
    rows = {r["stage"]: r for r in json.loads((eto / "summary.json").read_text())["results"]}
    parent_rows = {r["stage"]: r for r in json.loads((start / "summary.json").read_text())["results"]}
    assert [stage for stage, row in rows.items() if row["split"] == "test"] == ["eval_base", "eval_sft", "eval_iter1"]
    for stage in ("eval_base", "eval_sft"):  # the same rows; their time was spent in the parent
        assert {**rows[stage], "seconds": None} == {**parent_rows[stage], "seconds": None}
    assert "taken over from run start (--from_run" in (eto / "summary.md").read_text()
    # the iteration's difference is paired with the parent's SFT evaluation, task by task
    assert ("iter1 - SFT", 2) in [(d["label"], d["tasks"]) for d in
                                   json.loads((eto / "summary.json").read_text())["paired_differences"]]

    # a rerun finds everything done; with another parent it is another run and is refused
    again = run(child_cmd, tmp_path)
    assert again.returncode == 0 and "sft: taken over from" in again.stdout and "already" in again.stdout
    shutil.copytree(start, save / "start-copy")
    other = run(pipeline_cmd("alfworld", "eto", tiny_model_dir, save, "--from_run", "start-copy"), tmp_path)
    assert other.returncode == 1 and "from_run" in other.stderr and "other settings" in other.stderr, other.stderr

    # a run from a run that took its start over itself gets the same SFT model, the first run's
    chain = run(pipeline_cmd("alfworld", "chain", tiny_model_dir, save, "--from_run", "eto", "--iterations", "0"),
                tmp_path)
    assert chain.returncode == 0, chain.stdout[-3000:] + chain.stderr[-3000:]
    chained = json.loads((save / "chain" / "stages" / "sft.json").read_text())
    assert chained["outputs"] == record["outputs"] and chained["model_sha256"] == record["model_sha256"]
    assert episodes(save / "chain" / "eval" / "sft") == episodes(start / "eval" / "sft")

    # a start made with other settings is refused before any stage, naming the setting
    mismatch = run(pipeline_cmd("alfworld", "eto2", tiny_model_dir, save, "--from_run", "start", "--sft_epochs", "2"),
                   tmp_path)
    assert mismatch.returncode == 1 and "sft_epochs: 1 there, 2 here" in mismatch.stderr, mismatch.stderr
    assert not (save / "eto2" / "stages" / "eval_iter1.json").exists()

    # the parent's SFT model replaced after the child took it over: the child's later stages were built on the old
    weights[0].write_bytes(weights[0].read_bytes() + b" ")
    changed = run(child_cmd, tmp_path)
    assert changed.returncode == 1 and "changed since this run took it over" in changed.stderr, changed.stderr


def test_from_run_names_a_run_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        eto_pipeline.parse_args(["alfworld", "child", "", str(tmp_path), "--from_run", "nowhere"])
    assert e.value.code == 2 and "holds no run (no settings.json)" in capsys.readouterr().err
    (tmp_path / "child").mkdir()
    (tmp_path / "child" / "settings.json").write_text("{}")
    with pytest.raises(SystemExit):
        eto_pipeline.parse_args(["alfworld", "child", "", str(tmp_path), "--from_run", "child"])
    assert "cannot start from itself" in capsys.readouterr().err
