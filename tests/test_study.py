"""python -m scripts.study: the study file's checks, units skipped by their result files (also without their run
folder), a re-made start checked against its committed result file, the table from result files alone, and a study
of two arms x two seeds on the tiny model, interrupted and resumed (docs/study.md)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from eval_agent.metrics import bootstrap_interval
from scripts import study as study_mod
from scripts.pipeline.summary import write_summary
from scripts.study import StudyError, Unit, load_study
from tests.test_pipeline import TINY_BUDGET

REPO = Path(__file__).resolve().parent.parent


def write_study(tmp_path: Path, **fields) -> Path:
    data = {"name": "st", "task": "alfworld", "model": "", "save_path": str(tmp_path / "runs"),
            "results": str(tmp_path / "results"), "seeds": [0],
            "shared": {"eval_base": 1, "test_tasks": 2, "sft_epochs": 1},
            "arms": [{"name": "eto", "method": "eto", "flags": {"iterations": 1}}]}
    data.update(fields)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not None}, sort_keys=False))
    return path


# --- the study file ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted((REPO / "scripts" / "studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_committed_study_files_pass_their_checks(path):
    study = load_study(path)
    assert study.arms and study.seeds
    assert study.results_dir.relative_to(REPO / "docs" / "results")  # committed beside the other results


@pytest.mark.parametrize(("fields", "where", "problem"), [
    ({"arms": None}, "arms", "missing"),
    ({"seeds": [0, "one"]}, "seeds", "list of integers"),
    ({"seeds": [1, 1]}, "seeds", "listed twice"),
    ({"task": "nosuchtask"}, "task", "nosuchtask"),
    ({"name": "a/b"}, "name", "folder name"),
    ({"sedes": [0]}, "sedes", "did you mean seeds?"),
    ({"shared": {"iteratons": 2}}, "shared.iteratons", "not a knob (did you mean iterations?)"),
    ({"shared": {"sft_epochs": "many"}}, "shared.sft_epochs", "expected an integer"),
    ({"shared": {"subset_seed": 3}}, "shared.subset_seed", "set by the runner"),
    ({"arms": [{"name": "eto", "method": "eto"}, {"name": "eto", "method": "bon"}]}, "arms[1].name", "used twice"),
    ({"arms": [{"name": "x", "method": "dqn"}]}, "arms[0].method", "expected one of eto"),
    ({"arms": [{"method": "eto"}]}, "arms[0].name", "missing"),
    ({"arms": [{"name": "x", "method": "eto", "flags": {"test_tasks": 4}}]}, "arms[0].flags.test_tasks",
     "a setting of the shared start"),
    ({"arms": [{"name": "x", "method": "eto", "flags": {"iterations": -1}}]}, "arms[0].flags.iterations",
     "must be >= 0"),
    ({"arms": [{"name": "start", "method": "eto"}]}, "arms[0].name", "shared start runs"),
])
def test_study_file_errors_name_the_file_and_the_field(tmp_path, fields, where, problem):
    path = write_study(tmp_path, **fields)
    with pytest.raises(StudyError) as e:
        load_study(path)
    message = str(e.value)
    assert message.startswith(f"{path}: {where}: ") and problem in message, message


def test_a_bad_study_file_exits_2_with_one_line(tmp_path, capsys):
    path = write_study(tmp_path, shared={"iteratons": 2})
    assert study_mod.main([str(path), "--dry_run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m scripts.study: {path}: shared.iteratons: not a knob") and err.count("\n") == 1
    assert study_mod.main([str(write_study(tmp_path)), "--seeds", "7", "--dry_run"]) == 2
    assert "--seeds: 7 not in" in capsys.readouterr().err


def test_units_and_their_commands(tmp_path):
    study = load_study(write_study(tmp_path, seeds=[3], shared={"eval_base": True, "test_tasks": 2,
                                                                "dpo_lrs": [3e-5, 1e-5], "iterations": 5},
                                   arms=[{"name": "bon", "method": "bon", "flags": {"samples_per_task": 2}}]))
    start, bon = study.units()
    assert (start.run, bon.run) == ("start-s3", "bon-s3")
    assert start.args()[:4] == ["alfworld", "start-s3", "", f"{tmp_path}/runs/st"]
    assert start.knobs() == {"eval_base": "1", "test_tasks": "2", "dpo_lrs": "3e-05 1e-05", "iterations": "0",
                             "method": "eto", "subset_seed": "3"}
    assert bon.knobs() == {"eval_base": "1", "test_tasks": "2", "dpo_lrs": "3e-05 1e-05", "iterations": "5",
                           "samples_per_task": "2", "method": "bon", "subset_seed": "3", "from_run": "start-s3"}
    # the recorded command has no path of this machine
    assert bon.command().startswith("python -m scripts.eto_pipeline alfworld bon-s3 '' '<outside the repository>/st' ")
    assert "--dpo_lrs '3e-05 1e-05'" in bon.command() and "--from_run start-s3" in bon.command()
    assert study_mod.portable(str(REPO / "data" / "x.json")) == "data/x.json"


# --- hand-written result files ----------------------------------------------------------------------------------

def result(unit: Unit, evaluations: dict[str, dict[str, float]], cost: dict | None = None, **extra) -> dict:
    """A result file as export writes it, from per-task rewards (a best-of-K evaluation: 2 samples per task)."""
    evals = []
    for stage, rewards in evaluations.items():
        best = stage == "eval_bon"
        values = [rewards[t] for t in sorted(rewards)]
        mean, solved = sum(values) / len(values), [float(v >= 1) for v in values]
        row = {"stage": stage, "split": "test", "tasks": len(values), "average_reward": mean,
               "success_rate": sum(solved) / len(solved), "num_success": int(sum(solved)),
               "reward_ci95": bootstrap_interval(values), "success_ci95": bootstrap_interval(solved)}
        if best:
            row.update(samples_per_task=2, average_reward=mean / 2, best_of_k_reward=mean,
                       best_of_k_ci95=bootstrap_interval(values), num_success=int(sum(solved)),
                       success_rate=sum(solved) / (2 * len(solved)))
        label = {"eval_base": "base", "eval_sft": "SFT", "eval_bon": "best-of-K"}.get(stage, stage[5:])
        evals.append({"stage": stage, "label": label, "best_of_k": best, "row": row, "rewards": rewards})
    return {"format": 1, **unit.identity(), "command": unit.command(), "git": {"commit": "0" * 40, "dirty": False},
            "evaluations": evals, "cost": cost or {"wall_seconds": 10.0, "train_tokens": 100, "env_steps": 5},
            **extra}


def commit(unit: Unit, data: dict) -> None:
    unit.result_file.parent.mkdir(parents=True, exist_ok=True)
    unit.result_file.write_text(json.dumps(data, indent=1))


def test_a_unit_with_a_result_file_is_done_without_its_run_folder(tmp_path, monkeypatch, capsys):
    path = write_study(tmp_path, arms=[{"name": "eto", "method": "eto", "flags": {"iterations": 1}},
                                       {"name": "bon", "method": "bon"}])
    study = load_study(path)
    start, eto, bon = study.units()
    commit(start, result(start, {"eval_base": {"a": 0.0, "b": 0.0}, "eval_sft": {"a": 0.5, "b": 0.0}}))
    commit(eto, result(eto, {"eval_iter1": {"a": 1.0, "b": 0.0}}))
    monkeypatch.setattr(study_mod, "launch", lambda *a: pytest.fail("the dry run ran a unit"))
    assert study_mod.main([str(path), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "1/3 start-s0: done (" in out and "2/3 eto-s0: done (" in out, out
    assert "3/3 bon-s0: would re-make start-s0 first (its run folder is missing" in out
    assert "3/3 bon-s0: would run: python -m scripts.eto_pipeline alfworld bon-s0 '' " in out
    assert "--method bon --subset_seed 0 --from_run start-s0" in out
    assert not (tmp_path / "runs").exists() and sorted(p.name for p in (tmp_path / "results").iterdir()) == [
        "eto-s0.json", "start-s0.json"]  # a dry run writes nothing
    # a result file made with other settings is another unit's: refused, naming the difference
    other = write_study(tmp_path, arms=[{"name": "eto", "method": "eto", "flags": {"iterations": 2}}])
    assert study_mod.main([str(other), "--dry_run"]) == 2
    err = capsys.readouterr().err
    assert "eto-s0.json was made with other settings" in err and "--iterations: '1' there, '2' in the study" in err


def test_table_from_result_files_alone(tmp_path, capsys):
    path = write_study(tmp_path, seeds=[0, 1], arms=[{"name": "eto", "method": "eto", "flags": {"iterations": 2}},
                                                     {"name": "bon", "method": "bon"}])
    study = load_study(path)
    start0, eto0, bon0, start1, eto1, bon1 = study.units()
    sft = {0: {"a": 0.5, "b": 0.0, "c": 0.25}, 1: {"d": 0.0, "e": 1.0, "f": 0.0}}
    it1 = {0: {"a": 1.0, "b": 0.0, "c": 0.5}, 1: {"d": 0.5, "e": 1.0, "f": 0.0}}
    commit(start0, result(start0, {"eval_base": {t: 0.0 for t in sft[0]}, "eval_sft": sft[0]}))
    acted = {"episodes": 3, "steps_per_episode": 12.0, "invalid_format": 0.0, "rejected": 0.8, "ran": 0.2,
             "top_verbs": [["go", 5], ["look", 2]]}  # the result file's SFT row's behaviour (summary.stage_row)
    data = json.loads(start0.result_file.read_text())
    data["evaluations"][1]["row"]["behaviour"] = acted
    commit(start0, data)
    commit(start1, result(start1, {"eval_base": {t: 0.0 for t in sft[1]}, "eval_sft": sft[1]}))
    bon = {"a": 1.0, "b": 0.5, "c": 0.0}
    commit(bon0, result(bon0, {"eval_bon": bon}, cost={"wall_seconds": 4.0, "completion_tokens": 7}))
    assert study_mod.main([str(path), "--table_only"]) == 0
    table = json.loads((tmp_path / "results" / "table.json").read_text())
    # before any eto result: its one row is compared with SFT, not with its own first iteration
    assert [d["label"] for d in table["paired_differences"]] == ["SFT - base", "eto - SFT", "bon - SFT",
                                                                  "bon - eto iter1"]
    commit(eto0, result(eto0, {"eval_iter1": it1[0], "eval_iter2": {"a": 1.0, "b": 1.0, "c": 0.0}}))
    commit(eto1, result(eto1, {"eval_iter1": it1[1]}))  # stopped after one iteration (no pairs)
    assert study_mod.main([str(path), "--table_only"]) == 0
    table = json.loads((tmp_path / "results" / "table.json").read_text())
    rows = {r["row"]: r for r in table["rows"]}
    assert list(rows) == ["base", "SFT", "eto iter1", "eto iter2", "bon"]
    assert rows["bon"]["per_seed"]["1"] == {"status": "not run yet",
                                            "command": f"python -m scripts.study {path} --seeds 1 --arms bon"}
    assert rows["eto iter2"]["per_seed"]["1"] == {"status": "no evaluation", "unit": "eto-s1"}
    assert rows["bon"]["best_of_k"] and rows["bon"]["per_seed"]["0"]["average_reward"] == pytest.approx(0.5)
    # pooled: the (seed, task) rewards together
    pooled = [sft[s][t] for s in (0, 1) for t in sorted(sft[s])]
    assert rows["SFT"]["pooled"]["average_reward"] == pytest.approx(sum(pooled) / 6)
    assert rows["SFT"]["pooled"]["reward_ci95"] == bootstrap_interval(pooled)
    assert rows["SFT"]["pooled"]["tasks"] == 6 and rows["bon"]["pooled"]["seeds"] == [0]
    # paired differences, per seed and pooled, by hand
    diffs = {d["label"]: d for d in table["paired_differences"]}
    assert list(diffs) == ["SFT - base", "eto iter1 - SFT", "eto iter2 - SFT", "bon - SFT", "eto iter2 - eto iter1",
                           "bon - eto iter1"]
    hand = [it1[s][t] - sft[s][t] for s in (0, 1) for t in sorted(sft[s])]
    d = diffs["eto iter1 - SFT"]
    assert d["pooled"]["mean"] == pytest.approx(sum(hand) / 6) and d["pooled"]["ci95"] == bootstrap_interval(hand)
    assert (d["pooled"]["better"], d["pooled"]["worse"], d["pooled"]["same"]) == (3, 0, 3)
    assert d["per_seed"]["1"]["mean"] == pytest.approx(0.5 / 3)
    assert d["per_seed"]["1"]["ci95"] == bootstrap_interval(hand[3:])
    b = diffs["bon - eto iter1"]
    assert b["per_seed"]["1"] == {"status": "not run yet"} and b["pooled"]["seeds"] == [0]
    assert b["pooled"]["mean"] == pytest.approx(sum(bon[t] - it1[0][t] for t in bon) / 3)
    costs = {c["row"]: c for c in table["costs"]}
    assert costs["shared start"]["wall_seconds"] == 20.0 and costs["shared start"]["train_tokens"] == 200
    assert costs["bon"]["seeds"] == [0] and costs["bon"]["not_run_yet"] == [1]
    assert costs["total"]["wall_seconds"] == 44.0
    assert [m["unit"] for m in table["not_run_yet"]] == ["bon-s1"]
    md = (tmp_path / "results" / "table.md").read_text()
    assert "| bon (best-of-K) | 0.500 [" in md and "| not run yet |  |  |" in md
    assert f"| bon-s1 | `python -m scripts.study {path} --seeds 1 --arms bon` |" in md
    assert rows["SFT"]["per_seed"]["0"]["behaviour"] == acted and rows["SFT"]["per_seed"]["1"]["behaviour"] is None
    assert "## Behaviour" in md and "| SFT, seed 0 | 3 | 12.00 | 0.80 | 0.20 | go 5, look 2 |" in md
    assert (tmp_path / "results" / "figure.png").stat().st_size > 1000
    capsys.readouterr()

    # the evaluations of a seed must have played the same tasks
    commit(eto1, result(eto1, {"eval_iter1": {"d": 0.5, "e": 1.0, "g": 0.0}}))
    assert study_mod.main([str(path), "--table_only"]) == 2
    err = capsys.readouterr().err
    assert "seed 1: the evaluations did not play the same test tasks" in err and "eto-s1 eval_iter1 3 (2 differ)" in err


# --- a fake pipeline: the runner's logic without a model --------------------------------------------------------

def fake_run(run_dir: Path, evaluations: dict[str, dict[str, float]], taken_over: dict[str, Path]) -> None:
    """A finished run folder with these evaluations (per-task rewards) and the summary the pipeline writes."""
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "stages").mkdir(parents=True)
    (run_dir / "settings.json").write_text("{}")
    for stage, rewards in {**{s: None for s in taken_over}, **evaluations}.items():
        folder = run_dir / "eval" / stage.removeprefix("eval_")
        if stage in taken_over:
            shutil.copytree(taken_over[stage] / "eval" / stage.removeprefix("eval_"), folder)
            rewards = {p.stem: json.loads(p.read_text())["meta"]["reward"] for p in folder.glob("[!m]*.json")}
        else:
            folder.mkdir(parents=True)
            for task, reward in rewards.items():
                (folder / f"{task}.json").write_text(json.dumps(
                    {"id": task, "meta": {"reward": reward, "success": reward >= 1, "steps": 2, "finished": True}}))
        (folder / "metrics.json").write_text("{}")
        record = {"stage": stage, "seconds": 1.0, "outputs": [], "cost": {} if stage in taken_over else
                  {"env_steps": 2 * len(rewards)}, "metrics": {"num_tasks": len(rewards), "samples_per_task": 1}}
        if stage in taken_over:
            record["from_run"] = str(taken_over[stage])
        (run_dir / "stages" / f"{stage}.json").write_text(json.dumps(record))
        time.sleep(0.01)  # records in the order they finished
    write_summary(run_dir)


def test_a_remade_start_is_checked_against_its_committed_result(tmp_path, monkeypatch, capsys):
    path = write_study(tmp_path)
    study = load_study(path)
    start, eto = study.units()
    rewards = {"start-s0": {"eval_base": {"a": 0.0, "b": 0.0}, "eval_sft": {"a": 0.5, "b": 0.0}},
               "eto-s0": {"eval_iter1": {"a": 1.0, "b": 0.0}}}
    launched = []

    def launch(unit, env):
        launched.append(unit.run)
        taken = {} if unit.arm is None else {s: unit.start.run_dir for s in ("eval_base", "eval_sft")}
        fake_run(unit.run_dir, rewards[unit.run], taken)
        return 0

    monkeypatch.setattr(study_mod, "launch", launch)
    assert study_mod.main([str(path)]) == 0
    assert launched == ["start-s0", "eto-s0"]
    made = json.loads(eto.result_file.read_text())
    assert (made["start_reproduced"], made["start_remade"]) == (True, False)
    assert [e["stage"] for e in made["evaluations"]] == ["eval_iter1"]  # the taken-over ones are the start's
    assert made["evaluations"][0]["rewards"] == {"a": 1.0, "b": 0.0} and made["cost"]["env_steps"] == 4
    assert json.loads(start.result_file.read_text())["cost"]["env_steps"] == 8
    assert str(tmp_path) not in eto.result_file.read_text()
    assert study_mod.main([str(path)]) == 0 and launched == ["start-s0", "eto-s0"]  # all done: nothing runs
    capsys.readouterr()

    # a fresh machine: only the result files; the arm's is gone too, and the re-made start's SFT plays otherwise
    shutil.rmtree(tmp_path / "runs")
    eto.result_file.unlink()
    committed = start.result_file.read_bytes()
    rewards["start-s0"]["eval_sft"] = {"a": 0.25, "b": 0.0}
    assert study_mod.main([str(path)]) == 0
    assert launched[2:] == ["start-s0", "eto-s0"] and start.result_file.read_bytes() == committed
    made = json.loads(eto.result_file.read_text())
    assert (made["start_reproduced"], made["start_remade"]) == (False, True)
    err = capsys.readouterr().err
    assert "WARNING: start-s0 was re-made and its evaluations differ" in err
    assert "eval_sft: 1 of 2 tasks differ (e.g. a: 0.5 committed, 0.25 now)" in err
    assert "| eto iter1 (!) |" in (tmp_path / "results" / "table.md").read_text()


# --- end to end on the tiny model -------------------------------------------------------------------------------

def stage_records(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (run_dir / "stages").glob("*.json")}


@pytest.mark.slow
def test_a_study_of_two_arms_and_two_seeds_interrupted_and_resumed(tiny_model_dir, tmp_path):
    knobs = dict(zip(TINY_BUDGET[::2], TINY_BUDGET[1::2]))
    shared = {k.removeprefix("--"): int(v) for k, v in knobs.items() if k != "--iterations"}
    path = write_study(tmp_path, model=str(tiny_model_dir), seeds=[0, 1], shared=shared,
                       arms=[{"name": "eto", "method": "eto", "flags": {"iterations": 1}},
                             {"name": "bon", "method": "bon", "flags": {"samples_per_task": 2}}])
    results, runs = tmp_path / "results", tmp_path / "runs" / "st"
    cmd = [sys.executable, "-m", "scripts.study", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "first.log"
    with open(out, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=env,
                                start_new_session=True)
    try:
        deadline = time.time() + 600
        while not (results / "eto-s0.json").exists():
            assert proc.poll() is None, out.read_text()[-3000:]
            assert time.time() < deadline, "no eto-s0 result after 10 minutes"
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)  # the runner stops the run it started, which stops its stages
        assert proc.wait(timeout=120) == 130, out.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert sorted(p.name for p in results.glob("*-s*.json")) == ["eto-s0.json", "start-s0.json"]
    finished = {name: (results / f"{name}.json").read_bytes() for name in ("start-s0", "eto-s0")}
    records = {name: stage_records(runs / name) for name in finished}

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "1/6 start-s0: done" in again.stdout and "2/6 eto-s0: done" in again.stdout
    for name, data in finished.items():  # finished units: untouched, their runs not rerun
        assert (results / f"{name}.json").read_bytes() == data
        assert stage_records(runs / name) == records[name]
    units = ["start-s0", "eto-s0", "bon-s0", "start-s1", "eto-s1", "bon-s1"]
    made = {u: json.loads((results / f"{u}.json").read_text()) for u in units}
    assert all(str(tmp_path) not in (results / f"{u}.json").read_text() for u in units)
    assert made["bon-s1"]["command"].endswith("--samples_per_task 2 --method bon --subset_seed 1 --from_run start-s1")
    assert made["eto-s0"]["start_reproduced"] is True and len(made["eto-s0"]["git"]["commit"]) == 40
    assert [e["stage"] for e in made["start-s1"]["evaluations"]] == ["eval_base", "eval_sft"]
    assert [e["stage"] for e in made["bon-s1"]["evaluations"]] == ["eval_bon"]
    assert made["bon-s1"]["cost"]["train_tokens"] is None and made["start-s1"]["cost"]["train_tokens"] > 0

    # the table's paired differences, by hand from the per-task rewards of the result files
    rewards = {(u.split("-")[0], int(u[-1]), e["label"]): e["rewards"] for u in units
               for e in made[u]["evaluations"]}
    table = json.loads((results / "table.json").read_text())
    assert [r["row"] for r in table["rows"]] == ["base", "SFT", "eto iter1", "bon"]
    diffs = {d["label"]: d for d in table["paired_differences"]}
    for label, after, before in [("eto iter1 - SFT", ("eto", "iter1"), ("start", "SFT")),
                                 ("bon - eto iter1", ("bon", "best-of-K"), ("eto", "iter1"))]:
        pooled = []
        for seed in (0, 1):
            a, b = rewards[(after[0], seed, after[1])], rewards[(before[0], seed, before[1])]
            assert sorted(a) == sorted(b) and len(a) == 2  # paired: the same test tasks
            hand = [a[t] - b[t] for t in sorted(a)]
            pooled += hand
            got = diffs[label]["per_seed"][str(seed)]
            assert got["mean"] == pytest.approx(sum(hand) / len(hand)) and got["ci95"] == bootstrap_interval(hand)
        got = diffs[label]["pooled"]
        assert got["mean"] == pytest.approx(sum(pooled) / 4) and got["ci95"] == bootstrap_interval(pooled)
        assert got["better"] + got["worse"] + got["same"] == 4
    assert table["not_run_yet"] == [] and (results / "figure.png").stat().st_size > 1000
    assert "| eto iter1 - SFT |" in (results / "table.md").read_text()
