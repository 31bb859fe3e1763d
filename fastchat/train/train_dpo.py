"""Multi-turn DPO on (prompt, chosen, rejected) trajectories, as in ETO.

    python -m fastchat.train.train_dpo \\
        --model_name_or_path outputs/webshop-sft --data_path data/webshop_pairs.json \\
        --output_dir outputs/webshop-dpo --beta 0.1 --learning_rate 1e-6 --num_train_epochs 3 \\
        --per_device_train_batch_size 2 --gradient_accumulation_steps 8 --model_max_length 2048 \\
        [--precompute_ref_logps] [--ref_model_name_or_path DIR] [--bf16] [--lora] [--deepspeed CONFIG]

A sequence's log-probability is the sum over the assistant tokens of every gpt turn of the
chosen (or rejected) continuation: prompt turns (including its "OK") and observations are
not counted. Loss: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))). The reference is the
starting policy (or --ref_model_name_or_path). With --precompute_ref_logps its log-probs are
computed once before training and no reference model is kept in memory; without it, a frozen
copy is kept (with --lora, the policy with its adapter switched off serves as reference).
Chosen and rejected sequences of a batch go through the model in one forward pass.

Records may carry a "kind": "trajectory" (default), "step" (IPR-style step pairs, whose prompt runs on into the
expert's first steps) or "sft" (prompt + chosen, no rejected). The loss is trajectory_weight x the mean DPO loss
of the batch's trajectory pairs + step_weight x that of its step pairs + sft_weight x the mean per-token
negative log-likelihood of its SFT samples; each part is logged (loss/trajectory, loss/step, loss/sft).
"""
from __future__ import annotations

import gc
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import Trainer

from fastchat.records import KINDS
from fastchat.train.common import (
    EtoTrainingArguments,
    apply_lora,
    finish_training,
    load_model,
    logger,
    prepare_reference,
    save_trained,
    start_training,
    train_resuming,
    zero3_gathered,
)
from fastchat.train.data import (
    IGNORE_INDEX,
    SFT_KIND,
    DPOCollator,
    encode_dpo,
    load_dpo_records,
)
from fastchat.train.packing import packed_sequence_logps


@dataclass
class DPOTrainingArguments(EtoTrainingArguments):
    beta: float = field(default=0.1, metadata={"help": "DPO temperature: strength of the pull towards the reference"})
    learning_rate: float = 1e-6
    logging_steps: float = 1  # DPO runs few optimizer steps: log each one (loss, margins, accuracies)
    precompute_ref_logps: bool = field(default=False, metadata={
        "help": "compute reference log-probs once before training and keep no reference model in memory"})
    ref_model_name_or_path: str | None = field(default=None, metadata={
        "help": "reference model (default: the starting policy, --model_name_or_path)"})
    disable_dropout: bool = field(default=True, metadata={
        "help": "turn dropout off so policy and reference log-probs are comparable (--no_disable_dropout keeps it)"})
    trajectory_weight: float = field(default=1.0, metadata={"help": "weight of the DPO loss on trajectory pairs"})
    step_weight: float = field(default=1.0, metadata={
        "help": "weight of the DPO loss on step pairs (records with \"kind\": \"step\")"})
    sft_weight: float = field(default=1.0, metadata={
        "help": "weight of the language-model loss on SFT samples (records with \"kind\": \"sft\")"})

    def loss_weights(self) -> dict[str, float]:
        return {"trajectory": self.trajectory_weight, "step": self.step_weight, "sft": self.sft_weight}


def sequence_logps(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Per sequence of a padded batch, the summed log-probability of the supervised (label != -100) tokens, from
    the full-vocabulary logits (--no_padding_free)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    # gather minus logsumexp: the same as log_softmax, without keeping a second vocabulary-sized tensor
    token_logps = torch.gather(logits, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return (token_logps * mask).sum(-1)


def batch_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed supervised log-probabilities of a DPOCollator batch: chosen sequences, then rejected ones."""
    if "position_ids" in batch:  # packed: no padding, head at supervised positions only
        return packed_sequence_logps(model, batch)
    return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


def split_logps(logps: torch.Tensor, kinds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A DPOCollator batch's log-probs as (every item's chosen sequence, the pairs' rejected sequences)."""
    return logps[: kinds.shape[0]], logps[kinds.shape[0]:]


def kind_losses(pair_losses: torch.Tensor, kinds: torch.Tensor, chosen_logps: torch.Tensor,
                sft_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The mean loss of each kind present in the batch: DPO over its trajectory pairs, over its step pairs, and
    the language-model loss (mean negative log-likelihood per supervised token) over its SFT samples."""
    parts = {}
    pair_kinds = kinds[kinds != SFT_KIND]
    for index, name in enumerate(KINDS):
        if name == "sft":
            mask = kinds == index
            if mask.any():
                parts[name] = (-chosen_logps[mask] / sft_tokens[mask].clamp(min=1)).mean()
        elif (pair_kinds == index).any():
            parts[name] = pair_losses[pair_kinds == index].mean()
    return parts


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float):
    """Per-pair sigmoid DPO loss and the implicit rewards beta * (log pi - log ref)."""
    chosen_rewards = beta * (chosen - ref_chosen)
    rejected_rewards = beta * (rejected - ref_rejected)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards, rejected_rewards


def disable_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


@torch.no_grad()
def precompute_reference_logps(ref_model, dataset: list[dict], collator, batch_size: int, device,
                               bf16: bool = False) -> None:
    """Store ref_chosen_logps / ref_rejected_logps in every item (same forward as training)."""
    was_training = ref_model.training
    ref_model.eval()
    for start in range(0, len(dataset), batch_size):
        items = dataset[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collator(items).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logps = batch_logps(ref_model, batch)
        chosen, rejected = split_logps(logps, batch["kinds"])
        rejected = iter(rejected.cpu().tolist())
        for item, value in zip(items, chosen.cpu().tolist()):
            item["ref_chosen_logps"] = value
            if item.get("kind", 0) != SFT_KIND:
                item["ref_rejected_logps"] = next(rejected)
    ref_model.train(was_training)


class DPOTrainer(Trainer):
    """transformers Trainer with the DPO loss on trajectory and step pairs and the language-model loss on SFT
    samples, weighted per kind (--trajectory_weight, --step_weight, --sft_weight); batches come from
    DPOCollator."""

    def __init__(self, *args, beta: float, ref_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta = beta
        self.loss_weights = self.args.loss_weights()
        self.ref_model = None if ref_model is None else prepare_reference(ref_model, self)
        # our loss is a mean over pairs: let Trainer divide it for gradient accumulation
        self.model_accepts_loss_kwargs = False
        self._metrics: dict[str, list[float]] = defaultdict(list)

    @torch.no_grad()
    def _reference_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_chosen_logps" in inputs:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        if self.ref_model is not None:
            logps = batch_logps(self.ref_model, inputs)
        else:  # LoRA: the policy with its adapter switched off is the starting policy
            with self.accelerator.unwrap_model(model).disable_adapter():
                logps = batch_logps(model, inputs)
        return split_logps(logps, inputs["kinds"])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        chosen_all, rejected = split_logps(batch_logps(model, inputs), inputs["kinds"])
        kinds = inputs["kinds"]
        pairs = kinds != SFT_KIND
        chosen = chosen_all[pairs]
        ref_chosen, ref_rejected = self._reference_logps(model, inputs)
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen[pairs].to(chosen.dtype),
                                                            ref_rejected.to(chosen.dtype), self.beta)
        parts = kind_losses(losses, kinds, chosen_all, inputs["sft_tokens"])
        loss = sum(self.loss_weights[k] * v for k, v in parts.items())
        pair_metrics = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                        "rewards/margins": chosen_rewards - rejected_rewards,
                        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                        "logps/chosen": chosen, "logps/rejected": rejected}
        # each kind's loss before its weight; NaN where this batch has none of that kind (or no pair)
        nan = loss.new_tensor(float("nan"))
        means = {**{f"loss/{k}": parts.get(k, nan) for k in KINDS},
                 **{k: v.mean() if v.numel() else nan for k, v in pair_metrics.items()}}
        if model.training:
            # one gather of a fixed-size vector: every rank makes the same collective call, whatever its batch holds
            values = self.accelerator.gather(torch.stack(list(means.values())).detach()[None])
            for k, column in zip(means, values.float().T):
                column = column[~column.isnan()]
                if column.numel():
                    self._metrics[k].append(column.mean().item())
        return (loss, {**pair_metrics, **{f"loss/{k}": v for k, v in parts.items()}}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metrics:
            logs.update({k: sum(v) / len(v) for k, v in self._metrics.items()})
            self._metrics.clear()
        super().log(logs, start_time)


def free_model(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    prepared = start_training(argv, DPOTrainingArguments, lambda path, args: load_dpo_records(path), encode_dpo,
                              "DPO data", "pair")
    model_args, args, dataset, tokenizer = prepared.model_args, prepared.args, prepared.dataset, prepared.tokenizer
    n_tok = sum(len(x["chosen_input_ids"]) + len(x.get("rejected_input_ids", ())) for x in dataset)
    kind_counts = {name: sum(x["kind"] == i for x in dataset) for i, name in enumerate(KINDS)}
    logger.info("DPO on %d records %s, %d tokens (chosen + rejected), beta=%g, loss weights %s", len(dataset),
                kind_counts, n_tok, args.beta, args.loss_weights())

    collator = DPOCollator(tokenizer.pad_token_id, packed=args.padding_free)
    model = load_model(model_args.model_name_or_path, args)
    if args.disable_dropout:
        disable_dropout(model)
    ref_model, precompute_s = None, 0.0
    if args.precompute_ref_logps:
        start = time.perf_counter()
        ref = load_model(args.ref_model_name_or_path, args) if args.ref_model_name_or_path else model
        ref_collator = DPOCollator(tokenizer.pad_token_id, packed=args.padding_free)  # `collator` counts training only
        with zero3_gathered(ref):
            precompute_reference_logps(ref.to(args.device), dataset, ref_collator, args.per_device_train_batch_size,
                                       args.device, bf16=args.bf16)
        if ref is not model:
            free_model(ref)
        ref = None
        precompute_s = time.perf_counter() - start
        logger.info("reference log-probs precomputed in %.1fs; no reference model kept", precompute_s)
    elif args.ref_model_name_or_path or not model_args.lora:
        ref_model = load_model(args.ref_model_name_or_path or model_args.model_name_or_path, args)
        if args.disable_dropout:
            disable_dropout(ref_model)
    if model_args.lora:
        model = apply_lora(model, model_args, args)

    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                         processing_class=tokenizer, beta=args.beta, ref_model=ref_model)
    result = train_resuming(trainer, args)
    trainer.save_state()
    save_trained(trainer, tokenizer, prepared.template, model_args, args.output_dir)
    finish_training(trainer, args, result, pairs=len(dataset), tokens_per_epoch=n_tok, precompute_s=precompute_s,
                    precompute_ref_logps=args.precompute_ref_logps, kinds=kind_counts,
                    loss_weights=args.loss_weights(), **collator.work_stats())


if __name__ == "__main__":
    main(sys.argv[1:])
