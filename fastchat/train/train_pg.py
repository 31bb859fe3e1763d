"""Policy-gradient updates on explored episodes: GRPO's clipped objective with a KL penalty, and PPO with a value
head and GAE (docs/rl.md, "The policy-gradient trainer").

    python -m fastchat.train.train_pg \\
        --model_name_or_path outputs/run/update_step1 --ref_model_name_or_path outputs/run/sft \\
        --data_path outputs/run/rl_data_step2.json --output_dir outputs/run/update_step2 \\
        --algorithm grpo --clip_range 0.2 --kl_coef 0.04 --loss_aggregation token_mean --ppo_epochs 1 \\
        --learning_rate 1e-6 --per_device_train_batch_size 4 --gradient_accumulation_steps 4 \\
        --model_max_length 2048 [--bf16] [--gradient_checkpointing] [--lora] [--deepspeed CONFIG]
    PPO: --algorithm ppo [--vf_coef 0.1 --value_clip_range 0.2 --gae_gamma 1.0 --gae_lambda 0.95]

The data is the RL data file of scripts/rl_data.py: one record per episode, its conversation (the prompt turns, then
the episode), the in-context example turns the rollouts saw ("context", placed after the instruction and "OK" as in
eval_agent's prompt; never trained) and one advantage (and return) per gpt turn after the prompt. The agent's tokens
are the ones SFT supervises in those turns (fastchat.train.data.encode_conversation); every token of turn i gets
advantages[i]. Log-probabilities are those of the distribution the episodes were sampled from: logits divided by
--rollout_temperature (verl does the same), so that the update sees the policy that played.

Before the first update the trainer stores, per agent token, its log-probability under the starting weights (the
"old" policy of the ratio: the rollout policy's when --model_name_or_path is the model that played the episodes)
and under --ref_model_name_or_path (the KL reference, the SFT model); no second model stays in memory. Per token:

    ratio = exp(logp - old_logp)
    loss  = -min(ratio * A, clip(ratio, 1 - clip_range, 1 + clip_range) * A) + kl_coef * KL
    KL    = exp(ref_logp - logp) - (ref_logp - logp) - 1        (Schulman's k3 estimator, >= 0)

averaged over the micro-batch's agent tokens (--loss_aggregation token_mean) or per sequence, then over sequences
(sequence_mean); --ppo_epochs passes over the data. PPO replaces A by GAE over the agent's turns from a value head
(Linear(hidden, 1) on the final hidden state before each turn, saved as value_head.safetensors) and adds
vf_coef x the clipped value loss. Same flags and machinery as the SFT and DPO trainers (torchrun, DeepSpeed, LoRA,
padding-free batches, checkpoints and --resume). Writes the model, pg_log.json (one entry per optimizer step) and
train_summary.json to --output_dir.
"""
from __future__ import annotations

import bisect
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import safetensors.torch
import torch
import torch.utils.checkpoint
from transformers import Trainer, TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled

from fastchat.conversation import render
from fastchat.records import (
    PROMPT_TURNS,
    read_json,
    record_where,
    rounds,
    trajectory,
    turns_to_messages,
    write_json_atomic,
)
from fastchat.train import OPTIMIZER_STATE_FILE
from fastchat.train.advantages import gae
from fastchat.train.common import (
    EtoTrainingArguments,
    ModelArguments,
    apply_lora,
    finish_training,
    load_model,
    logger,
    save_trained,
    start_training,
    train_resuming,
    zero3_gathered,
)
from fastchat.train.data import (
    IGNORE_INDEX,
    Collator,
    DataError,
    Skipped,
    SkipSample,
    encode_conversation,
    load_json_list,
    with_offsets,
)
from fastchat.train.packing import CHUNK_ELEMENTS, output_head
from fastchat.train.train_dpo import disable_dropout, free_model

VALUE_HEAD = "value_head"  # the value head's name as a submodule of the policy
VALUE_HEAD_FILE = "value_head.safetensors"
PG_LOG = "pg_log.json"
WHITEN_EPS = 1e-8


@dataclass
class PGTrainingArguments(EtoTrainingArguments):
    algorithm: Literal["grpo", "ppo"] = field(default="grpo", metadata={
        "help": "grpo: the advantages of the data file (GRPO's, or GiGPO's per step); ppo: GAE from a value head "
                "trained beside the policy (the data's returns give the per-turn rewards; its advantages are unused)"})
    ref_model_name_or_path: str | None = field(default=None, metadata={
        "help": "the KL reference (the SFT model); its log-probs are computed once before training. Required when "
                "--kl_coef > 0"})
    clip_range: float = field(default=0.2, metadata={
        "help": "eps of the clipped ratio: the objective stops rewarding a token's ratio beyond [1 - eps, 1 + eps]"})
    kl_coef: float = field(default=0.04, metadata={
        "help": "weight of the per-token k3 KL estimate to the reference in the loss (0: no KL term)"})
    loss_aggregation: Literal["token_mean", "sequence_mean"] = field(default="token_mean", metadata={
        "help": "token_mean: the mean over all agent tokens of the micro-batch; sequence_mean: the mean over each "
                "sequence's agent tokens, then over the sequences (a long episode weighs as much as a short one)"})
    ppo_epochs: int = field(default=1, metadata={
        "help": "passes over the data (the rollout batch); each pass is shuffled and split into optimizer steps of "
                "per_device_train_batch_size x gradient_accumulation_steps x ranks episodes"})
    num_train_epochs: float | None = field(default=None, metadata={
        "help": "not used here: the passes over the data are --ppo_epochs"})
    vf_coef: float = field(default=0.1, metadata={"help": "PPO: weight of the value loss"})
    value_clip_range: float = field(default=0.2, metadata={
        "help": "PPO: a turn's value may move at most this far from its value at rollout time in the clipped value "
                "loss"})
    gae_gamma: float = field(default=1.0, metadata={
        "help": "PPO: discount between agent turns; must equal the --gamma the data's returns were computed with "
                "(per-turn rewards r_t = G_t - gamma G_{t+1})"})
    gae_lambda: float = field(default=0.95, metadata={"help": "PPO: GAE's lambda"})
    optimizer_state_from: str | None = field(default=None, metadata={
        "help": "an earlier update's output folder: the optimizer goes on from its optimizer_state.pt (Adam's moments "
                "and step counts), as one optimizer over all the updates of an online RL run; each update writes its "
                "own. Not with --deepspeed (sharded state) or --lora (each update trains a fresh adapter)"})
    rollout_temperature: float = field(default=1.0, metadata={
        "help": "the sampling temperature of the episodes: every log-prob (policy, old, reference) is of the logits "
                "divided by it, the distribution the rollouts were drawn from"})
    learning_rate: float = 1e-6
    logging_steps: float = 1  # few optimizer steps per update: log each one
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={
        "help": "DDP's search for weights without a gradient; off because every trainable weight gets one each step "
                "and the search would count the value head, which runs after the model's forward, twice"})

    def __post_init__(self):
        if self.num_train_epochs is not None and self.num_train_epochs != self.ppo_epochs:
            raise ValueError(f"--num_train_epochs {self.num_train_epochs}: the passes over the data are --ppo_epochs "
                             f"({self.ppo_epochs}) in this trainer")
        if self.ppo_epochs < 1:
            raise ValueError(f"--ppo_epochs must be >= 1, got {self.ppo_epochs}")
        if self.clip_range <= 0 or self.value_clip_range <= 0:
            raise ValueError(f"--clip_range and --value_clip_range must be > 0, got {self.clip_range} and "
                             f"{self.value_clip_range}")
        if self.optimizer_state_from is not None and self.deepspeed:
            raise ValueError("--optimizer_state_from goes on with a plain torch optimizer; under --deepspeed each "
                             "update starts a fresh one (its state is sharded)")
        if self.rollout_temperature <= 0:
            raise ValueError(f"--rollout_temperature must be > 0 (greedy rollouts have no log-probs to learn from), "
                             f"got {self.rollout_temperature}")
        if self.kl_coef < 0 or self.vf_coef < 0:
            raise ValueError(f"--kl_coef and --vf_coef must be >= 0, got {self.kl_coef} and {self.vf_coef}")
        if self.kl_coef > 0 and not self.ref_model_name_or_path:
            raise ValueError(f"--kl_coef {self.kl_coef} needs --ref_model_name_or_path (the SFT model); "
                             "--kl_coef 0 trains without a KL term")
        for name in ("gae_gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name} must be in [0, 1], got {getattr(self, name)}")
        self.num_train_epochs = float(self.ppo_epochs)
        super().__post_init__()


# -- data ---------------------------------------------------------------------------------------------------------

def load_rl_records(path: str | Path, need_returns: bool = False) -> list[dict]:
    """Validated RL records (scripts/rl_data.py): "conversations" (the prompt turns, then at least one gpt turn),
    "advantages" (and, with need_returns, "returns"): one finite number per gpt turn after the prompt, and the
    optional "context" (turns, human first, that the rollouts saw between the instruction's "OK" and the task)."""
    records = load_json_list(path)
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise DataError(f"{path}: record {i}: expected an object, got {type(r).__name__}")
        where = record_where(path, i, r)
        turns = r.get("conversations")
        if not isinstance(turns, list) or len(turns) <= PROMPT_TURNS:
            raise DataError(f"{where}: field 'conversations' must be a list of the {PROMPT_TURNS} prompt turns "
                            "followed by the episode's turns")
        try:
            turns_to_messages(turns)
        except ValueError as e:
            raise DataError(f"{where}: field 'conversations': {e}") from None
        context = r.get("context", [])
        if not isinstance(context, list) or len(context) % 2 or any(
                not isinstance(t, dict) or t.get("from") != ("human", "gpt")[k % 2]
                or not isinstance(t.get("value"), str) for k, t in enumerate(context)):
            raise DataError(f"{where}: field 'context' must be a list of human/gpt turn pairs, human first, each "
                            "with a string 'value'")
        n = rounds(turns)
        if not n:
            raise DataError(f"{where}: field 'conversations' has no gpt turn after the prompt")
        for key in ("advantages", "returns") if need_returns else ("advantages",):
            values = r.get(key)
            if not (isinstance(values, list) and len(values) == n and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
                raise DataError(f"{where}: field {key!r} must hold one finite number per gpt turn after the prompt "
                                f"({n}), got {str(values)[:80]}")
    return records


def token_turns(messages: list[dict], tokenizer, template, encoded: dict, supervise_from: int) -> list[int]:
    """Per token of `encoded` (encode_conversation's ids and labels, supervised from message `supervise_from` on),
    the index of the gpt turn after the prompt it belongs to (0: the agent's first answer), -1 for a token outside
    the agent's turns. Read from the same rendering and token offsets the label mask comes from; a supervised token
    outside every turn is refused."""
    rendered = render(template, messages)
    prompt_answers = sum(m["role"] == "assistant" for m in messages[:supervise_from])  # "OK", the context's
    spans = rendered.assistant_spans[prompt_answers:]
    tokens = with_offsets(tokenizer)(rendered.text, add_special_tokens=True, return_offsets_mapping=True)
    ids, labels = encoded["input_ids"], encoded["labels"]
    if tokens["input_ids"][: len(ids)] != ids:
        raise SkipSample("turns: the conversation tokenizes differently from its labelled encoding")
    starts = [a for a, _ in spans]
    turns = []
    for (s, e), label in zip(tokens["offset_mapping"], labels):
        if label == IGNORE_INDEX:
            turns.append(-1)
            continue
        t = bisect.bisect_right(starts, s) - 1
        if t < 0 or e > spans[t][1]:
            raise SkipSample(f"turns: supervised token at characters {s}-{e} lies in no agent turn")
        turns.append(t)
    return turns


def agent_positions(labels: list[int]) -> list[int]:
    """The agent tokens the model predicts, in order: every supervised token but one at position 0 (none in
    practice: the prompt comes first). All per-token arrays of a batch follow this order, sequence by sequence."""
    return [k for k in range(1, len(labels)) if labels[k] != IGNORE_INDEX]


def encode_rl(records: list[dict], tokenizer, template, max_length: int) -> tuple[list[dict], list[Skipped]]:
    """Per record: input_ids and labels as SFT's (the agent's turns after the prompt supervised, cut from the right
    at max_length), `turns` and `advantages` per token (the turn's index and advantage; -1 and 0 outside the
    agent's turns), `turn_starts` (the index, among the agent positions, of each turn's first token), and
    `turn_returns` when the record has returns. The context turns go between "OK" and the task, as in the rollout's
    prompt. Observations after the last gpt turn are dropped."""
    dataset, skipped = [], []
    for i, r in enumerate(records):
        turns, context = r["conversations"], r.get("context", [])
        prompt = turns[:PROMPT_TURNS - 1] + context + turns[PROMPT_TURNS - 1:PROMPT_TURNS]
        messages = turns_to_messages(prompt + trajectory(turns))
        try:
            encoded = encode_conversation(messages, tokenizer, template, max_length, supervise_from=len(prompt))
            per_token = token_turns(messages, tokenizer, template, encoded, len(prompt))
        except SkipSample as e:
            skipped.append(Skipped(i, r.get("id"), str(e)))
            continue
        positions = agent_positions(encoded["labels"])
        present = [per_token[k] for k in positions]
        starts = [j for j, t in enumerate(present) if j == 0 or t != present[j - 1]]
        item = {**encoded, "turns": per_token, "turn_starts": starts,
                "advantages": [float(r["advantages"][t]) if t >= 0 else 0.0 for t in per_token]}
        if "returns" in r:
            item["turn_returns"] = [float(g) for g in r["returns"]]
        dataset.append(item)
    return dataset, skipped


class PGCollator(Collator):
    """SFTCollator's batches (padded, or packed with padding_free), plus per agent token in `agent_positions` order,
    sequence by sequence: its advantage and, once precomputed, its old and reference log-probs. For PPO also
    value_index (where in that order each turn's value is read: its first token), old_values and value_targets."""

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = self._collate([x["input_ids"] for x in items], [x["labels"] for x in items])
        positions = [agent_positions(x["labels"]) for x in items]
        batch["advantages"] = torch.tensor([x["advantages"][k] for x, pos in zip(items, positions) for k in pos])
        for key in ("old_logps", "ref_logps", "old_values", "value_targets"):
            if key in items[0]:
                batch[key] = torch.tensor([v for x in items for v in x[key]], dtype=torch.float32)
        offsets = [0]
        for pos in positions[:-1]:
            offsets.append(offsets[-1] + len(pos))
        batch["value_index"] = torch.tensor([o + j for x, o in zip(items, offsets) for j in x["turn_starts"]],
                                            dtype=torch.long)
        return batch


# -- forward ------------------------------------------------------------------------------------------------------

@dataclass
class TokenStats:
    """Per agent token of a batch (agent_positions order, sequence by sequence)."""
    logps: torch.Tensor  # log p(token)
    entropy: torch.Tensor  # entropy of the model's next-token distribution there
    hidden: torch.Tensor  # the final hidden state that predicts the token
    seq_index: torch.Tensor  # the sequence it belongs to
    sequences: int


def _head_stats(head, hidden: torch.Tensor, targets: torch.Tensor,
                temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float() / temperature
    log_z = logits.logsumexp(-1)
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_z
    return logps, log_z - (logits.softmax(-1) * logits).sum(-1)


def token_stats(model, batch: dict[str, torch.Tensor], bf16: bool = False, temperature: float = 1.0) -> TokenStats:
    """Log-probs, entropies and hidden states at the agent tokens of a PGCollator batch (of the logits divided by
    `temperature`: the sampling distribution), the LM head run only
    there, in chunks recomputed in backward (as fastchat.train.packing does for SFT and DPO). bf16: the model's
    forward under bf16 autocast with fp32 outputs and the head outside it, as accelerate runs it in training."""
    input_ids = batch["input_ids"]
    if "position_ids" in batch:  # packed
        inputs = {"position_ids": batch["position_ids"]}
        targets = batch["shift_labels"]
        seq_of = (batch["position_ids"] == 0).cumsum(1) - 1
        sequences = int((batch["position_ids"] == 0).sum())
    else:
        inputs = {"attention_mask": batch["attention_mask"]}
        labels = batch["labels"]
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
        seq_of = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
        sequences = labels.shape[0]
    empty = torch.zeros(0, dtype=torch.long, device=input_ids.device)
    with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(input_ids=input_ids, use_cache=False, output_hidden_states=True, logits_to_keep=empty, **inputs)
    where = targets != IGNORE_INDEX
    hidden = out.hidden_states[-1][where]
    hidden = hidden.float() if bf16 else hidden
    targets = targets[where]
    head = output_head(model)
    rows = max(1, CHUNK_ELEMENTS // head.out_features)
    recompute = torch.is_grad_enabled() and not is_deepspeed_zero3_enabled()  # see packing.supervised_token_logps
    logps, entropy = [], []
    for start in range(0, targets.shape[0], rows):
        h, t = hidden[start:start + rows], targets[start:start + rows]
        if recompute:
            lp, ent = torch.utils.checkpoint.checkpoint(_head_stats, head, h, t, temperature, use_reentrant=False)
        else:
            lp, ent = _head_stats(head, h, t, temperature)
        logps.append(lp)
        entropy.append(ent.detach())
    return TokenStats(torch.cat(logps), torch.cat(entropy), hidden, seq_of[where], sequences)


# -- losses -------------------------------------------------------------------------------------------------------

def clipped_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                      clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, PPO's clipped surrogate loss -min(r A, clip(r, 1 - eps, 1 + eps) A) with r = exp(logp - old_logp),
    and whether r lies outside [1 - eps, 1 + eps] (clip_fraction's count). Where the clipped side is the minimum
    the loss is constant in logp: no gradient pushes the ratio further out."""
    ratio = torch.exp(logps - old_logps)
    clipped = ratio.clamp(1 - clip_range, 1 + clip_range)
    return -torch.min(ratio * advantages, clipped * advantages), (ratio - 1).abs() > clip_range


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per token, Schulman's k3 estimate of KL(policy || reference): exp(d) - d - 1 with d = ref_logp - logp. It is
    >= 0 for every token, 0 exactly where the two agree, and unbiased for tokens sampled from the policy."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def aggregate(per_token: torch.Tensor, seq_index: torch.Tensor, sequences: int, mode: str) -> torch.Tensor:
    """token_mean: the mean over all tokens; sequence_mean: each sequence's token mean, then their mean."""
    if mode == "token_mean":
        return per_token.mean()
    sums = per_token.new_zeros(sequences).index_add(0, seq_index, per_token)
    counts = per_token.new_zeros(sequences).index_add(0, seq_index, torch.ones_like(per_token))
    has_tokens = counts > 0
    return (sums[has_tokens] / counts[has_tokens]).mean()


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, targets: torch.Tensor,
                       clip_range: float) -> torch.Tensor:
    """PPO's clipped value loss, mean over turns: 0.5 max((V - R)^2, (V_clip - R)^2), with
    V_clip = V_old + clip(V - V_old, -clip_range, clip_range)."""
    v_clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return 0.5 * torch.max((values - targets) ** 2, (v_clipped - targets) ** 2).mean()


# -- precomputation -----------------------------------------------------------------------------------------------

@torch.no_grad()
def precompute_token_logps(model, dataset: list[dict], collator: PGCollator, batch_size: int, device, key: str,
                           bf16: bool = False, value_head=None, temperature: float = 1.0) -> None:
    """Store in every item, per agent token, its log-prob under `model` (item[key]: old_logps or ref_logps) and, with
    a value head, each turn's value at its first token (old_values); the same forward as training (with --bf16 on
    DeepSpeed, whose weights are bf16 in training, the ratio starts 1 up to bf16 rounding)."""
    was_training = model.training
    model.eval()
    for start in range(0, len(dataset), batch_size):
        items = dataset[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collator(items).items()}
        stats = token_stats(model, batch, bf16=bf16, temperature=temperature)
        values = value_head(stats.hidden[batch["value_index"]]).squeeze(-1) if value_head is not None else None
        counts = torch.bincount(stats.seq_index, minlength=len(items)).tolist()
        for item, logps in zip(items, stats.logps.float().cpu().split(counts)):
            item[key] = logps.tolist()
        if values is not None:
            for item, v in zip(items, values.float().cpu().split([len(x["turn_starts"]) for x in items])):
                item["old_values"] = v.tolist()
    model.train(was_training)


def ppo_advantages(dataset: list[dict], gamma: float, lam: float) -> dict[str, float]:
    """GAE over each episode's agent turns from its returns and old values, then whitened over all agent tokens.

    Per-turn rewards r_t = G_t - gamma G_{t+1} recover the step rewards the returns were computed from (with the
    same gamma). An episode cut at model_max_length bootstraps from the return of its first turn cut off. Sets
    item["value_targets"] (GAE's returns, one per turn) and item["advantages"] (per token: its turn's advantage,
    whitened); returns the mean and std before whitening."""
    for item in dataset:
        returns, kept = item["turn_returns"], len(item["turn_starts"])
        rewards = [returns[t] - gamma * (returns[t + 1] if t + 1 < len(returns) else 0.0) for t in range(kept)]
        bootstrap = returns[kept] if kept < len(returns) else 0.0
        item["turn_advantages"], item["value_targets"] = gae(rewards, item["old_values"], gamma, lam,
                                                             last_value=bootstrap)
    per_token = [item["turn_advantages"][t] for item in dataset for t in item["turns"] if t >= 0]
    mean = sum(per_token) / len(per_token)
    std = math.sqrt(sum((a - mean) ** 2 for a in per_token) / len(per_token))
    for item in dataset:
        item["advantages"] = [(item["turn_advantages"][t] - mean) / (std + WHITEN_EPS) if t >= 0 else 0.0
                              for t in item["turns"]]
    return {"mean": mean, "std": std}


# -- value head ---------------------------------------------------------------------------------------------------

def load_value_head(model, model_dir) -> tuple[torch.nn.Linear, str]:
    """A Linear(hidden, 1) for the policy's final hidden state: the model folder's value_head.safetensors (the critic
    the previous update trained) or zero (V = 0), and where it came from. `attach_value_head` makes it part of the
    policy."""
    head = torch.nn.Linear(model.config.get_text_config().hidden_size, 1)
    path = Path(model_dir) / VALUE_HEAD_FILE
    if path.is_file():
        head.load_state_dict(safetensors.torch.load_file(path))
        return head, str(path)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head, "zeros"


def attach_value_head(host, head: torch.nn.Linear) -> None:
    """Register the head as the submodule `value_head` of the causal LM, so that the optimizer, DDP, DeepSpeed and
    checkpoints handle it with the policy's weights. After LoRA: peft's all-linear would wrap it in an adapter."""
    setattr(host, VALUE_HEAD, head.requires_grad_(True))


# -- trainer ------------------------------------------------------------------------------------------------------

# what each micro-batch adds to its optimizer step's entry (summed over micro-batches and ranks)
STEP_SUMS = ("loss", "pg_loss", "value_loss", "micro_batches", "kl", "entropy", "clip_fraction", "mean_advantage",
             "tokens")


class PGLogCallback(TrainerCallback):
    def __init__(self, trainer: PGTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.start_pg_log(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.end_step()


class PGTrainer(Trainer):
    """transformers' Trainer with the clipped policy-gradient loss (and PPO's value loss) on PGCollator batches
    whose old and reference log-probs are precomputed. Each optimizer step appends an entry to
    <output_dir>/pg_log.json: loss, pg_loss, kl, entropy, clip_fraction, tokens, mean_advantage (token means over
    the step's agent tokens, loss terms as micro-batch means) and value_loss with a value head."""

    def __init__(self, *args, value_head: torch.nn.Linear | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.value_head = value_head
        # our loss is a mean per micro-batch: Trainer divides it by the accumulated micro-batches
        self.model_accepts_loss_kwargs = False
        self._sums: torch.Tensor | None = None
        self.has_reference = False
        self.pg_log: list[dict] = []
        self._unlogged: list[dict] = []
        self.add_callback(PGLogCallback(self))

    def create_optimizer(self):
        """transformers' optimizer, given the moments and step counts of --optimizer_state_from's (a checkpoint
        being resumed loads its own over them afterwards)."""
        optimizer = super().create_optimizer()
        if self.args.optimizer_state_from:
            path = Path(self.args.optimizer_state_from) / OPTIMIZER_STATE_FILE
            if not path.is_file():
                raise SystemExit(f"--optimizer_state_from {self.args.optimizer_state_from}: no {OPTIMIZER_STATE_FILE}")
            try:
                optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            except (ValueError, KeyError, RuntimeError) as e:
                raise SystemExit(f"{path}: not the optimizer of this model's trainable weights ({e})") from None
            logger.info("optimizer state from %s", path)
        return optimizer

    def save_optimizer_state(self, output_dir) -> None:
        """The optimizer after the last step, for the next update's --optimizer_state_from (DDP: every rank holds
        the same state; rank 0 writes it)."""
        if self.is_world_process_zero():
            state = self.optimizer.state_dict()
            tmp = Path(output_dir) / (OPTIMIZER_STATE_FILE + ".tmp")
            torch.save(state, tmp)
            tmp.replace(Path(output_dir) / OPTIMIZER_STATE_FILE)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        stats = token_stats(model, inputs, temperature=self.args.rollout_temperature)
        advantages = inputs["advantages"].to(stats.logps.dtype)
        pg, clipped = clipped_surrogate(stats.logps, inputs["old_logps"], advantages, args.clip_range)
        per_token = pg
        kl = None
        if "ref_logps" in inputs:
            kl = k3_kl(stats.logps, inputs["ref_logps"])
            if args.kl_coef:
                per_token = pg + args.kl_coef * kl
        loss = aggregate(per_token, stats.seq_index, stats.sequences, args.loss_aggregation)
        value_loss = None
        if self.value_head is not None:
            values = self.value_head(stats.hidden[inputs["value_index"]]).squeeze(-1).float()
            value_loss = clipped_value_loss(values, inputs["old_values"], inputs["value_targets"],
                                            args.value_clip_range)
            loss = loss + args.vf_coef * value_loss
        if model.training:
            self.has_reference = kl is not None
            zero = loss.new_zeros(())
            sums = torch.stack([loss, aggregate(pg, stats.seq_index, stats.sequences, args.loss_aggregation),
                                zero if value_loss is None else value_loss, zero + 1,
                                zero if kl is None else kl.sum(), stats.entropy.sum(), clipped.sum(),
                                advantages.sum(), zero + stats.logps.numel()]).detach().double()
            self._sums = sums if self._sums is None else self._sums + sums
        return (loss, {"pg_loss": pg, "kl": kl, "value_loss": value_loss}) if return_outputs else loss

    def start_pg_log(self, global_step: int) -> None:
        """A run resumed at step N keeps the first N entries (entry i is step i + 1); a new run starts empty."""
        path = Path(self.args.output_dir) / PG_LOG
        self.pg_log = read_json(path, list)[:global_step] if global_step and path.is_file() else []

    def end_step(self) -> None:
        """The optimizer step's entry, from every rank's micro-batches (a collective: each rank calls it)."""
        if self._sums is None:
            return
        t = dict(zip(STEP_SUMS, self.accelerator.reduce(self._sums, reduction="sum").tolist()))
        self._sums = None
        tokens = max(t["tokens"], 1.0)
        entry = {"loss": t["loss"] / t["micro_batches"],
                 "pg_loss": t["pg_loss"] / t["micro_batches"],
                 "kl": t["kl"] / tokens if self.has_reference else None,
                 "entropy": t["entropy"] / tokens, "clip_fraction": t["clip_fraction"] / tokens,
                 "tokens": int(t["tokens"]), "mean_advantage": t["mean_advantage"] / tokens}
        if self.value_head is not None:
            entry["value_loss"] = t["value_loss"] / t["micro_batches"]
        self.pg_log.append(entry)
        self._unlogged.append(entry)
        if self.is_world_process_zero():
            write_json_atomic(Path(self.args.output_dir) / PG_LOG, self.pg_log)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._unlogged:  # the steps since the last log: their means (tokens: their sum)
            for key in self._unlogged[-1]:
                values = [e[key] for e in self._unlogged if e.get(key) is not None]
                if key != "loss" and values:
                    logs[key] = sum(values) if key == "tokens" else sum(values) / len(values)
            self._unlogged.clear()
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints keep the value head in value_head.safetensors beside the model (a LoRA checkpoint holds
        only the adapter), and the model files a plain causal LM."""
        if self.value_head is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        marker = f"{VALUE_HEAD}."
        head = {k.split(marker)[-1]: state_dict.pop(k) for k in list(state_dict) if marker in k}
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in head.items()},
                                        str(Path(output_dir) / VALUE_HEAD_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # (DeepSpeed restores the head with its state)
        if self.value_head is not None:
            path = Path(resume_from_checkpoint) / VALUE_HEAD_FILE
            if not path.is_file():
                raise SystemExit(f"{resume_from_checkpoint}: a PPO checkpoint without {VALUE_HEAD_FILE}; resume it "
                                 "with the algorithm that wrote it, or start over with --no_resume")
            state = safetensors.torch.load_file(path)
            self.value_head.load_state_dict({k: v.to(self.value_head.weight.device) for k, v in state.items()})
            logger.info("value head restored from %s", path)

    def detach_value_head(self, host, output_dir) -> None:
        """Write the trained value head to <output_dir>/value_head.safetensors and take it off the policy, so the
        model saved next is a plain causal LM (merged LoRA included)."""
        head = self.value_head
        with zero3_gathered(head):
            if self.is_world_process_zero():
                Path(output_dir).mkdir(parents=True, exist_ok=True)
                safetensors.torch.save_file({k: v.detach().float().cpu().contiguous()
                                             for k, v in head.state_dict().items()},
                                            str(Path(output_dir) / VALUE_HEAD_FILE))
        delattr(host, VALUE_HEAD)
        self.value_head = None


def refuse_lora_with_optimizer_state(model_args: ModelArguments, args: PGTrainingArguments) -> None:
    if model_args.lora and args.optimizer_state_from:
        raise SystemExit("--optimizer_state_from with --lora: each update trains a fresh adapter on the merged model, "
                         "whose moments an earlier adapter's optimizer does not hold")


def main(argv: list[str] | None = None) -> None:
    prepared = start_training(argv, PGTrainingArguments,
                              lambda path, args: load_rl_records(path, need_returns=args.algorithm == "ppo"), encode_rl,
                              "RL data", "episode", check=refuse_lora_with_optimizer_state)
    model_args, args, dataset, tokenizer = prepared.model_args, prepared.args, prepared.dataset, prepared.tokenizer
    ppo = args.algorithm == "ppo"
    n_tok = sum(len(x["input_ids"]) for x in dataset)
    n_agent = sum(t >= 0 for x in dataset for t in x["turns"])
    versions = Counter(r.get("policy_version") for r in prepared.records)
    logger.info("%s on %d episodes, %d tokens, %d agent tokens; policy versions %s", args.algorithm.upper(),
                len(dataset), n_tok, n_agent, dict(versions))

    model = load_model(model_args.model_name_or_path, args)
    disable_dropout(model)  # the first step's ratio must be exactly 1: the same forward as the precomputation
    value_head, value_source = None, None
    if ppo:
        value_head, value_source = load_value_head(model, model_args.model_name_or_path)
        value_head.to(args.device)
    start = time.perf_counter()
    precompute_collator = PGCollator(tokenizer.pad_token_id, packed=args.padding_free)  # `collator` counts training
    batch = args.per_device_train_batch_size
    with zero3_gathered(model):
        precompute_token_logps(model.to(args.device), dataset, precompute_collator, batch, args.device,
                               "old_logps", bf16=args.bf16, value_head=value_head,
                               temperature=args.rollout_temperature)
    if args.ref_model_name_or_path:
        ref = load_model(args.ref_model_name_or_path, args)
        disable_dropout(ref)
        with zero3_gathered(ref):
            precompute_token_logps(ref.to(args.device), dataset, precompute_collator, batch, args.device,
                                   "ref_logps", bf16=args.bf16, temperature=args.rollout_temperature)
        free_model(ref)
        ref = None
    gae_stats = ppo_advantages(dataset, args.gae_gamma, args.gae_lambda) if ppo else None
    precompute_s = time.perf_counter() - start
    logger.info("old%s log-probs precomputed in %.1fs", " and reference" if args.ref_model_name_or_path else "",
                precompute_s)

    host = model  # the causal LM that holds the value head, under any LoRA wrapper
    if model_args.lora:
        model = apply_lora(model, model_args, args)
    if value_head is not None:
        attach_value_head(host, value_head)
    collator = PGCollator(tokenizer.pad_token_id, packed=args.padding_free)
    trainer = PGTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                        processing_class=tokenizer, value_head=value_head)
    result = train_resuming(trainer, args)
    trainer.save_state()
    if value_head is not None:
        trainer.detach_value_head(host, args.output_dir)
    save_trained(trainer, tokenizer, prepared.template, model_args, args.output_dir)
    if not (args.deepspeed or model_args.lora):
        trainer.save_optimizer_state(args.output_dir)
    finish_training(trainer, args, result, algorithm=args.algorithm, episodes=len(dataset), tokens_per_epoch=n_tok,
                    agent_tokens=n_agent, optimizer_steps=trainer.state.global_step,
                    policy_versions=sorted(versions, key=lambda v: (v is None, v)), precompute_s=precompute_s,
                    loss_aggregation=args.loss_aggregation, kl_coef=args.kl_coef, clip_range=args.clip_range,
                    value_head_init=value_source, gae_advantages=gae_stats, **collator.work_stats())


if __name__ == "__main__":
    main(sys.argv[1:])
