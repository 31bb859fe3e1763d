"""SFT from the command line, CPU precision handling, resuming (DeepSpeed and FSDP: test_train_configs.py)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from fastchat.train.common import EtoTrainingArguments

# tiny models train as fast on one thread, and a busy 2-core machine slows multi-threaded torch a lot
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def sft_records(n: int) -> list[dict]:
    objs = ["apple", "mug", "book", "lamp"]
    records = []
    for i in range(n):
        obj = objs[i % 4]
        conv = [{"from": "human", "value": "Solve the household task."}, {"from": "gpt", "value": "OK"},
                {"from": "human", "value": f"Your task is to: find the {obj}."}]
        for k in range(1 + i % 2):
            conv += [{"from": "gpt", "value": f"Thought: look for the {obj}.\nAction: go to table {k + 1}"},
                     {"from": "human", "value": f"Observation: you see a {objs[k]} 1."}]
        conv.append({"from": "gpt", "value": f"Thought: found it.\nAction: take {obj} 1"})
        records.append({"id": f"t{i}", "conversations": conv, "reward": 1.0})
    return records


def run_sft(tmp_path, model_dir, *extra, data=None):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(sft_records(8) if data is None else data))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fastchat.train.train", "--model_name_or_path", str(model_dir),
           "--data_path", str(path), "--output_dir", str(out), "--per_device_train_batch_size", "4",
           "--model_max_length", "96", "--logging_steps", "1", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


@pytest.mark.slow
def test_cli_sft_lowers_training_loss(tiny_model_dir, tmp_path):
    data = sft_records(8) + [{"id": "too-long", "conversations": [
        {"from": "human", "value": "word " * 200}, {"from": "gpt", "value": "late answer"}]}]
    proc, out = run_sft(tmp_path, tiny_model_dir, "--num_train_epochs", "4", "--learning_rate", "3e-3",
                        "--bf16", data=data)
    assert "no CUDA GPU: training in fp32" in proc.stderr
    losses = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(losses) == 8  # 4 epochs x 2 batches: the 8 usable samples, the too-long one is skipped
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2
    skipped = json.loads((out / "skipped_samples.json").read_text())["skipped"]
    assert [s["id"] for s in skipped] == ["too-long"] and "too-long" in proc.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    assert (out / "eto_template.txt").read_text().strip() == "chatml"


def sft_main(tmp_path, model_dir, *extra, data=None):
    """The same entry point in-process (saves a Python start-up)."""
    from fastchat.train.train import main

    path = tmp_path / "sft.json"
    path.write_text(json.dumps(sft_records(4) if data is None else data))
    out = tmp_path / "out"
    main(["--model_name_or_path", str(model_dir), "--data_path", str(path), "--output_dir", str(out),
          "--per_device_train_batch_size", "2", "--model_max_length", "96", "--disable_tqdm", "true", *extra])
    return out


@pytest.mark.slow
def test_sft_lora_saves_merged_model(tiny_model_dir, tmp_path):
    out = sft_main(tmp_path, tiny_model_dir, "--max_steps", "2", "--lora", "--lora_r", "4")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and not (out / "adapter_config.json").exists()
    assert (out / "eto_template.txt").is_file()


@pytest.mark.slow
def test_sft_lora_no_merge_saves_adapter_and_merge_command_works(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from fastchat.train.merge_lora import main as merge_main

    out = sft_main(tmp_path, tiny_model_dir, "--max_steps", "1", "--lora", "--no_merge")
    assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
    merge_main(["--base", str(tiny_model_dir), "--adapter", str(out), "--output_dir", str(tmp_path / "merged")])
    AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "eto_template.txt").read_text().strip() == "chatml"


def test_malformed_data_is_refused_with_file_and_record(tiny_model_dir, tmp_path):
    bad = sft_records(2) + [{"id": "x", "conversations": [{"from": "human", "value": 3}]}]
    with pytest.raises(SystemExit) as e:
        sft_main(tmp_path, tiny_model_dir, data=bad)
    assert "sft.json: record 2 (id='x')" in str(e.value.code)


def test_cpu_forces_fp32(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("GPU machine: bf16 is kept")
    args = EtoTrainingArguments(output_dir=str(tmp_path), bf16=True, warmup_ratio=0.1)
    assert not args.bf16 and not args.fp16 and not args.gradient_checkpointing
    assert args.warmup_steps == 0.1 and args.save_strategy == "no"


def _sft_cmd(model_dir, data, out, *extra):
    return [sys.executable, "-m", "fastchat.train.train", "--model_name_or_path", str(model_dir),
            "--data_path", str(data), "--output_dir", str(out), "--per_device_train_batch_size", "2",
            "--model_max_length", "96", "--logging_steps", "1", "--num_train_epochs", "3",
            "--learning_rate", "3e-3", "--save_strategy", "steps", "--save_steps", "2", *extra]


@pytest.mark.slow
def test_killed_sft_resumes_from_its_last_checkpoint(tiny_model_dir, tmp_path):
    """kill -9 mid-training, rerun: it continues from the last complete checkpoint (optimizer, scheduler, RNG,
    data order) and ends where an uninterrupted run ends; the checkpoints are removed at the end."""
    import signal
    import time

    from safetensors.torch import load_file

    data = tmp_path / "sft.json"
    data.write_text(json.dumps(sft_records(8)))  # 4 steps per epoch, 12 in all
    whole = tmp_path / "whole"
    subprocess.run(_sft_cmd(tiny_model_dir, data, whole), check=True, capture_output=True, timeout=240, env=ENV)

    out = tmp_path / "killed"
    proc = subprocess.Popen(_sft_cmd(tiny_model_dir, data, out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "checkpoint-6" / "trainer_state.json").exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint-6" / "trainer_state.json").exists() and not (out / "model.safetensors").exists()

    rerun = subprocess.run(_sft_cmd(tiny_model_dir, data, out), capture_output=True, text=True, timeout=240, env=ENV)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stderr and "checkpoint-" in rerun.stderr
    logs = lambda d: [(h["step"], round(h["loss"], 4)) for h in
                      json.loads((d / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    resumed_from = int(re.search(r"resuming from \S*checkpoint-(\d+)", rerun.stderr)[1])
    assert resumed_from >= 6  # it did not start over
    # the log carries on from the checkpoint's: each step once, the same losses as the uninterrupted run
    assert [s for s, _ in logs(out)] == list(range(1, 13)) and logs(out) == logs(whole)
    a, b = load_file(whole / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert not list(out.glob("checkpoint-*"))  # removed once the final model is saved
