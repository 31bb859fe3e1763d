"""Multi-turn DPO: the trainer's loss against a plain per-token formula, precomputed references, a CLI run."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastchat.conversation import TEMPLATES, render
from fastchat.train.data import DPOCollator, encode_dpo
from fastchat.train.packing import PACKED_ATTENTION
from fastchat.train.train_dpo import DPOTrainer, DPOTrainingArguments, precompute_reference_logps

BETA = 0.3


def turn(who, text):
    return {"from": who, "value": text}


def make_pairs(n: int) -> list[dict]:
    pairs = []
    for i in range(n):
        obj = ["mug", "apple", "key", "book"][i % 4]
        prompt = [turn("human", "Solve the household task."), turn("gpt", "OK"),
                  turn("human", f"Your task is to: find the {obj}.")]
        chosen = [turn("gpt", f"Thought: look on table {i % 3 + 1}.\nAction: go to table {i % 3 + 1}"),
                  turn("human", f"Observation: you see a {obj} 1."),
                  turn("gpt", f"Thought: there it is.\nAction: take {obj} 1")]
        rejected = [turn("gpt", "Thought: hmm.\nAction: go to sofa 1"), turn("human", "Observation: nothing."),
                    turn("gpt", "Thought: hmm.\nAction: inventory"), turn("human", "Observation: empty."),
                    turn("gpt", "Thought: lost.\nAction: look")]
        pairs.append({"id": f"p{i}", "prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def reference_turn_logps(model, tokenizer, template, messages, first: int) -> float:
    """Sum over assistant turns from message `first` of log p(turn tokens | rendered conversation before it),
    token by token with an explicit log-softmax; turn tokens come from tokenizing growing prefixes."""
    total = 0.0
    for i in range(first, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        before = tokenizer(render(template, messages[:i], add_generation_prompt=True).text)["input_ids"]
        upto = tokenizer(render(template, messages[: i + 1]).text)["input_ids"]
        assert upto[: len(before)] == before
        with torch.no_grad():
            logits = model(torch.tensor([upto])).logits[0].double()
        for t in range(len(before), len(upto)):
            row = logits[t - 1]
            total += (row[upto[t]] - torch.logsumexp(row, dim=0)).item()
    return total


def plain_dpo_loss(policy, ref, tokenizer, template, pairs) -> float:
    losses = []
    for p in pairs:
        prompt = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in p["prompt"]]
        logps = {}
        for name, model in (("policy", policy), ("ref", ref)):
            for side in ("chosen", "rejected"):
                msgs = prompt + [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                                 for t in p[side]]
                logps[name, side] = reference_turn_logps(model, tokenizer, template, msgs, len(prompt))
        z = BETA * ((logps["policy", "chosen"] - logps["ref", "chosen"])
                    - (logps["policy", "rejected"] - logps["ref", "rejected"]))
        losses.append(-math.log(1 / (1 + math.exp(-z))))
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # the trainers' attention: per-sequence SDPA on packed rows, transformers' SDPA on anything else
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                  attn_implementation=PACKED_ATTENTION).eval()
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                               attn_implementation=PACKED_ATTENTION).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # a reference different from the policy, so the loss is not trivially log 2
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pairs = make_pairs(3)
    dataset, skipped = encode_dpo(pairs, tokenizer, TEMPLATES["chatml"], max_length=256)
    assert not skipped
    args = DPOTrainingArguments(output_dir=str(tmp_path_factory.mktemp("dpo")), beta=BETA, report_to="none")
    return tokenizer, policy, ref, pairs, dataset, args


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_dpo_loss_matches_plain_formula(setup, packed):
    """Both the padding-free batches with the supervised-only head and the original padded, full-head ones."""
    tokenizer, policy, ref, pairs, dataset, args = setup
    collator = DPOCollator(tokenizer.pad_token_id, packed=packed)
    trainer = DPOTrainer(model=policy, args=args, train_dataset=dataset, data_collator=collator,
                         beta=BETA, ref_model=ref)
    with torch.no_grad():
        loss, metrics = trainer.compute_loss(policy, collator(dataset), return_outputs=True)
    expected = plain_dpo_loss(policy, ref, tokenizer, TEMPLATES["chatml"], pairs)
    assert abs(expected - math.log(2)) > 1e-3  # a non-trivial value
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert metrics["rewards/margins"].shape == (3,)


def test_precomputed_reference_logps_give_the_same_loss(setup):
    tokenizer, policy, ref, pairs, dataset, args = setup
    collator = DPOCollator(tokenizer.pad_token_id, packed=True)
    live = DPOTrainer(model=policy, args=args, train_dataset=dataset, data_collator=collator, beta=BETA,
                      ref_model=ref)
    with torch.no_grad():
        live_loss = live.compute_loss(policy, collator(dataset)).item()
    precomputed = [dict(x) for x in dataset]
    precompute_reference_logps(ref, precomputed, collator, batch_size=2, device=torch.device("cpu"))
    assert all("ref_chosen_logps" in x and "ref_rejected_logps" in x for x in precomputed)
    trainer = DPOTrainer(model=policy, args=args, train_dataset=precomputed, data_collator=collator, beta=BETA)
    assert trainer.ref_model is None  # nothing but the policy in memory
    with torch.no_grad():
        loss = trainer.compute_loss(policy, collator(precomputed)).item()
    assert loss == pytest.approx(live_loss, abs=1e-5)


def _run_dpo(tiny_model_dir, tmp_path, extra):
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(make_pairs(8)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fastchat.train.train_dpo", "--model_name_or_path", str(tiny_model_dir),
           "--data_path", str(data), "--output_dir", str(out), "--num_train_epochs", "3",
           "--per_device_train_batch_size", "4", "--learning_rate", "2e-3", "--beta", "0.1",
           "--logging_steps", "1", "--model_max_length", "128", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny model: one thread is as fast, and robust to a busy machine
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]


@pytest.mark.slow
def test_cli_dpo_run_raises_the_margin(tiny_model_dir, tmp_path):
    out, logs = _run_dpo(tiny_model_dir, tmp_path, ["--precompute_ref_logps"])
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert key in logs[0]
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)  # policy == reference at the start
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 0.1
    assert logs[-1]["loss"] < logs[0]["loss"]
    # a loadable model folder that serving picks the same template for
    assert (out / "eto_template.txt").read_text().strip() == "chatml"
    AutoModelForCausalLM.from_pretrained(out)
    assert json.loads((out / "train_summary.json").read_text())["pairs"] == 8

    # the diagnostics script sees the same effect from outside: chosen up relative to rejected, on most pairs
    diag_path = tmp_path / "diag.json"
    proc = subprocess.run([sys.executable, "scripts/dpo_diagnostics.py", "--pairs", str(tmp_path / "pairs.json"),
                           "--before", str(tiny_model_dir), "--after", str(out), "--model_max_length", "128",
                           "--out", str(diag_path)], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    diag = json.loads(diag_path.read_text())
    assert diag["summary"]["pairs"] == 8 and diag["summary"]["fraction_margin_positive"] >= 0.75
    assert diag["summary"]["mean_change_chosen"] > diag["summary"]["mean_change_rejected"]
    assert [e["step"] for e in diag["trainer_log"]] == [e["step"] for e in logs]


@pytest.mark.slow
def test_lora_dpo_uses_the_adapter_free_policy_as_reference(tiny_model_dir, tmp_path):
    from fastchat.train.train_dpo import main

    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(make_pairs(4)))
    out = tmp_path / "out"
    main(["--model_name_or_path", str(tiny_model_dir), "--data_path", str(data), "--output_dir", str(out),
          "--per_device_train_batch_size", "2", "--max_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-2",
          "--lora", "--lora_r", "4", "--model_max_length", "128", "--disable_tqdm", "true"])
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    # LoRA starts as a no-op, so the first step's policy equals the reference: loss log 2, margin 0
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert (out / "config.json").is_file()  # merged
