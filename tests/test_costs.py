"""What each point of a run cost: token counts from the agents, per-episode costs in meta["cost"], their sums in
metrics.json, stage costs in the pipeline's stage records and the cost table of summary.json.
(The whole loop's costs adding up on a real run is checked in test_viewer.py, on the run the viewer shows.)"""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from eval_agent.agents import load_agent_config, make_agent
from eval_agent.agents.openai_agent import OpenAIAgent
from eval_agent.main import parse_args, run
from eval_agent.runner import sum_costs
from scripts import eto_pipeline
from scripts.pipeline.stages import Pipeline
from scripts.pipeline.summary import write_summary
from tests.test_eval_agents import MESSAGES, agent_for, chat_completion, serve, start_fastchat  # noqa: F401 (serve: fixture)

REPO = Path(__file__).resolve().parent.parent

EPISODE_FIELDS = {"model_calls", "prompt_tokens", "completion_tokens", "env_steps", "episode_seconds"}


def test_fastchat_agent_reports_the_workers_token_counts_per_thread(serve):  # noqa: F811
    # each chunk carries the answer so far and its usage; the last one counts
    chunks = [{"text": "Thought: I", "error_code": 0, "usage": {"prompt_tokens": 40, "completion_tokens": 3}},
              {"text": "Thought: I look.\nAction: look", "error_code": 0,
               "usage": {"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49}}]
    agent = agent_for(start_fastchat(serve, [(200, chunks)]))
    assert agent(MESSAGES) == "Thought: I look.\nAction: look"
    other_thread = []
    thread = threading.Thread(target=lambda: other_thread.append(agent.take_usage()))
    thread.start()
    thread.join()
    assert other_thread == [None]  # concurrent episodes never see each other's counts
    assert agent.take_usage() == (40, 9)
    assert agent.take_usage() is None  # taken once


def test_openai_agent_reports_the_servers_usage(serve, monkeypatch):  # noqa: F811
    server = serve({"/v1/chat/completions": [(200, chat_completion("Action: look"))]})
    agent = OpenAIAgent("tiny", base_url=server.address + "/v1", max_retries=0)
    assert agent(MESSAGES) == "Action: look"
    assert agent.take_usage() == (5, 3)


def keyroom_agent(task_folder: Path, reports: bool):
    """The key room's expert (tests/newtask); with `reports`, it says each answer cost 7 prompt tokens and one
    generated token per character."""
    path, raw = load_agent_config(str(task_folder / "keyroom_agent.json"))
    expert = type(make_agent(path, raw))

    class Counting(expert):
        def __call__(self, messages):
            answer = super().__call__(messages)
            if reports:
                self.report_usage(7, len(answer))
            return answer

    return Counting("keyroom-expert")


@pytest.mark.parametrize("reports", [True, False])
def test_every_episode_records_its_cost_and_metrics_hold_the_sums(tmp_path, reports):
    folder = tmp_path / "tasks"
    shutil.copytree(REPO / "tests" / "newtask", folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "eval"
    args = parse_args(["--task_path", str(folder), "--exp_config", "keyroom", "--split", "test",
                       "--output_path", str(out), "--num_workers", "2"])
    assert run(args, agent=keyroom_agent(folder, reports)) == 0

    costs = []
    for path in sorted(out.glob("keyroom-*.json")):
        record = json.loads(path.read_text())
        cost, answers = record["meta"]["cost"], [t["value"] for t in record["conversations"][3:] if t["from"] == "gpt"]
        assert set(cost) == EPISODE_FIELDS
        assert cost["model_calls"] == len(answers) == cost["env_steps"] == record["meta"]["steps"] > 0
        if reports:
            assert cost["prompt_tokens"] == 7 * len(answers)
            assert cost["completion_tokens"] == sum(len(a) for a in answers)  # this episode's answers, no other's
        else:  # unknown, not zero
            assert cost["prompt_tokens"] is None and cost["completion_tokens"] is None
        assert isinstance(cost["episode_seconds"], float) and cost["episode_seconds"] >= 0  # the toy game is fast
        costs.append(cost)
    assert len(costs) == 4
    total = json.loads((out / "metrics.json").read_text())["cost"]
    for field in EPISODE_FIELDS - {"episode_seconds", "prompt_tokens", "completion_tokens"}:
        assert total[field] == sum(c[field] for c in costs)
    assert total["episode_seconds"] == pytest.approx(sum(c["episode_seconds"] for c in costs), abs=1e-6)
    if reports:
        assert total["prompt_tokens"] == sum(c["prompt_tokens"] for c in costs)
        assert total["completion_tokens"] == sum(c["completion_tokens"] for c in costs)
    else:
        assert total["prompt_tokens"] is None and total["completion_tokens"] is None


def test_sum_costs_adds_what_is_known():
    assert sum_costs([{"a": 1, "b": None}, {"a": 2, "b": None, "c": 0.5}, {}]) == {"a": 3, "b": None, "c": 0.5}
    assert sum_costs([]) == {}


def test_pipeline_stage_records_carry_trainer_costs_and_gpu_seconds(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    args = eto_pipeline.parse_args(["alfworld", "exp", str(tmp_path / "model"), str(tmp_path / "runs"),
                                    "--gpus", "0,1,2", "--sft_data", str(tmp_path / "sft.json")])
    (tmp_path / "sft.json").write_text("[]")
    pipeline = Pipeline(args)

    def trainer(stage, cmd):  # what fastchat.train.train leaves next to the model
        out = Path(cmd[cmd.index("--output_dir") + 1])
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "train_summary.json").write_text(json.dumps({"tokens_per_epoch": 1000, "epochs": 3.0,
                                                            "peak_rss_mib": 900.5, "peak_cuda_mib": 300.0}))
        (out / "trainer_state.json").write_text(json.dumps({"global_step": 12}))

    pipeline.run = trainer
    pipeline.sft()
    record = json.loads((pipeline.stages / "sft.json").read_text())
    assert record["cost"] == {"train_tokens": 3000, "optimizer_steps": 12, "peak_rss_mib": 900.5,
                              "peak_cuda_mib": 300.0, "gpu_seconds": round(record["seconds"] * 3, 1)}  # --gpus: 3


def _stage(run_dir: Path, name: str, seconds: float, cost: dict | None) -> None:
    (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    record = {"stage": name, "seconds": seconds, **({"cost": cost} if cost is not None else {})}
    (run_dir / "stages" / f"{name}.json").write_text(json.dumps(record))


def test_summary_has_a_cost_table_per_stage_and_in_total(tmp_path):
    run_dir = tmp_path / "run"
    _stage(run_dir, "expert_data", 4.0, None)  # a record from before costs: its wall time still counts
    _stage(run_dir, "sft", 100.0, {"train_tokens": 3000, "optimizer_steps": 12, "peak_rss_mib": 900.0,
                                   "peak_cuda_mib": None})
    _stage(run_dir, "pairs_iter1", 1.5, {})
    _stage(run_dir, "dpo_iter1", 50.0, {"train_tokens": 800, "optimizer_steps": 3, "peak_rss_mib": 1200.0,
                                        "peak_cuda_mib": None})
    summary = write_summary(run_dir)
    table = json.loads((run_dir / "summary.json").read_text())["costs"]
    assert table == json.loads(json.dumps(summary["costs"]))
    assert [row["stage"] for row in table["stages"]] == ["expert_data", "sft", "pairs_iter1", "dpo_iter1"]
    sft = table["stages"][1]
    assert (sft["wall_seconds"], sft["train_tokens"], sft["optimizer_steps"]) == (100.0, 3000, 12)
    assert sft["model_calls"] is None  # no episodes in a training stage
    total = table["total"]
    assert total["wall_seconds"] == 155.5 and total["train_tokens"] == 3800 and total["optimizer_steps"] == 15
    assert total["peak_rss_mib"] == 1200.0  # the largest, not a sum
    assert total["gpu_seconds"] is None and total["model_calls"] is None  # a CPU run without episodes
    md = (run_dir / "summary.md").read_text()
    assert "| cost | wall s | train tokens | optimizer steps | peak RSS MiB |" in md
    assert "| **total** | 155.5 | 3800 | 15 | 1200.0 |" in md
    assert "GPU s" not in md
