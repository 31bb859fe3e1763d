"""Two run_eto.sh runs started at the same moment on one machine, into two run folders: every server binds a free
port itself (--port 0) and reports it through its port file, so neither can take a port the other chose."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.test_pipeline import pipeline_cmd


@pytest.mark.slow
def test_two_runs_started_together_both_finish(tiny_model_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {name: tmp_path / name for name in ("first", "second")}
    logs = {name: open(tmp_path / f"{name}.out", "w") for name in runs}  # files, not pipes: neither run can block
    procs = {name: subprocess.Popen(pipeline_cmd("alfworld", "demo-tiny", tiny_model_dir, save), stdout=logs[name],
                                    stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
             for name, save in runs.items()}
    for name, proc in procs.items():
        proc.wait(timeout=1500)
        logs[name].close()
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}:\n{(tmp_path / f'{name}.out').read_text()[-3000:]}"
        summary = json.loads((runs[name] / "demo-tiny" / "summary.json").read_text())
        assert [r["stage"] for r in summary["results"]] == ["eval_base", "eval_sft", "explore_iter1", "eval_iter1"]
