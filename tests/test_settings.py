"""The pipeline's settings object: resolution order (default < preset < --config < environment < flag), values
parsed once, ETO_ environment variables (and the bare names of earlier releases), one-line refusals of bad values
before anything is written, the preset files, the generation knobs' one path to the agent, the knob table."""
from __future__ import annotations

import json
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from eval_agent import main as eval_main
from eval_agent.agents import load_agent_config, make_agent
from eval_agent.agents.base import MAX_NEW_TOKENS, TEMPERATURE, TOP_P
from scripts import eto_pipeline
from scripts.pipeline import settings as settings_module
from scripts.pipeline.settings import KNOBS, env_name, markdown_table, presets, read_yaml
from scripts.pipeline.stages import Pipeline

REPO = Path(__file__).resolve().parent.parent

# The presets as scripts/eto_settings.py defined them in Python before they became YAML files (dpo_lrs and
# dpo_betas were strings then, parsed into lists later).
PRESETS_BEFORE = {
    "demo": dict(sft_samples=24, sft_epochs=1, train_tasks=4, test_tasks=4, iterations=1, max_steps=10,
                 model_max_length=1024, sft_batch_size=4, sft_per_device_batch_size=2, dpo_batch_size=4,
                 dpo_per_device_batch_size=2, num_workers=4, eval_base=1, rl_steps=2, rl_tasks_per_step=4,
                 rl_batch_size=8, eval_every=0),
    "cpu-study": dict(eval_base=1, sft_samples=64, sft_epochs=1, sft_lr=1e-4, sft_batch_size=8,
                      sft_per_device_batch_size=1, model_max_length=2048, test_tasks=24, train_tasks=16,
                      iterations=1, max_steps=20, max_new_tokens=128, num_workers=8, dpo_lrs=[3e-5],
                      dpo_betas=[0.1], dpo_epochs=1, dpo_batch_size=4, dpo_per_device_batch_size=1),
    "gpu-study": dict(eval_base=1, iterations=1, train_tasks=256, max_new_tokens=128, num_workers=64,
                      worker_batch_size=64, sft_lr=1e-4, dpo_lrs=[5e-6], dpo_betas=[0.1], dpo_epochs=2,
                      dpo_batch_size=32),
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No knob variable of the caller's shell (ETO_ or bare) leaks into these parses; warnings shown afresh."""
    for name in KNOBS:
        monkeypatch.delenv(env_name(name), raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setattr(settings_module, "_deprecation_warned", set())


def parse(tmp_path: Path, exp: str = "exp", *flags: str):
    return eto_pipeline.parse_args(["alfworld", exp, str(tmp_path / "model"), str(tmp_path / "runs"), *flags])


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "knobs.yaml"
    path.write_text(text)
    return path


def refusal(capsys, argv: list[str]) -> str:
    """The one line a refused parse prints (exit status 2)."""
    with pytest.raises(SystemExit) as stop:
        eto_pipeline.parse_args(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_each_source_overrides_the_one_below(tmp_path, monkeypatch):
    """default < preset named by exp_name < --config FILE < ETO_ variable < flag, one knob through all five."""
    config = write_config(tmp_path, "num_workers: 5\nsft_epochs: 2\n")
    assert parse(tmp_path).num_workers == 8  # the field's default
    assert parse(tmp_path, "demo").num_workers == 4  # demo.yaml
    from_config = parse(tmp_path, "demo", "--config", str(config))
    assert (from_config.num_workers, from_config.sft_epochs, from_config.sft_samples) == (5, 2, 24)
    monkeypatch.setenv("ETO_NUM_WORKERS", "6")
    assert parse(tmp_path, "demo", "--config", str(config)).num_workers == 6
    assert parse(tmp_path, "demo", "--config", str(config), "--num_workers", "7").num_workers == 7


def test_values_are_typed_and_lists_parsed_once(tmp_path, monkeypatch):
    monkeypatch.setenv("ETO_DPO_BETAS", "0.2 0.3")
    s = parse(tmp_path, "exp", "--dpo_lrs", "1e-6, 5e-7", "--self_play", "1", "--sft_data", "")
    assert s.dpo_lrs == [1e-6, 5e-7] and s.dpo_betas == [0.2, 0.3] and s.self_play is True
    assert parse(tmp_path, "exp", "--config", str(write_config(tmp_path, "dpo_lrs: [3e-5, 1.0e-6]\n"))).dpo_lrs \
        == [3e-5, 1e-6]  # YAML reads 3e-5 as text: taken as a flag would take it
    # settings.json is the object as it is: the lists as lists
    pipeline = Pipeline(s)
    pipeline.record_settings()
    recorded = json.loads((pipeline.run_dir / "settings.json").read_text())
    assert recorded["dpo_lrs"] == [1e-6, 5e-7] and recorded["dpo_betas"] == [0.2, 0.3]
    assert recorded["self_play"] is True and recorded["task"] == "alfworld"


def test_derived_values_come_from_the_method_the_gpus_and_the_task(tmp_path):
    s = parse(tmp_path, "exp", "--method", "bon", "--gpus", "0,1,2")
    assert (s.samples_per_task, s.explore_workers, s.eval_workers) == (4, 3, 3)
    assert s.sft_data.endswith("alfworld_sft.json")  # the task config's expert_data.path
    assert parse(tmp_path, "exp", "--serving", "vllm", "--tensor_parallel_size", "2", "--gpus", "0,1,2,3") \
        .explore_workers == 2
    default_model = eto_pipeline.parse_args(["alfworld", "exp"]).model_path
    assert Path(default_model).is_absolute() and default_model.endswith("SmolLM2-135M-Instruct")


def test_eto_variables_are_read_and_the_bare_names_with_a_warning_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ETO_ITERATIONS", "2")
    monkeypatch.setenv("LORA", "1")
    assert (parse(tmp_path).iterations, parse(tmp_path).lora) == (2, True)
    err = capsys.readouterr().err
    assert err.count("warning: the environment variable LORA is deprecated, set ETO_LORA instead") == 1
    assert "ITERATIONS" not in err
    # the ETO_ variable wins over the bare one, silently: the bare one may be the shell's for something else
    monkeypatch.setenv("ETO_LORA", "0")
    monkeypatch.setenv("TEMPERATURE", "5")
    monkeypatch.setenv("ETO_TEMPERATURE", "0.3")
    s = parse(tmp_path)
    assert (s.lora, s.temperature) == (False, 0.3)
    assert "deprecated" not in capsys.readouterr().err
    # a flag wins over both, and an overridden variable is neither read nor warned about
    monkeypatch.delenv("ETO_TEMPERATURE")
    assert parse(tmp_path, "exp", "--temperature", "0.9").temperature == 0.9
    assert "deprecated" not in capsys.readouterr().err


@pytest.mark.parametrize("flags, env, message", [
    (["--dpo_lrs", "abc"], {}, "--dpo_lrs: expected numbers separated by spaces or commas, got 'abc'"),
    (["--iterations", "two"], {}, "--iterations: expected an integer, got 'two'"),
    (["--method", "dqn"], {}, "--method: expected one of eto, ipr, rft, bon, grpo, gigpo, ppo, got 'dqn'"),
    (["--method", "grpo", "--temperature", "0"], {},
     "--temperature: --method grpo learns from sampled rollouts and their log-probabilities; greedy rollouts "
     "(temperature 0) have none"),
    (["--serving", "tgi"], {}, "--serving: expected one of hf, vllm, got 'tgi'"),
    (["--sft_batch_size", "0"], {}, "--sft_batch_size: must be >= 1, got 0"),
    (["--top_p", "1.5"], {}, "--top_p: must be <= 1, got 1.5"),
    ([], {"ETO_TEMPERATURE": "warm"}, "ETO_TEMPERATURE: expected a number, got 'warm'"),
    ([], {"ETO_DPO_PER_DEVICE_BATCH_SIZE": "0"}, "ETO_DPO_PER_DEVICE_BATCH_SIZE: must be >= 1, got 0"),
    ([], {"GRADIENT_CHECKPOINTING": "maybe"}, "GRADIENT_CHECKPOINTING: expected 0 or 1, got 'maybe'"),
    (["--method", "rft"], {"ETO_SELF_PLAY": "1"},
     "ETO_SELF_PLAY: self-play goes with --method eto, got 'rft' from --method"),
    (["--serving", "vllm", "--tensor_parallel_size", "4", "--gpus", "0,1"], {},
     "--tensor_parallel_size: 4 GPUs per vllm worker need at least that many GPUs, got '0,1' from --gpus"),
])
def test_a_bad_flag_or_variable_is_refused_in_one_line(tmp_path, monkeypatch, capsys, flags, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = ["alfworld", "exp", str(tmp_path / "model"), str(tmp_path / "runs"), *flags]
    assert refusal(capsys, argv) == f"run_eto.sh: {message}"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text, message", [
    ("iterations: 1.5\n", ":iterations: expected an integer, got 1.5"),
    ("dpo_lrs: [1.0e-6, fast]\n", ":dpo_lrs: expected a number or a list of numbers, got [1e-06, 'fast']"),
    ("eval_base: 2\n", ":eval_base: expected 0 or 1, got 2"),
    ("iteration: 2\n", ":iteration: not a knob (did you mean iterations?); the knobs: docs/knobs.md"),
    ("- iterations\n", ": expected a mapping of knob names to values, got list"),
    ("iterations: [\n", ": not valid YAML (line 2)"),
])
def test_a_bad_config_file_is_refused_naming_the_file_and_key(tmp_path, capsys, text, message):
    config = write_config(tmp_path, text)
    argv = ["alfworld", "exp", str(tmp_path / "model"), str(tmp_path / "runs"), "--config", str(config)]
    assert refusal(capsys, argv) == f"run_eto.sh: {config}{message}"
    assert not (tmp_path / "runs").exists()


def test_a_missing_config_file_is_refused(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert refusal(capsys, ["alfworld", "exp", "--config", str(missing)]) == \
        f"run_eto.sh: --config {missing}: no such file"


def test_run_eto_sh_refuses_a_bad_value_without_a_traceback_or_a_run_folder(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "run_eto.sh"), "alfworld", "x", "", str(tmp_path / "out"),
                           "--dpo_lrs", "abc"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == "run_eto.sh: --dpo_lrs: expected numbers separated by spaces or commas, got 'abc'\n"
    assert proc.stdout == "" and not (tmp_path / "out").exists()


def test_the_preset_files_hold_the_values_of_the_python_presets(tmp_path):
    assert sorted(presets()) == sorted(PRESETS_BEFORE)
    for name, before in PRESETS_BEFORE.items():
        values = {key: value for key, (value, _) in read_yaml(presets()[name], name).items()}
        assert values == before, name
        applied = parse(tmp_path, name)
        assert all(getattr(applied, key) == value for key, value in before.items()), name
    assert "docs/results/README.md says why each number" in presets()["cpu-study"].read_text()  # comments kept


class FakeServices:
    """Serving that starts nothing: an episode stage's command is recorded, not run."""

    @contextmanager
    def serving(self, *args, **kwargs):
        yield "http://127.0.0.1:1"

    def stop_all(self):
        pass


def eval_command(tmp_path: Path, exp: str, *flags: str) -> list[str]:
    pipeline = Pipeline(parse(tmp_path, exp, *flags))
    pipeline.services = FakeServices()
    commands = []

    def run(stage, cmd):
        commands.append(cmd)
        (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"cost": {}}))

    pipeline.run = run
    (tmp_path / "eval").mkdir(exist_ok=True)
    pipeline.episodes("eval_sft", Path("m"), "test", tmp_path / "eval", 0.0, 0, 1)
    return commands[0]


@pytest.mark.parametrize("exp, flags, sent", [("exp", [], MAX_NEW_TOKENS), ("cpu-study", [], 128),
                                              ("exp", ["--max_new_tokens", "64"], 64)])
def test_generation_knobs_reach_the_agent_explicitly(tmp_path, exp, flags, sent):
    """The episode command names every generation knob, and the agent eval_agent.main builds from it sends that
    (512 by default as before, from the agent config then; 128 under cpu-study)."""
    cmd = eval_command(tmp_path, exp, *flags)
    assert cmd[1:3] == ["-m", "eval_agent.main"]
    args = eval_main.parse_args(cmd[3:])
    agent = make_agent(*load_agent_config(args.agent_config), model_name=args.model_name,
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    assert (agent.max_new_tokens, agent.temperature, agent.top_p) == (sent, 0.0, 1.0)
    assert (args.max_new_tokens, args.temperature, args.top_p) == (sent, 0.0, 1.0)  # explicit, not a default


def test_the_generation_defaults_are_defined_once():
    """Without flags (eval_agent.main on its own) the agent config leaves them to the agent's one default."""
    args = eval_main.parse_args([])
    agent = make_agent(*load_agent_config("fastchat"), max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p)
    assert (agent.max_new_tokens, agent.temperature, agent.top_p) == (MAX_NEW_TOKENS, TEMPERATURE, TOP_P) \
        == (512, 0.0, 1.0)
    for config in (REPO / "eval_agent" / "configs" / "model").glob("*.json"):
        assert not {"max_new_tokens", "temperature", "top_p"} & set(json.loads(config.read_text())["config"])
    assert KNOBS["max_new_tokens"].default == MAX_NEW_TOKENS and KNOBS["top_p"].default == TOP_P


def test_the_knob_table_in_docs_is_generated_from_the_settings():
    committed = (REPO / "docs" / "knobs.md").read_text()
    assert committed == markdown_table(), \
        "docs/knobs.md is out of date: python -m scripts.pipeline.settings --markdown > docs/knobs.md"
    for name in KNOBS:
        assert f"`--{name}` | `ETO_{name.upper()}`" in committed
