"""run_eto.sh end to end with a tiny local model: the whole loop on each task, and resume after a kill."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eval_agent.run_layout import RunLayout
from scripts import eto_pipeline
from scripts.pipeline.backends import worker_flags
from scripts.pipeline.services import Services, gpu_groups
from scripts.pipeline.settings import accumulation_steps
from scripts.pipeline.stages import Pipeline

REPO = Path(__file__).resolve().parent.parent
TINY_BUDGET = ["--iterations", "1", "--train_tasks", "2", "--test_tasks", "2", "--max_steps", "3",
               "--sft_samples", "4", "--sft_epochs", "1", "--sft_batch_size", "2", "--sft_per_device_batch_size", "2",
               "--dpo_batch_size", "2", "--dpo_per_device_batch_size", "2", "--dpo_epochs", "1",
               "--model_max_length", "3072", "--num_workers", "2", "--eval_base", "1",
               "--max_new_tokens", "64"]  # the untuned tiny model writes to the limit: the tests' main cost
# kill tests: episodes long enough that a kill lands while the stage still has work to do
SLOW_EPISODES = ["--max_new_tokens", "160"]


def pipeline_cmd(task: str, exp: str, model: Path, save: Path, *extra: str) -> list[str]:
    return ["bash", str(REPO / "run_eto.sh"), task, exp, str(model), str(save), *TINY_BUDGET, *extra]


def expert_file(task: str, tmp_path: Path) -> Path:
    """Expert trajectories covering the first train tasks (ScienceWorld's are replayed here: a full build takes minutes)."""  # noqa: E501
    if task != "sciworld":
        path = REPO / "data" / f"{task}_sft.json"
        assert path.exists(), f"{path} missing: setup.sh builds it"
        return path
    path = tmp_path / "sciworld_sft.json"
    subprocess.run([sys.executable, "-m", "scripts.build_sciworld_sft", "--limit", "4", "--out", str(path),
                    "--rebuild"], check=True, capture_output=True, timeout=600, cwd=REPO)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("task", ["alfworld", "sciworld", "webshop"])
def test_whole_loop_on_tiny_model(task, tiny_model_dir, tmp_path):
    save = tmp_path / "runs"
    expert = expert_file(task, tmp_path)
    proc = subprocess.run(pipeline_cmd(task, "tiny", tiny_model_dir, save, "--sft_data", str(expert)),
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    run = save / "tiny"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    summary = json.loads((run / "summary.json").read_text())
    stages = [r["stage"] for r in summary["results"]]
    assert stages == ["eval_base", "eval_sft", "explore_iter1", "eval_iter1"]
    for row in summary["results"]:
        assert row["tasks"] == 2 and -1.0 <= row["average_reward"] <= 1.0  # a wrong first focus scores -1
        assert row["reward_ci95"][0] <= row["average_reward"] <= row["reward_ci95"][1]
    # every evaluation played the same test tasks, so the differences are paired on 2 tasks
    assert [(d["label"], d["tasks"]) for d in summary["paired_differences"]] == [("SFT - base", 2), ("iter1 - SFT", 2)]
    evals = [sorted(p.name for p in (run / "eval" / s).glob("*.json") if p.name != "metrics.json")
             for s in ("base", "sft", "iter1")]
    assert evals[0] == evals[1] == evals[2]
    md = (run / "summary.md").read_text()
    assert all(f"| {stage} | test | 2 |" in md for stage in ("eval_base", "eval_sft", "eval_iter1"))
    assert "| SFT - base | 2 |" in md
    assert (run / "summary.png").stat().st_size > 1000

    # pairs: every explored task whose reward differs from the expert's gives exactly one pair
    explored = {json.loads(p.read_text())["id"]: json.loads(p.read_text())["meta"]["reward"]
                for p in (run / "explore" / "iter1").glob("*.json") if p.name != "metrics.json"}
    experts = {r["id"]: r.get("reward", 1.0) for r in json.loads(expert.read_text())}
    expected = sum(1 for i, r in explored.items() if i in experts and r != experts[i])
    pairs = json.loads((run / "pairs" / "iter1.json").read_text())
    assert len(pairs) == expected == summary["pairs"]["pairs_iter1"]["pairs"]
    assert expected > 0, "a random tiny model should fail where the expert succeeds"

    for model in ("sft", "dpo_iter1"):
        folder = run / "models" / model
        assert (folder / "config.json").exists() and (folder / "eto_template.txt").exists()
        assert any(folder.glob("*.safetensors"))
    assert not any("Traceback" in p.read_text() for p in (run / "logs").glob("*worker*.log"))


def _children_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    return alive


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    kids = [int(x) for x in out]
    return kids + [g for k in kids for g in _descendants(k)]


@pytest.mark.slow
def test_killed_during_exploration_resumes_without_redoing_stages(tiny_model_dir, tmp_path):
    save = tmp_path / "runs"
    run = save / "resume"
    # one episode at a time, so the kill lands between finished and unfinished episodes
    cmd = pipeline_cmd("alfworld", "resume", tiny_model_dir, save, "--train_tasks", "3", "--num_workers", "1",
                       *SLOW_EPISODES)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    explore = run / "explore" / "iter1"
    deadline = time.time() + 600
    spawned: set[int] = set()
    while time.time() < deadline and proc.poll() is None:
        spawned.update(_descendants(proc.pid))
        if explore.exists() and any(p.name != "metrics.json" for p in explore.glob("*.json")):
            break
        time.sleep(0.5)
    assert proc.poll() is None, "pipeline ended before exploration wrote an episode"
    spawned.update(_descendants(proc.pid))
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:]
    assert "interrupted" in out
    time.sleep(1)
    assert not _children_alive(sorted(spawned)), "serving processes left running after the kill"

    before = {p.name: p.read_text() for p in explore.glob("*.json")}
    assert before and not (run / "stages" / "explore_iter1.json").exists()
    sft_record = (run / "stages" / "sft.json").read_text()
    eval_record = (run / "stages" / "eval_sft.json").read_text()

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "sft: done already" in again.stdout and "eval_sft: done already" in again.stdout
    assert (run / "stages" / "sft.json").read_text() == sft_record
    assert (run / "stages" / "eval_sft.json").read_text() == eval_record
    after = {p.name: p.read_text() for p in explore.glob("*.json") if p.name != "metrics.json"}
    assert len(after) == 3
    for name, text in before.items():  # finished episodes were kept, not replayed
        if name != "metrics.json":
            assert after[name] == text
    assert json.loads((run / "summary.json").read_text())["results"][-1]["stage"] == "eval_iter1"


# -- the training recipe the pipeline hands to the trainers (no training runs here) -----------------

def _pipeline(tmp_path, *flags):
    args = eto_pipeline.parse_args(["webshop", "exp", str(tmp_path / "model"), str(tmp_path / "runs"), *flags])
    pipeline = Pipeline(args)
    pipeline.commands = {}
    pipeline.run = lambda stage, cmd: pipeline.commands.__setitem__(stage, cmd)
    return pipeline


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_dpo_stage_uses_the_originals_schedule_and_global_batch(tmp_path):
    pipeline = _pipeline(tmp_path)
    pipeline.dpo("dpo_iter1", tmp_path / "sft", tmp_path / "pairs.json", 1)
    cmd = pipeline.commands["dpo_iter1"]
    assert _flag(cmd, "--lr_scheduler_type") == "constant_with_warmup" and _flag(cmd, "--warmup_ratio") == "0.1"
    # global 32 pairs = 2 per device x 16 accumulation steps on one device
    assert (_flag(cmd, "--per_device_train_batch_size"), _flag(cmd, "--gradient_accumulation_steps")) == ("2", "16")
    assert (_flag(cmd, "--learning_rate"), _flag(cmd, "--beta")) == ("1e-06", "0.1")


@pytest.mark.parametrize("gpus, sft_accum, dpo_accum", [("", "16", "16"), ("0,1,2,3", "4", "4"),
                                                        ("0,1,2", "5", "5"), ("0,1,2,3,4,5,6,7", "2", "2")])
def test_global_batch_gives_the_originals_accumulation(tmp_path, gpus, sft_accum, dpo_accum):
    """The original's run_eto.sh: accumulation = global / GPUs / per-device in bash integer arithmetic."""
    pipeline = _pipeline(tmp_path, "--gpus", gpus)
    for global_batch, per_device, accum in ((64, 4, sft_accum), (32, 2, dpo_accum)):
        world = max(1, len([g for g in gpus.split(",") if g]))
        assert str(global_batch // world // per_device) == accum  # the rule, restated
    (tmp_path / "sft.json").write_text("[]")
    pipeline.a.sft_data = str(tmp_path / "sft.json")
    pipeline.sft()
    pipeline.dpo("dpo_iter1", tmp_path / "sft", tmp_path / "pairs.json", 1)
    sft, dpo = pipeline.commands["sft"], pipeline.commands["dpo_iter1"]
    assert (_flag(sft, "--per_device_train_batch_size"), _flag(sft, "--gradient_accumulation_steps")) == ("4", sft_accum)  # noqa: E501
    assert (_flag(dpo, "--per_device_train_batch_size"), _flag(dpo, "--gradient_accumulation_steps")) == ("2", dpo_accum)  # noqa: E501
    assert accumulation_steps(4, 2, 8) == 1  # never 0


def test_pair_stage_applies_the_task_rule(tmp_path):
    pipeline = _pipeline(tmp_path)
    # what the (not run) pair builder would write: the pairs and their counts beside them
    (tmp_path / "pairs.json").write_text("[]")
    counts = {"rule": "expert", "pairs": 0, "win": 0, "tie": 3, "lose": 0, "no_expert": 0, "incomplete": 0}
    (tmp_path / "pairs.stats.json").write_text(json.dumps(counts))
    assert pipeline.pairs("pairs_iter1", tmp_path / "explore", tmp_path / "pairs.json") == counts
    assert _flag(pipeline.commands["pairs_iter1"], "--rule") == "expert"
    assert _flag(pipeline.commands["pairs_iter1"], "--task") == "webshop"


def test_a_rerun_with_other_settings_is_refused_until_restart(tmp_path, capsys, monkeypatch):
    """Same exp_name, another task or knob: refuse (naming what differs) instead of reusing another run's stages."""
    model = tmp_path / "model"
    first = ["alfworld", "exp", str(model), str(tmp_path / "runs"), "--sft_lr", "1e-4"]
    pipeline = Pipeline(eto_pipeline.parse_args(first))
    pipeline.record_settings()
    (pipeline.stages / "sft.json").write_text("{}")  # a finished stage of that run
    code = eto_pipeline.main(["webshop", "exp", str(model), str(tmp_path / "runs"), "--sft_lr", "2e-5",
                              "--num_workers", "3"])
    err = capsys.readouterr().err
    assert code == 1 and "holds a run with other settings" in err
    assert "task: 'alfworld' then, 'webshop' now" in err and "sft_lr: 0.0001 then, 2e-05 now" in err
    assert "num_workers" not in err  # speed-only knobs may change between reruns
    assert "--restart" in err and (pipeline.stages / "sft.json").exists()
    # the same settings (another concurrency) continue the run
    Pipeline(eto_pipeline.parse_args(first + ["--num_workers", "3"])).record_settings()
    # so does a run recorded before a knob existed, while that knob stays at its default; set, it differs
    recorded = json.loads((pipeline.run_dir / "settings.json").read_text())
    (pipeline.run_dir / "settings.json").write_text(json.dumps({k: v for k, v in recorded.items() if k != "kl_coef"}))
    Pipeline(eto_pipeline.parse_args(first)).record_settings()
    (pipeline.run_dir / "settings.json").write_text(json.dumps({k: v for k, v in recorded.items() if k != "kl_coef"}))
    assert eto_pipeline.main(first + ["--kl_coef", "0.1"]) == 1
    assert "kl_coef: None then, 0.1 now" in capsys.readouterr().err
    # --restart deletes the old run before the new one starts (its stages are not run here)
    monkeypatch.setattr(Pipeline, "main", lambda self: self.record_settings() or 0)
    assert eto_pipeline.main(["webshop", "exp", str(model), str(tmp_path / "runs"), "--restart"]) == 0
    assert not (pipeline.stages / "sft.json").exists()
    assert json.loads((pipeline.run_dir / "settings.json").read_text())["task"] == "webshop"


def test_preflight_lists_every_problem_before_any_stage(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-java-here"))  # no java on PATH
    code = eto_pipeline.main(["sciworld", "exp", str(tmp_path / "no-model"), str(tmp_path / "runs"),
                              "--sft_data", str(tmp_path / "no-experts.json")])
    err = capsys.readouterr().err
    assert code == 1 and "FAILED at stage 'preflight'" in err
    assert "no-model: no config.json" in err and "no-experts.json not found" in err and "Java 17+" in err
    assert not (tmp_path / "runs" / "exp" / "logs" / "expert_data.log").exists()  # nothing ran


def _kill_tree(proc: subprocess.Popen) -> None:
    """kill -9 the pipeline and everything it started (stages and servers run in their own process groups)."""
    victims = [proc.pid] + _descendants(proc.pid)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _results(run: Path) -> list:
    summary = json.loads((run / "summary.json").read_text())
    return [(r["stage"], r["tasks"], r["average_reward"], r["success_rate"]) for r in summary["results"]] + \
        [sorted(summary["pairs"].items())]


@pytest.mark.slow
def test_kill_9_during_sft_exploration_and_dpo_then_rerun_gives_the_uninterrupted_result(tiny_model_dir, tmp_path):
    """A crash (kill -9 of the whole tree) during SFT, during exploration and during DPO: each rerun redoes only
    unfinished work (training continues from its checkpoint, finished episodes are kept byte for byte) and the
    final summary is the one of a run that was never killed (the tiny model's computation is deterministic)."""
    save = tmp_path / "runs"
    budget = ["--sft_epochs", "3", "--sft_batch_size", "1", "--sft_per_device_batch_size", "1", "--save_steps", "1",
              "--dpo_batch_size", "1", "--dpo_per_device_batch_size", "1", "--dpo_epochs", "3",
              "--train_tasks", "3", "--num_workers", "1", *SLOW_EPISODES]
    whole = subprocess.run(pipeline_cmd("alfworld", "whole", tiny_model_dir, save, *budget), capture_output=True,
                           text=True, timeout=900, cwd=tmp_path)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]

    run = save / "crashy"
    cmd = pipeline_cmd("alfworld", "crashy", tiny_model_dir, save, *budget)
    explore = run / "explore" / "iter1"
    kill_points = [
        ("sft", lambda: (run / "models" / "sft" / "checkpoint-2" / "trainer_state.json").exists()),
        ("explore_iter1", lambda: explore.exists() and any(p.name != "metrics.json" for p in explore.glob("*.json"))),
        ("dpo_iter1", lambda: (run / "models" / "dpo_iter1" / "checkpoint-2" / "trainer_state.json").exists()),
    ]
    for stage, reached in kill_points:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and not reached():
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before the kill point in {stage}"
        kept = {p.name: p.read_bytes() for p in explore.glob("*.json") if p.name != "metrics.json"} \
            if explore.exists() else {}
        _kill_tree(proc)
        assert not (run / "stages" / f"{stage}.json").exists()
        if stage == "explore_iter1":
            explore_kept = kept
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert "sft: done already" in final.stdout and "explore_iter1: done already" in final.stdout
    assert explore_kept and all((explore / name).read_bytes() == data for name, data in explore_kept.items())
    assert _results(run) == _results(save / "whole")
    assert not list(run.glob("models/*/checkpoint-*"))


@pytest.mark.slow
def test_each_worker_gets_its_gpu_in_its_own_environment(tiny_model_dir, tmp_path):
    """--gpus 0,1,2,3 with 8 workers: worker j runs with CUDA_VISIBLE_DEVICES = GPU j mod 4, as read from the
    started process (on this CPU machine the workers serve on the CPU all the same)."""
    services = Services(RunLayout(tmp_path), {**os.environ, "OMP_NUM_THREADS": "1"})
    with services.serving(tiny_model_dir, "tiny", n_workers=8, stage="explore", gpus=["0", "1", "2", "3"]) as addr:
        workers = [(name, proc) for name, proc, _ in services.procs if ".worker" in name]
        seen = {}
        for name, proc in workers:
            environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
            seen[name] = dict(e.decode().split("=", 1) for e in environ if b"=" in e)["CUDA_VISIBLE_DEVICES"]
        assert seen == {f"explore.worker{j}": str(j % 4) for j in range(8)}
        import requests
        models = requests.post(f"{addr}/list_models", timeout=10).json()["models"]
        assert models == ["tiny"]


def test_vllm_serving_without_vllm_stops_before_any_stage(tmp_path, capsys, tiny_model_dir):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")  # the check under test is for machines without it
    code = eto_pipeline.main(["alfworld", "exp", str(tiny_model_dir), str(tmp_path / "runs"), "--serving", "vllm"])
    err = capsys.readouterr().err
    assert code == 1 and "--serving vllm: vllm is not installed" in err
    assert not list((tmp_path / "runs" / "exp" / "stages").glob("*.json"))
    assert not (tmp_path / "runs" / "exp" / "logs" / "sft.log").exists()


def test_vllm_worker_flags_and_gpu_groups():
    assert gpu_groups(["0", "1", "2", "3", "4"], 2) == [["0", "1"], ["2", "3"]]
    assert worker_flags("vllm", 8, {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.8, "max_model_len": 4096}) \
        == ["--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.8", "--context-len", "4096"]
    assert worker_flags("hf", 16, {}) == ["--max-batch-size", "16", "--prefix-cache-size", "16"]
