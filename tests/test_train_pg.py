"""The policy-gradient trainer (GRPO and PPO): agent-token masks and advantages, the clipped objective and the KL
estimator on hand values, one update moving log-probs with the advantage's sign, PPO's GAE and value head, resume."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastchat.conversation import TEMPLATES
from fastchat.train import train_pg
from fastchat.train.data import IGNORE_INDEX, DataError
from fastchat.train.packing import PACKED_ATTENTION
from fastchat.train.train_pg import (
    VALUE_HEAD_FILE,
    PGCollator,
    PGTrainingArguments,
    agent_positions,
    clipped_surrogate,
    encode_rl,
    k3_kl,
    load_rl_records,
    main,
    ppo_advantages,
    token_stats,
)
from tests.conftest import free_port

CHATML = TEMPLATES["chatml"]
ZERO3 = Path(train_pg.__file__).parent / "configs" / "zero3.json"
DEEPSPEED_ON_CPU = Path(__file__).resolve().parent / "deepspeed_on_cpu.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model trains as fast on one thread, and the machine is shared
PG_KEYS = {"loss", "pg_loss", "kl", "entropy", "clip_fraction", "tokens", "mean_advantage"}


def turn(who, text):
    return {"from": who, "value": text}


def episode(task_id, sample, actions, advantages, returns=None, reward=0.0):
    conv = [turn("human", "Solve the household task."), turn("gpt", "OK"),
            turn("human", f"Your task is to: find the {task_id}.")]
    for i, action in enumerate(actions):
        conv += [turn("gpt", action), turn("human", f"Observation: you see shelf {i + 1}.")]
    return {"id": task_id, "sample": sample, "group": task_id, "reward": reward, "policy_version": 0,
            "conversations": conv, "advantages": advantages,
            "returns": returns if returns is not None else [reward] * len(actions)}


def grpo_pair() -> list[dict]:
    """Two samples of one task: the first rewarded (advantage +1), the second not (-1)."""
    return [episode("mug", 0, ["Thought: look on the table.\nAction: go to table 1"], [1.0], reward=1.0),
            episode("mug", 1, ["Thought: hmm.\nAction: inventory"], [-1.0], reward=0.0)]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def sequence_logps(model_dir, tokenizer, records) -> list[float]:
    """Summed log-prob of each record's agent tokens under the model in `model_dir`."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation=PACKED_ATTENTION).eval()
    dataset, _ = encode_rl(records, tokenizer, CHATML, 256)
    with torch.no_grad():
        stats = token_stats(model, PGCollator(tokenizer.pad_token_id, packed=True)(dataset))
    return stats.logps.new_zeros(stats.sequences).index_add(0, stats.seq_index, stats.logps).tolist()


def run_pg(model_dir, tmp_path, records, *extra, name="out"):
    """main() in-process (saves a Python start-up); returns the output folder and its pg_log.json."""
    data = tmp_path / f"{name}.json"
    data.write_text(json.dumps(records))
    out = tmp_path / name
    main(["--model_name_or_path", str(model_dir), "--data_path", str(data), "--output_dir", str(out),
          "--model_max_length", "256", "--disable_tqdm", "true", "--report_to", "none", *extra])
    return out, json.loads((out / "pg_log.json").read_text())


def test_agent_tokens_carry_their_turns_advantage(tokenizer):
    """Exactly the agent's turns after the prompt are trained (not the prompt's "OK", not observations), and each
    token gets the advantage of its own turn."""
    first, second = "Thought: look on the table.\nAction: go to table 1", "Thought: there it is.\nAction: take mug 1"
    record = episode("mug", 0, [first, second], [1.0, -2.0])
    (item,), skipped = encode_rl([record], tokenizer, CHATML, 512)
    assert not skipped
    ids, labels, advantages = item["input_ids"], item["labels"], item["advantages"]
    trained = [k for k, label in enumerate(labels) if label != IGNORE_INDEX]
    assert [k for k, a in enumerate(advantages) if a != 0.0] == trained  # the mask and the advantages agree
    by_advantage = {a: tokenizer.decode([ids[k] for k in trained if advantages[k] == a]) for a in (1.0, -2.0)}
    assert by_advantage == {1.0: first + "<|im_end|>", -2.0: second + "<|im_end|>"}
    assert [t for t in item["turns"] if t >= 0] == [0] * advantages.count(1.0) + [1] * advantages.count(-2.0)
    assert "Observation: you see shelf 2." not in tokenizer.decode(ids)  # the trailing observation is dropped
    # the batch's per-token arrays follow the order the model's log-probs come in
    batch = PGCollator(tokenizer.pad_token_id, packed=True)([item])
    assert batch["advantages"].tolist() == [advantages[k] for k in agent_positions(labels)]
    assert batch["value_index"].tolist() == [0, advantages.count(1.0)]  # each turn's first agent token


def test_context_turns_sit_in_the_prompt_and_are_not_trained(tokenizer, tmp_path):
    """The in-context example the rollouts saw goes between "OK" and the task, as eval_agent's prompt has it; its
    answer is not trained and the agent's tokens and advantages are those of the record without it."""
    record = episode("mug", 0, ["Thought: look on the table.\nAction: go to table 1"], [1.0])
    example = [turn("human", "Your task is to: find the key."), turn("gpt", "Thought: on the desk.\nAction: go")]
    (plain,), _ = encode_rl([record], tokenizer, CHATML, 512)
    (shown,), _ = encode_rl([{**record, "context": example}], tokenizer, CHATML, 512)
    text = tokenizer.decode(shown["input_ids"])
    assert text.index("Solve the household task.") < text.index("find the key") < text.index("find the mug")
    trained = [[ids[k] for k in range(len(ids)) if labels[k] != IGNORE_INDEX]
               for ids, labels in ((plain["input_ids"], plain["labels"]), (shown["input_ids"], shown["labels"]))]
    assert trained[0] == trained[1] and trained[0]
    assert [a for a in shown["advantages"] if a] == [a for a in plain["advantages"] if a]
    path = tmp_path / "rl.json"
    path.write_text(json.dumps([{**record, "context": example[::-1]}]))  # gpt first
    with pytest.raises(DataError, match=r"rl\.json: record 0 \(id='mug'\): field 'context'"):
        load_rl_records(path)


def test_log_probs_are_of_the_sampling_temperature(tiny_model_dir, tokenizer, tmp_path):
    """token_stats at temperature T gives log softmax(logits / T) at each agent token: the distribution the
    rollouts were drawn from."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation=PACKED_ATTENTION).eval()
    dataset, _ = encode_rl(grpo_pair()[:1], tokenizer, CHATML, 256)
    batch = PGCollator(tokenizer.pad_token_id, packed=False)(dataset)
    with torch.no_grad():
        tempered = token_stats(model, batch, temperature=0.7).logps
        plain = token_stats(model, batch).logps
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0, :-1]
    targets = batch["labels"][0, 1:]
    where = targets != IGNORE_INDEX
    expected = torch.log_softmax(logits[where] / 0.7, -1).gather(-1, targets[where, None]).squeeze(-1)
    assert tempered.tolist() == pytest.approx(expected.tolist(), abs=1e-4)
    assert not torch.allclose(tempered, plain, atol=1e-3)
    with pytest.raises(ValueError, match="--rollout_temperature"):
        PGTrainingArguments(output_dir=str(tmp_path), kl_coef=0, rollout_temperature=0)


def test_clipped_objective_has_no_gradient_beyond_the_clip():
    """eps = 0.2. Ratios 1.5 (A = +1) and 0.5 (A = -1) lie beyond the clip on the side the advantage pushes to:
    loss -1.2 A and -0.8 A, constant, no gradient. Ratio 0.5 with A = +1 and 1.5 with A = -1 are on the unclipped
    side: loss -r A, gradient d(-r A)/d logp = -r A."""
    ratios = torch.tensor([1.5, 0.5, 0.5, 1.5, 1.1])
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    old = torch.zeros(5)
    logps = ratios.log().requires_grad_(True)
    loss, clipped = clipped_surrogate(logps, old, advantages, 0.2)
    loss.sum().backward()
    assert loss.tolist() == pytest.approx([-1.2, 0.8, -0.5, 1.5, -2.2])
    assert logps.grad.tolist() == pytest.approx([0.0, 0.0, -0.5, 1.5, -2.2])
    assert clipped.tolist() == [True, True, True, True, False]  # clip_fraction counts ratios outside [0.8, 1.2]


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    logps = torch.log(torch.tensor([0.5, 0.5, 0.25]))
    ref = torch.log(torch.tensor([0.5, 0.25, 0.5]))
    kl = k3_kl(logps, ref)
    # d = log(ref / p): exp(d) - d - 1
    assert kl.tolist() == pytest.approx([0.0, 0.5 + math.log(2) - 1, 2 - math.log(2) - 1])
    assert kl[0] == 0 and (kl[1:] > 0).all()


def test_padded_and_packed_batches_give_the_same_log_probs(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation=PACKED_ATTENTION).eval()
    dataset, _ = encode_rl(grpo_pair(), tokenizer, CHATML, 256)
    with torch.no_grad():
        packed = token_stats(model, PGCollator(tokenizer.pad_token_id, packed=True)(dataset))
        padded = token_stats(model, PGCollator(tokenizer.pad_token_id, packed=False)(dataset))
    assert packed.logps.tolist() == pytest.approx(padded.logps.tolist(), abs=1e-5)
    assert packed.seq_index.tolist() == padded.seq_index.tolist()
    assert (packed.entropy > 0).all()


def test_bad_rl_data_and_flags_are_refused(tmp_path):
    path = tmp_path / "rl.json"
    bad = episode("mug", 0, ["Action: look", "Action: take mug 1"], [1.0])  # one advantage for two gpt turns
    path.write_text(json.dumps([bad]))
    with pytest.raises(DataError, match=r"rl\.json: record 0 \(id='mug'\): field 'advantages'.*\(2\)"):
        load_rl_records(path)
    bad = episode("mug", 0, ["Action: look"], [1.0])
    del bad["returns"]
    path.write_text(json.dumps([bad]))
    assert load_rl_records(path)  # GRPO needs no returns
    with pytest.raises(DataError, match="field 'returns'"):
        load_rl_records(path, need_returns=True)
    with pytest.raises(ValueError, match="--ref_model_name_or_path"):
        PGTrainingArguments(output_dir=str(tmp_path), kl_coef=0.1)
    with pytest.raises(ValueError, match="--ppo_epochs"):
        PGTrainingArguments(output_dir=str(tmp_path), kl_coef=0, num_train_epochs=3)


def test_grpo_step_moves_log_probs_with_the_advantage(tiny_model_dir, tokenizer, tmp_path):
    """One optimizer step on a positive- and a negative-advantage episode raises the first's log-prob and lowers
    the second's; with learning rate 0 nothing moves. The reference is the starting model: KL 0 at the first step.
    (The command line, `python -m fastchat.train.train_pg`, runs in test_ppo_on_two_ranks_matches_one_rank.)"""
    records = grpo_pair()
    before = sequence_logps(tiny_model_dir, tokenizer, records)
    common = ["--ref_model_name_or_path", str(tiny_model_dir), "--kl_coef", "0.1", "--per_device_train_batch_size",
              "2", "--max_steps", "1"]
    out, (entry,) = run_pg(tiny_model_dir, tmp_path, records, "--learning_rate", "1e-3", *common, name="lr")
    up, down = (a - b for a, b in zip(sequence_logps(out, tokenizer, records), before))
    assert up > 1e-3 and down < -1e-3, (up, down)
    assert PG_KEYS <= set(entry) and "value_loss" not in entry
    assert entry["kl"] == pytest.approx(0.0, abs=1e-9)
    assert entry["clip_fraction"] == 0.0  # the first step's ratio is exactly 1: old log-probs are the start's
    assert entry["mean_advantage"] != 0.0 and entry["tokens"] == sum(
        len(agent_positions(x["labels"])) for x in encode_rl(records, tokenizer, CHATML, 256)[0])
    assert entry["loss"] == pytest.approx(-entry["mean_advantage"], abs=1e-5)  # ratio 1, KL 0: the mean of -A
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["algorithm"] == "grpo" and summary["episodes"] == 2 and summary["optimizer_steps"] == 1
    assert (out / "eto_template.txt").read_text().strip() == "chatml"

    frozen, log = run_pg(tiny_model_dir, tmp_path, records, "--learning_rate", "0", *common, name="lr0")
    assert sequence_logps(frozen, tokenizer, records) == pytest.approx(before, abs=1e-5)
    assert log[0]["loss"] == pytest.approx(entry["loss"], abs=1e-6)


def test_an_update_goes_on_with_the_previous_updates_optimizer(tiny_model_dir, tmp_path):
    """Each update writes its optimizer; the next, given it, continues Adam's step counts and moments (one optimizer
    over an online RL run) instead of starting fresh, which moves the weights differently."""
    common = ["--kl_coef", "0", "--per_device_train_batch_size", "2", "--max_steps", "1", "--learning_rate", "1e-3"]
    first, _ = run_pg(tiny_model_dir, tmp_path, grpo_pair(), *common, name="first")
    state = torch.load(first / "optimizer_state.pt", weights_only=True)["state"]
    assert state and {int(v["step"]) for v in state.values()} == {1}
    records = grpo_pair()[::-1]
    carried, _ = run_pg(first, tmp_path, records, *common, "--optimizer_state_from", str(first), name="carried")
    fresh, _ = run_pg(first, tmp_path, records, *common, name="fresh")
    steps = {name: {int(v["step"]) for v in torch.load(out / "optimizer_state.pt", weights_only=True)["state"].values()}
             for name, out in (("carried", carried), ("fresh", fresh))}
    assert steps == {"carried": {2}, "fresh": {1}}
    weights = [safetensors.torch.load_file(str(out / "model.safetensors")) for out in (carried, fresh)]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    with pytest.raises(SystemExit, match="no optimizer_state.pt"):
        run_pg(first, tmp_path, records, *common, "--optimizer_state_from", str(tmp_path), name="missing")


def test_kl_to_a_different_reference_is_positive(tiny_model_dir, tokenizer, tmp_path):
    ref_dir = tmp_path / "ref"
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.save_pretrained(ref_dir)
    _, log = run_pg(tiny_model_dir, tmp_path, grpo_pair(), "--ref_model_name_or_path", str(ref_dir), "--kl_coef",
                    "0.5", "--learning_rate", "0", "--per_device_train_batch_size", "2", "--max_steps", "1",
                    "--loss_aggregation", "sequence_mean")
    (entry,) = log
    assert entry["kl"] > 1e-3
    # sequence_mean: each episode's token mean of -A + 0.5 KL, then their mean; the pg part alone is -(1 - 1) / 2
    assert entry["pg_loss"] == pytest.approx(0.0, abs=1e-6)
    assert entry["loss"] > 0.0


def ppo_records() -> list[dict]:
    """A two-step success (reward 1 at its last step) and a one-step failure; gamma 1: returns [1, 1] and [0]."""
    return [episode("key", 0, ["Thought: open it.\nAction: open drawer 1", "Thought: got it.\nAction: take key 1"],
                    [0.0, 0.0], returns=[1.0, 1.0], reward=1.0),
            episode("key", 1, ["Thought: hmm.\nAction: look"], [0.0], returns=[0.0], reward=0.0)]


def test_ppo_gae_advantages_from_returns_and_values(tokenizer):
    """Rewards r_t = G_t - gamma G_{t+1}: [0, 1] and [0]. With values [0.5, 0.2] and [0.1], gamma 1, lambda 0.5:
    delta = [0 + 0.2 - 0.5, 1 + 0 - 0.2] = [-0.3, 0.8], A = [-0.3 + 0.5 * 0.8, 0.8] = [0.1, 0.8], targets A + V =
    [0.6, 1.0]; the failure: A = 0 - 0.1 = -0.1, target 0. Then whitened over the agent tokens."""
    dataset, _ = encode_rl(ppo_records(), tokenizer, CHATML, 512)
    dataset[0]["old_values"], dataset[1]["old_values"] = [0.5, 0.2], [0.1]
    stats = ppo_advantages(dataset, gamma=1.0, lam=0.5)
    assert dataset[0]["turn_advantages"] == pytest.approx([0.1, 0.8])
    assert dataset[0]["value_targets"] == pytest.approx([0.6, 1.0])
    assert dataset[1]["turn_advantages"] == pytest.approx([-0.1]) and dataset[1]["value_targets"] == pytest.approx([0])
    per_turn = [(x["turns"].count(t), a) for x in dataset for t, a in enumerate(x["turn_advantages"])]
    n = sum(c for c, _ in per_turn)
    mean = sum(c * a for c, a in per_turn) / n
    std = math.sqrt(sum(c * (a - mean) ** 2 for c, a in per_turn) / n)
    assert (stats["mean"], stats["std"]) == pytest.approx((mean, std))
    for x in dataset:
        assert [a for a, t in zip(x["advantages"], x["turns"]) if t >= 0] == pytest.approx(
            [(x["turn_advantages"][t] - mean) / std for t in x["turns"] if t >= 0], abs=1e-6)
    # an episode cut before its second turn bootstraps from that turn's return: A_0 = r_0 + gamma G_1 - V_0
    first_of_second = agent_positions(dataset[0]["labels"])[dataset[0]["turn_starts"][1]]
    (cut,), _ = encode_rl(ppo_records()[:1], tokenizer, CHATML, first_of_second)
    assert len(cut["turn_starts"]) == 1
    cut["old_values"] = [0.25]
    ppo_advantages([cut], gamma=1.0, lam=0.5)
    assert cut["turn_advantages"] == pytest.approx([0 + 1.0 - 0.25])


def test_ppo_value_head_learns_the_returns(tiny_model_dir, tokenizer, tmp_path):
    """Eight steps on the same batch (both episodes, 8 passes): the value loss falls; the value head is saved beside
    a plain causal-LM folder and the next update starts from it."""
    records = ppo_records()
    out, log = run_pg(tiny_model_dir, tmp_path, records, "--algorithm", "ppo", "--kl_coef", "0", "--ppo_epochs", "8",
                      "--per_device_train_batch_size", "2", "--learning_rate", "2e-3", "--value_clip_range", "10",
                      "--vf_coef", "1.0", "--gae_lambda", "0.5")
    assert len(log) == 8  # one entry per optimizer step
    losses = [e["value_loss"] for e in log]
    assert losses[-1] < 0.5 * losses[0], losses
    # zero-initialised head: V = 0, so the first value loss is 0.5 x the mean over turns of the squared targets
    # (GAE with V = 0, lambda 0.5: [0 + 0.5 * 1, 1] and [0])
    assert losses[0] == pytest.approx(0.5 * (0.5 ** 2 + 1 + 0) / 3, abs=1e-5)
    assert log[0]["mean_advantage"] == pytest.approx(0.0, abs=1e-6)  # whitened over this very batch
    assert (out / VALUE_HEAD_FILE).is_file()
    head = safetensors.torch.load_file(out / VALUE_HEAD_FILE)
    assert set(head) == {"weight", "bias"} and head["weight"].abs().sum() > 0
    weights = safetensors.torch.load_file(out / "model.safetensors")
    assert not any("value_head" in k for k in weights)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["value_head_init"] == "zeros"
    # the mean GAE advantage before whitening: 0.5 on the success's first turn, 1 on its second, 0 on the failure
    success = encode_rl(records, tokenizer, CHATML, 256)[0][0]["turns"]
    agent_tokens = sum(len(agent_positions(x["labels"])) for x in encode_rl(records, tokenizer, CHATML, 256)[0])
    assert summary["gae_advantages"]["mean"] == pytest.approx(
        (0.5 * success.count(0) + 1.0 * success.count(1)) / agent_tokens, abs=1e-6)

    nxt, log2 = run_pg(out, tmp_path, records, "--algorithm", "ppo", "--kl_coef", "0", "--max_steps", "1",
                       "--per_device_train_batch_size", "2", "--learning_rate", "0", name="next")
    assert json.loads((nxt / "train_summary.json").read_text())["value_head_init"] == str(out / VALUE_HEAD_FILE)
    assert log2[0]["value_loss"] < losses[0]  # the critic carried over


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_ppo_resume_matches_an_uninterrupted_run(tiny_model_dir, tmp_path, lora):
    """A run stopped after its step-2 checkpoint and started again ends where an uninterrupted run does: policy,
    value head (restored from the checkpoint; with LoRA a checkpoint holds only the adapter besides it) and the
    log of every step."""
    records = ppo_records()
    flags = ["--algorithm", "ppo", "--kl_coef", "0", "--ppo_epochs", "4", "--per_device_train_batch_size", "1",
             "--gradient_accumulation_steps", "2", "--learning_rate", "2e-3", "--save_strategy", "steps",
             "--save_steps", "2", "--keep_checkpoints", "true", "--lr_scheduler_type", "constant",
             *(["--lora", "--lora_r", "4"] if lora else [])]
    full, full_log = run_pg(tiny_model_dir, tmp_path, records, *flags, name="full")
    assert (full / "checkpoint-2" / VALUE_HEAD_FILE).is_file()
    interrupted = tmp_path / "resumed"
    shutil.copytree(full / "checkpoint-2", interrupted / "checkpoint-2")
    # as a run killed during step 3 leaves it
    (interrupted / "pg_log.json").write_text(json.dumps(full_log[:2] + [{"stale": True}]))
    resumed, resumed_log = run_pg(tiny_model_dir, tmp_path, records, *flags, name="resumed")
    assert len(resumed_log) == 4 and "stale" not in resumed_log[2]
    for a, b in zip(full_log, resumed_log):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and b["value_loss"] == pytest.approx(a["value_loss"],
                                                                                                    abs=1e-5)
    for name in ("model.safetensors", VALUE_HEAD_FILE):
        a, b = safetensors.torch.load_file(full / name), safetensors.torch.load_file(resumed / name)
        assert set(a) == set(b)
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_ppo_on_two_ranks_matches_one_rank(tiny_model_dir, tmp_path):
    """torchrun --nproc_per_node 2 (gloo), DDP and DeepSpeed ZeRO-3 (on CPU, as test_train_configs.py runs it): each
    rank one episode per step, against one rank accumulating both. The same step entries (the log sums every rank's
    tokens), with padded batches and sequence_mean; ZeRO-3 shards the weights and the value head: the old, reference
    and value precomputation gathers them, the head runs outside the model's forward, checkpoints and the final
    save gather it again."""
    data = tmp_path / "rl.json"
    data.write_text(json.dumps(ppo_records()))
    logs, heads = {}, {}
    for name, ranks in (("one", 1), ("ddp", 2), ("zero3", 2)):
        out = tmp_path / name
        launch = ["-m", "fastchat.train.train_pg"]
        if name == "zero3":
            launch = [str(DEEPSPEED_ON_CPU), "fastchat.train.train_pg", "--deepspeed", str(ZERO3), "--save_strategy",
                      "steps", "--save_steps", "2", "--keep_checkpoints"]
        cmd = ["torchrun", f"--nproc_per_node={ranks}", f"--master_port={free_port()}", *launch,
               "--model_name_or_path", str(tiny_model_dir), "--data_path", str(data), "--output_dir", str(out),
               "--ref_model_name_or_path", str(tiny_model_dir), "--algorithm", "ppo", "--ppo_epochs", "3",
               "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", str(3 - ranks),
               "--learning_rate", "2e-3", "--loss_aggregation", "sequence_mean", "--no_padding_free",
               "--model_max_length", "256", "--report_to", "none", "--seed", "0"]
        # the first DeepSpeed run on a machine compiles its CPU collective op (~2 min on 2 cores, then cached)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs[name] = json.loads((out / "pg_log.json").read_text())
        heads[name] = safetensors.torch.load_file(out / VALUE_HEAD_FILE)
    assert len(logs["one"]) == len(logs["ddp"]) == len(logs["zero3"]) == 3
    for name in ("ddp", "zero3"):
        for one, two in zip(logs["one"], logs[name]):
            assert one["tokens"] == two["tokens"]
            for key in ("loss", "pg_loss", "kl", "value_loss", "clip_fraction", "entropy"):
                assert two[key] == pytest.approx(one[key], abs=1e-4), (name, key)
        for k, v in heads["one"].items():
            torch.testing.assert_close(heads[name][k], v, atol=1e-5, rtol=1e-4)
    assert (tmp_path / "zero3" / "config.json").is_file()
    assert (tmp_path / "zero3" / "checkpoint-2" / VALUE_HEAD_FILE).is_file()
