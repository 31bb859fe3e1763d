"""The small GPU check (scripts/gpu_check.sh --small, scripts/gpu_check.py) and its wheel bundle
(scripts/gpu_bundle.py): the whole check on the CPU with a tiny model, every import of its code paths resolved
against the bundle + the lent machine's package list + the standard library, the size limit, bad input."""
from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from scripts import gpu_bundle
from scripts.deps import normalize, read_lock
from scripts.gpu_check import COMPARE_STEPS, LOSS_RTOL

REPO = Path(__file__).resolve().parent.parent


# -- the check end to end on the CPU ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_small_check_on_cpu_end_to_end(tiny_model_dir, tmp_path):
    """Every step on the CPU (the GPU hidden) through the shell entry, random weights built from the tiny model's
    config and tokenizer files; the JSON holds every figure and the checks held."""
    task = tmp_path / "keyroom"
    subprocess.run(["cp", "-r", str(REPO / "tests" / "newtask"), str(task)], check=True)
    expert = tmp_path / "keyroom_sft.json"
    subprocess.run([sys.executable, "build_keyroom_sft.py", "--out", str(expert)], cwd=task, check=True,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--small", str(out), "--device", "cpu",
                           "--model-config", str(tiny_model_dir), "--train-data", str(expert), "--train-samples", "8",
                           "--train-batch", "2", "--dpo-batch", "1", "--new-tokens", "8", "--concurrency", "1", "4",
                           "--threads", "2"], capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    failed = {}
    if (out / "gpu_check.json").is_file():
        failed = {k: v.get("error") for k, v in json.loads((out / "gpu_check.json").read_text())["steps"].items()
                  if v.get("error")}
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + json.dumps(failed, indent=1)[-6000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "logs.tar.gz"]
    r = json.loads((out / "gpu_check.json").read_text())
    assert r["ok"] and r["checks"] and all(r["checks"].values())
    steps = r["steps"]
    for name in ("env", "model", "limits", "serving", "training", "loop"):
        assert steps[name]["ok"], (name, steps[name])
    assert steps["deepspeed"]["skipped"].startswith("needs CUDA")
    assert steps["env"]["device"] == "cpu" and steps["env"]["cuda_available"] is False

    model = steps["model"]
    assert model["random_weights"] and model["config_from"] == str(tiny_model_dir)
    limits = steps["limits"]
    assert limits["model_shapes"]["memory_gbs"] > 0 and limits["peak"]["matmul_gflops"] > 0

    rows = steps["serving"]["rows"]
    assert [row["concurrency"] for row in rows] == [1, 4]
    assert steps["serving"]["raw"]["via_api"] and steps["serving"]["raw"]["max_batch_size"] == 4
    for row in rows:
        assert row["same_greedy_text"] and row["batched_tokens_per_s"] > 0 and row["one_at_a_time_tokens_per_s"] > 0
        assert row["batched_over_one_at_a_time"] > 0 and 0 < row["batched_fraction_of_model_limit"] < 1

    training = steps["training"]
    assert [x["run"] for x in training["bf16"]] == [x["run"] for x in training["fp32"]] == ["sft_packed", "dpo_packed"]
    for bf16, fp32 in zip(training["bf16"], training["fp32"]):
        assert len(bf16["step_losses"]) >= COMPARE_STEPS and all(abs(x) < 1e3 for x in bf16["step_losses"])
        for a, b in zip(bf16["step_losses"][:COMPARE_STEPS], fp32["step_losses"][:COMPARE_STEPS]):
            assert abs(a - b) <= LOSS_RTOL * max(1, abs(b))
        assert bf16["tokens_per_s"] > 0 and 0 < bf16["fraction_of_peak_matmul"] < 1 and bf16["peak_rss_mib"] > 0
    assert training["bf16"][1]["step_losses"][0] == pytest.approx(0.6931, abs=1e-3)  # DPO's first step: ln 2

    loop = steps["loop"]
    assert {"sft", "eval_sft", "explore_iter1", "pairs_iter1", "dpo_iter1", "eval_iter1"} <= set(loop["stages"])
    assert loop["stages"]["sft"]["train_tokens"] > 0 and loop["stages"]["eval_iter1"]["num_tasks"] == 4
    assert loop["summary"]["total_seconds"] > 0

    log = (out / "gpu_check.log").read_text()
    assert "serving: ok" in log and "OK:" in log
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/serving.log" in names and "loop-run-logs/sft.log" in names


# -- imports: the bundle + the lent machine's packages cover the check's code paths -----------------------------------

# The modules the check runs (python -m ..., and what the pipeline's stages run for the loop on the key room), and
# the key room's own modules (imported by the task config).
ENTRY_MODULES = [
    "scripts.gpu_check", "scripts.gpu_bundle", "bench.roofline", "bench.bench_serving", "bench.bench_train",
    "fastchat.model.tiny", "fastchat.serve.controller", "fastchat.serve.model_worker",
    "fastchat.serve.openai_api_server", "fastchat.train.train", "fastchat.train.train_dpo", "scripts.eto_pipeline",
    "eval_agent.main", "scripts.construct_preference", "keyroom_env", "keyroom_tasks", "keyroom_agent",
    "build_keyroom_sft",
]
INTERNAL = ("fastchat", "eval_agent", "scripts", "bench", "webshop", "keyroom_env", "keyroom_tasks", "keyroom_agent",
            "build_keyroom_sft")
SOURCE_ROOTS = (REPO, REPO / "envs", REPO / "tests" / "newtask")
# imported on these code paths only behind a flag or setting the check does not use (each checked to be there)
NOT_ON_THE_CHECKS_PATH = {
    "wandb": "scripts.pipeline.tracking: only with --report_to wandb",
}


def module_file(name: str) -> Path | None:
    parts = name.split(".")
    for root in SOURCE_ROOTS:
        base = root.joinpath(*parts)
        if (base / "__init__.py").is_file():
            return base / "__init__.py"
        if base.with_suffix(".py").is_file():
            return base.with_suffix(".py")
    return None


def external_imports(entries: list[str]) -> dict[str, set[str]]:
    """Top-level names of every non-internal import (module level or inside functions) in the entry modules and
    every internal module they import, transitively: name -> the modules importing it."""
    seen: set[str] = set()
    found: dict[str, set[str]] = {}
    todo = list(entries)
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = module_file(mod)
        assert path is not None, f"{mod}: no source file"
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                    head = f"{base}.{node.module}" if node.module else base
                else:
                    head = node.module
                names = [head] + [f"{head}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in INTERNAL:
                    parts = name.split(".")
                    todo += [m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if module_file(m)]
                elif top != "__future__" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(mod)
    return found


def registered_modules() -> list[str]:
    """The modules the pipeline's registries import by name (pair rules, methods, serving backends)."""
    from scripts.pairs.rule import PAIR_RULES
    from scripts.pipeline.backends import SERVING_BACKENDS
    from scripts.pipeline.methods import METHODS

    return [m for registry in (PAIR_RULES, METHODS, SERVING_BACKENDS) for m in registry._builtin()]


def test_every_import_of_the_check_is_in_the_bundle_or_on_the_lent_machine():
    there = gpu_bundle.machine_packages() | {normalize(n) for n in gpu_bundle.BUNDLE}
    dists = importlib.metadata.packages_distributions()
    imports = external_imports(ENTRY_MODULES + registered_modules())
    assert {"torch", "transformers", "fastapi", "uvicorn", "pydantic", "requests"} <= set(imports)  # the walk works
    missing = []
    for top, importers in sorted(imports.items()):
        if top in NOT_ON_THE_CHECKS_PATH:
            continue
        names = {normalize(d) for d in dists.get(top, [])}
        assert names, f"import {top} (in {sorted(importers)}) is not installed here: cannot tell its distribution"
        if not names & there:
            missing.append(f"{top} ({', '.join(sorted(names))}; imported by {', '.join(sorted(importers))})")
    assert not missing, "imports neither in scripts/gpu_bundle.py BUNDLE nor on the lent machine: " + "; ".join(missing)


def test_the_bundle_brings_what_its_packages_require():
    """Each bundled package's requirements (at the lock's versions, installed here; markers for py3.12 on Linux)
    are in the bundle or on the lent machine; every bundled package is pinned in requirements.lock."""
    from packaging.requirements import Requirement

    there = gpu_bundle.machine_packages() | {normalize(n) for n in gpu_bundle.BUNDLE}
    lock = read_lock()
    for name in gpu_bundle.BUNDLE:
        assert normalize(name) in lock, f"{name} is not pinned in requirements.lock"
        assert importlib.metadata.version(name) == lock[normalize(name)]
        for line in importlib.metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(gpu_bundle.MARKER_ENV):
                assert normalize(req.name) in there, f"{name} requires {req.name}: add it to BUNDLE"
    assert not {normalize(n) for n in gpu_bundle.BUNDLE} & gpu_bundle.machine_packages()


def test_machine_package_list_is_the_images():
    names = gpu_bundle.machine_packages()
    assert {"torch", "transformers", "accelerate", "peft", "tensorboard", "requests", "httpx"} <= names
    assert not names & {"fastapi", "uvicorn", "pydantic", "deepspeed", "flask", "bm25s"}
    assert len(names) > 150


# -- the size limit, on a fake tree ----------------------------------------------------------------------------------

def test_size_check_counts_what_travels_and_fails_over_the_limit(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / ".gitignore").write_text("ignored/\nbundle/\n")
    (repo / "tracked.txt").write_bytes(b"x" * 1000)
    subprocess.run(["git", "add", "."], cwd=repo, check=True)
    (repo / "untracked.txt").write_bytes(b"y" * 500)  # untracked, not ignored: travels
    (repo / "ignored").mkdir()
    (repo / "ignored" / "big.bin").write_bytes(b"z" * 10_000)  # ignored and not carried: stays
    bundle = repo / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    (bundle / "wheels" / "a.whl").write_bytes(b"w" * 3000)

    tree = 1000 + 500 + len("ignored/\nbundle/\n")  # tracked.txt, untracked.txt, .gitignore
    sizes = gpu_bundle.check_fits(repo, [bundle], limit=5000)
    assert sizes["tree_bytes"] == tree and sizes["carried_bytes"] == {str(bundle): 3000}
    assert sizes["total_bytes"] == tree + 3000
    with pytest.raises(gpu_bundle.BundleError, match=r"too big to travel: working tree .* MiB \+ .*bundle"):
        gpu_bundle.check_fits(repo, [bundle], limit=4000)


def test_bundle_size_check_without_a_bundle_says_so(tmp_path, capsys):
    assert gpu_bundle.main(["--check-size", "--out", str(tmp_path / "none")]) == 1
    assert "no bundle there" in capsys.readouterr().err


def test_wheel_tags_that_install_on_the_lent_machine():
    from packaging.tags import Tag

    assert gpu_bundle.runs_there({Tag("py3", "none", "any")})
    assert gpu_bundle.runs_there({Tag("cp312", "cp312", "manylinux_2_17_x86_64")})
    assert gpu_bundle.runs_there({Tag("cp38", "abi3", "manylinux2014_x86_64")})
    assert not gpu_bundle.runs_there({Tag("cp311", "cp311", "manylinux_2_17_x86_64")})
    assert not gpu_bundle.runs_there({Tag("cp312", "cp312", "manylinux_2_17_aarch64")})
    assert not gpu_bundle.runs_there({Tag("cp312", "cp312", "win_amd64")})


# -- bad input -------------------------------------------------------------------------------------------------------

def test_bad_input_gets_a_clear_error(tmp_path):
    script = str(REPO / "scripts" / "gpu_check.sh")
    r = subprocess.run(["bash", script, "--small"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage: bash scripts/gpu_check.sh --small OUT_DIR" in r.stderr
    cpu_only = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "scripts.gpu_check", str(tmp_path / "o")], capture_output=True,
                       text=True, cwd=REPO, env=cpu_only)
    assert r.returncode == 2 and "--device cuda but no CUDA GPU is visible" in r.stderr
    r = subprocess.run([sys.executable, "-m", "scripts.gpu_check", str(tmp_path / "o"), "--device", "cpu",
                        "--model-config", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and f"no config.json in {tmp_path}" in r.stderr
    r = subprocess.run([sys.executable, "-m", "scripts.gpu_check", str(tmp_path / "o"), "--train-samples", "0"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "--train-samples must be at least 1" in r.stderr
