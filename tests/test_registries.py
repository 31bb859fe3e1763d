"""The registries of methods, pair rules and serving backends: parts registered from outside the package
(tests/toy_plugins.py) run where the built-in ones run: a pair rule in the pipeline's pairs stage (the real pair
builder subprocess), a serving backend under the pipeline's services (real worker processes answering through the
controller), a method through the settings. Each toy part is registered for its test only: other tests (the knob
table, --help) see the built-in parts alone."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from eval_agent.run_layout import RunLayout, pair_stats_file, pairs_stage
from eval_agent.viewer import Run
from fastchat.records import PROMPT_TURNS
from scripts import eto_pipeline
from scripts.pairs.rule import PAIR_RULES
from scripts.pipeline.backends import SERVING_BACKENDS
from scripts.pipeline.methods import METHODS, Method
from scripts.pipeline.services import Services
from scripts.pipeline.stages import Pipeline
from scripts.pipeline.summary import write_summary
from scripts.registry import Registry, UnknownName

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def toy_parts():
    """The toy pair rule and serving backend, registered (as importing their module does) for one test."""
    from tests import toy_plugins

    PAIR_RULES.register(toy_plugins.TOY_RULE, toy_plugins.__name__)
    SERVING_BACKENDS.register(toy_plugins.TOY_BACKEND, toy_plugins.__name__)
    yield toy_plugins
    PAIR_RULES.unregister("toy")
    SERVING_BACKENDS.unregister("toy")


def episode(task: str, sample: int, actions: list[str]) -> dict:
    turns = [{"from": "human", "value": "Instruction."}, {"from": "gpt", "value": "OK"},
             {"from": "human", "value": f"task {task}"}]
    for action in actions:
        turns += [{"from": "gpt", "value": f"Action: {action}"}, {"from": "human", "value": "Nothing happens."}]
    return {"id": task, "meta": {"reward": 0.0, "success": False, "terminate_reason": "max_steps", "sample": sample},
            "conversations": turns}


def test_the_built_in_parts_are_registered_and_an_unknown_name_lists_them():
    assert {"expert", "self", "step"} <= set(PAIR_RULES)
    assert [m for m in METHODS] == ["eto", "ipr", "rft", "bon", "grpo", "gigpo", "ppo"]
    assert list(SERVING_BACKENDS) == ["hf", "vllm"]
    with pytest.raises(UnknownName, match="no pair rule 'nope'; pair rules: .*expert.*self.*step"):
        PAIR_RULES.get("nope")
    # one module per rule under scripts/pairs/
    assert {name: PAIR_RULES.module_of(name) for name in ("expert", "self", "step")} == \
        {"expert": "scripts.pairs.expert", "self": "scripts.pairs.self", "step": "scripts.pairs.step"}
    registry = Registry("thing", lambda: [])
    registry.register(Method("same", print), "one.module")
    with pytest.raises(ValueError, match="registered by one.module already"):
        registry.register(Method("same", print), "another.module")


def test_a_pair_rule_registered_outside_the_package_runs_in_the_pipelines_pairs_stage(toy_parts, tmp_path):
    (tmp_path / "sft.json").write_text("[]")
    args = eto_pipeline.parse_args(["webshop", "exp", str(tmp_path / "model"), str(tmp_path / "runs"),
                                    "--sft_data", str(tmp_path / "sft.json"), "--min_reward_gap", "0.25"])
    pipeline = Pipeline(args)
    layout = pipeline.layout
    explore = layout.episode_dir("explore_iter1")
    explore.mkdir(parents=True)
    for task, sample, actions in (("a", 0, ["look"]), ("a", 1, ["jump", "sit"]), ("b", 0, ["wait"])):
        (explore / f"{task}__s{sample}.json").write_text(json.dumps(episode(task, sample, actions)))

    out = layout.pairs_file(1, "toy")
    counts = pipeline.pairs(pairs_stage(1, "toy"), explore, out, rule="toy")  # the real subprocess
    pairs = json.loads(out.read_text())
    assert [(p["id"], p["rule"], p["tag"]) for p in pairs] == [("a", "toy", "gap 0.25")]  # the setting arrived
    assert pairs[0]["prompt"] == episode("a", 0, [])["conversations"][:PROMPT_TURNS]
    assert [t["value"] for t in pairs[0]["rejected"] if t["from"] == "gpt"] == ["Action: jump", "Action: sit"]
    assert counts == {"rule": "toy", "pairs": 1, "tasks": 2, "single": 1}
    assert json.loads(pair_stats_file(out).read_text()) == counts
    assert json.loads(layout.stage_record("toy_pairs_iter1").read_text())["counts"] == counts
    assert "--plugin tests.toy_plugins" in layout.log("toy_pairs_iter1").read_text()
    # the summary counts it as a pairs stage, the viewer finds the file and the exploration it came from
    assert write_summary(layout.root)["pairs"] == {"toy_pairs_iter1": counts}
    run = Run(layout.root)
    assert list(run.pair_sets()) == ["pairs_iter1_toy"] and RunLayout.explored_by("pairs_iter1_toy") in run.stages()


def test_the_pair_builder_loads_a_plugin_module_before_reading_the_rule(tmp_path):
    explore = tmp_path / "explore"
    explore.mkdir()
    for sample, actions in ((0, ["look"]), (1, ["jump"])):
        (explore / f"t__s{sample}.json").write_text(json.dumps(episode("t", sample, actions)))
    cmd = [sys.executable, "-m", "scripts.construct_preference", "--rule", "toy", "--explore_dir", str(explore),
           "--output_path", str(tmp_path / "p.json")]
    done = subprocess.run([*cmd, "--plugin", "tests.toy_plugins", "--toy_tag", "x"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "p.json").read_text())[0]["tag"] == "x" and "1 pairs written" in done.stdout
    refused = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert refused.returncode == 2 and "invalid choice: 'toy'" in refused.stderr  # no plugin, no such rule


def test_a_serving_backend_registered_outside_the_package_answers_through_the_controller(toy_parts, tmp_path):
    services = Services(RunLayout(tmp_path), dict(os.environ), ready_timeout=120)
    with services.serving(tmp_path / "no-model", "toy-model", n_workers=2, stage="toy", batch_size=3,
                          backend="toy", options={"tensor_parallel_size": 1}) as controller:
        chunks = requests.post(f"{controller}/worker_generate_stream", json={"model": "toy-model", "prompt": "hi"},
                               stream=True, timeout=30).iter_lines(delimiter=b"\0")
        last = [json.loads(c) for c in chunks if c][-1]
        assert last["text"] == "fixed reply (batch 3, tp 1)" and last["error_code"] == 0
        procs = {name: proc for name, proc, _ in services.procs}
        assert sorted(procs) == ["toy.controller", "toy.worker0", "toy.worker1"]
        for name, proc in procs.items():  # every server bound a port of its own choosing
            assert proc.args[proc.args.index("--port") + 1] == "0" and "--port-file" in proc.args
        # both workers registered their own bound address
        status = requests.post(f"{controller}/list_models", timeout=5).json()
        assert status["models"] == ["toy-model"]
    assert all(proc.poll() is not None for proc in procs.values())
    assert (tmp_path / "logs" / "toy.worker1.log").exists()


def test_the_settings_ask_the_registries_for_methods_and_backends(toy_parts, tmp_path):
    def parse(*flags: str):
        return eto_pipeline.parse_args(["webshop", "exp", str(tmp_path / "model"), str(tmp_path / "runs"), *flags])

    METHODS.register(Method("toy_method", print, samples_per_task=3), __name__)
    try:
        settings = parse("--method", "toy_method", "--serving", "toy")
        assert (settings.method, settings.samples_per_task, settings.serving) == ("toy_method", 3, "toy")
    finally:
        METHODS.unregister("toy_method")
    assert parse("--method", "bon").samples_per_task == 4 and parse("--self_play", "1").samples_per_task == 4
    with pytest.raises(SystemExit):
        parse("--method", "toy_method")
