"""The run folder's layout (eval_agent/run_layout.py): the only place the package builds run paths, and the layout
runs have always had on disk, so old run folders read alike in the summary and the viewer."""
from __future__ import annotations

import ast
import json
from pathlib import Path

from eval_agent.run_layout import (
    RunLayout,
    eval_stage,
    is_pairs_stage,
    iteration_number,
    iteration_stage,
    pair_stats_file,
    pairs_stage,
    rollouts_dir,
    split_of,
)
from eval_agent.viewer import Run, create_app
from scripts.pipeline.summary import write_summary

REPO = Path(__file__).resolve().parent.parent
LAYOUT = REPO / "eval_agent" / "run_layout.py"
# the names of a run folder's parts, as path pieces
RUN_PIECES = {"pairs", "explore", "eval", "stages", "logs", "models", "data", "tmp", "settings.json", "summary.json",
              "summary.md", "summary.png", ".write_probe"}
# the same names used for other folders than a run's
OTHER_FOLDERS = {("eval_agent/paths.py", "data"): "the repository's data folder",
                 ("eval_agent/paths.py", "models"): "the repository's models folder",
                 ("scripts/fetch_data.py", "data"): "the repository's data folder",
                 ("scripts/gpu_bundle.py", "data"): "the repository's and the bundle's data folders",
                 ("scripts/gpu_check.py", "data"): "the repository's and the bundle's data folders",
                 ("scripts/gpu_check.py", "logs"): "the small GPU check's own process logs",
                 ("scripts/gpu_check.py", "{}.log"): "the small GPU check's own process logs",
                 ("scripts/gpu_check.py", "gpu_check.log"): "the small GPU check's own log"}


def text_of(node: ast.AST) -> str | None:
    """A string literal's text; an f-string's with {} for each value."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def hand_built_run_paths(source: str, rel: str) -> list[str]:
    """Where the module `rel` (its source) builds a run path itself: `folder / "pairs"` (a run part joined as a
    literal), `folder / f"{stage}.log"`, an f"iter{...}" name, a ".stats.json" or ".rollouts" suffix."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            text = text_of(node.right)
            if text is not None and (text in RUN_PIECES or text.endswith(".log")) and (rel, text) not in OTHER_FOLDERS:
                found.append(f"{rel}:{node.lineno}: / {text!r}")
        elif isinstance(node, ast.JoinedStr) and (text_of(node) or "").startswith("iter{}"):
            found.append(f"{rel}:{node.lineno}: f\"{text_of(node)}\"")
        elif isinstance(node, ast.Constant) and node.value in (".stats.json", ".rollouts"):
            found.append(f"{rel}:{node.lineno}: {node.value!r}")
    return found


def test_the_layout_is_the_only_place_run_paths_are_built():
    sources = [p for root in ("scripts", "eval_agent") for p in sorted((REPO / root).rglob("*.py")) if p != LAYOUT]
    assert [hit for path in sources
            for hit in hand_built_run_paths(path.read_text(encoding="utf-8"), path.relative_to(REPO).as_posix())] == []
    # the check sees them where they are built
    assert hand_built_run_paths(LAYOUT.read_text(encoding="utf-8"), "eval_agent/run_layout.py")


def test_the_checker_sees_a_hand_built_path():
    source = 'run / "pairs" / f"iter{it}.json"\nlogs / f"{stage}.log"\nname + ".stats.json"\n'
    hits = sorted(hit.split(": ", 1)[1] for hit in hand_built_run_paths(source, "module.py"))
    assert hits == sorted(["/ 'pairs'", 'f"iter{}.json"', "/ '{}.log'", "'.stats.json'"])


def test_names_of_stages_and_iterations():
    assert [iteration_stage(step, 1) for step in ("explore", "dpo", "sft", "rft_data")] == \
        ["explore_iter1", "dpo_iter1", "sft_iter1", "rft_data_iter1"]
    assert [eval_stage(n) for n in ("base", "sft", "bon")] == ["eval_base", "eval_sft", "eval_bon"]
    assert (pairs_stage(2), pairs_stage(2, "step")) == ("pairs_iter2", "step_pairs_iter2")
    assert [is_pairs_stage(s) for s in ("pairs_iter1", "step_pairs_iter3", "rft_data_iter1", "dpo_iter1")] == \
        [True, True, False, False]
    assert [iteration_number(s) for s in ("eval_iter12", "iter0", "eval_sft", "pairs_iter1_step")] == \
        [12, 0, None, None]
    assert (split_of("explore_iter0"), split_of("eval_bon")) == ("train", "test")


def write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_a_run_folder_written_before_the_layout_object_reads_alike(tmp_path):
    """The paths as the pipeline wrote them by hand before eval_agent/run_layout.py (literal here, on purpose)."""
    run = tmp_path / "old-run"
    turns = [{"from": "human", "value": "Instruction."}, {"from": "gpt", "value": "OK"},
             {"from": "human", "value": "task"}, {"from": "gpt", "value": "Action: look"}]
    rewards = {"eval_base": 0.0, "eval_sft": 1.0, "explore_iter1": 0.0, "eval_iter1": 1.0}
    for stage, reward in rewards.items():
        folder = stage.replace("_", "/")
        write(run / folder / "t1.json", {"id": "t1", "meta": {"reward": reward, "success": reward == 1.0,
                                                             "steps": 1, "terminate_reason": "max_steps"},
                                         "conversations": turns})
    pair = {"id": "t1", "kind": "trajectory", "prompt": turns[:3], "chosen": turns[3:], "rejected": turns[3:]}
    write(run / "pairs" / "iter1.json", [pair])
    write(run / "pairs" / "iter1.stats.json", {"rule": "expert", "pairs": 1})
    write(run / "pairs" / "iter1_step.json", [{**pair, "kind": "step"}])
    for stage in ("eval_base", "eval_sft", "explore_iter1", "pairs_iter1", "step_pairs_iter1", "dpo_iter1",
                  "eval_iter1"):
        metrics = {"num_tasks": 1, "average_reward": rewards.get(stage), "success_rate": rewards.get(stage)}
        write(run / "stages" / f"{stage}.json", {"stage": stage, "seconds": 1.0, **(
            {"metrics": metrics} if stage in rewards else {"counts": {"pairs": 1}})})
    write(run / "settings.json", {"task": "alfworld"})

    layout = RunLayout(run)
    assert layout.stage_record("eval_sft") == run / "stages" / "eval_sft.json"
    assert layout.log("sft") == run / "logs" / "sft.log" and layout.model("dpo_iter1") == run / "models" / "dpo_iter1"
    assert layout.data("ipr_iter1.json") == run / "data" / "ipr_iter1.json"
    assert layout.episode_dir("explore_iter1") == run / "explore" / "iter1"
    assert layout.pairs_file(1) == run / "pairs" / "iter1.json"
    assert layout.pairs_file(1, "step") == run / "pairs" / "iter1_step.json"
    assert pair_stats_file(layout.pairs_file(1)) == run / "pairs" / "iter1.stats.json"
    assert rollouts_dir(layout.pairs_file(1, "step")) == run / "pairs" / "iter1_step.rollouts"
    assert (layout.settings, layout.summary_json) == (run / "settings.json", run / "summary.json")
    assert layout.episode_stages() == {"eval_base": run / "eval" / "base", "eval_sft": run / "eval" / "sft",
                                       "eval_iter1": run / "eval" / "iter1", "explore_iter1": run / "explore" / "iter1"}

    summary = write_summary(run)
    assert [c["label"] for c in summary["test_reward_by_stage"]] == ["base", "SFT", "iter1"]
    assert set(summary["pairs"]) == {"pairs_iter1", "step_pairs_iter1"}
    assert (run / "summary.md").is_file() and (run / "summary.png").is_file()
    viewer = Run(run)
    assert list(viewer.stages()) == ["eval_base", "eval_sft", "explore_iter1", "eval_iter1"]
    assert list(viewer.pair_sets()) == ["pairs_iter1", "pairs_iter1_step"]  # the stats file is not a pair set
    client = create_app(viewer).test_client()
    for url in ("/", "/pairs/pairs_iter1_step", "/pair/pairs_iter1_step/0", "/stage/explore_iter1"):
        assert client.get(url).status_code == 200, url


def test_the_committed_studys_stages_map_to_their_folders():
    """docs/results/cpu-study/stages.json: the stage records of a real run (without its episode files)."""
    stages = json.loads((REPO / "docs" / "results" / "cpu-study" / "stages.json").read_text())
    layout = RunLayout(Path("run"))
    episodes = {s: layout.episode_dir(s).as_posix() for s in stages if "metrics" in stages[s]}
    assert episodes == {"eval_base": "run/eval/base", "eval_sft": "run/eval/sft", "explore_iter1": "run/explore/iter1",
                        "eval_iter1": "run/eval/iter1"}
    assert [s for s in stages if is_pairs_stage(s)] == ["pairs_iter1"]
