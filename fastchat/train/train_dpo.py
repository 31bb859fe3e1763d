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
"""
from __future__ import annotations

import gc
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import transformers
from transformers import HfArgumentParser, Trainer

from fastchat.train.common import (DataArguments, EtoTrainingArguments, ModelArguments, apply_lora, load_model,
                                   load_tokenizer_and_template, logger, remove_checkpoints, save_trained, setup_logging,
                                   train_resuming, write_summary)
from fastchat.train.data import IGNORE_INDEX, DataError, DPOCollator, encode_dpo, load_dpo_records, report_skipped


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


def sequence_logps(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Per sequence, the summed log-probability of the supervised (label != -100) tokens."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    # gather minus logsumexp: the same as log_softmax, without keeping a second vocabulary-sized tensor
    token_logps = torch.gather(logits, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return (token_logps * mask).sum(-1)


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
            logps = sequence_logps(ref_model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        logps = logps.cpu().tolist()
        for i, item in enumerate(items):
            item["ref_chosen_logps"], item["ref_rejected_logps"] = logps[i], logps[len(items) + i]
    ref_model.train(was_training)


class DPOTrainer(Trainer):
    """transformers Trainer with the DPO loss; batches come from DPOCollator (chosen half, rejected half)."""

    def __init__(self, *args, beta: float, ref_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta = beta
        self.ref_model = ref_model
        if ref_model is not None:
            ref_model.eval().requires_grad_(False).to(self.args.device)
        # our loss is a mean over pairs: let Trainer divide it for gradient accumulation
        self.model_accepts_loss_kwargs = False
        self._metrics: dict[str, list[float]] = defaultdict(list)

    @torch.no_grad()
    def _reference_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_chosen_logps" in inputs:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        args = (inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
        if self.ref_model is not None:
            logps = sequence_logps(self.ref_model, *args)
        else:  # LoRA: the policy with its adapter switched off is the starting policy
            with self.accelerator.unwrap_model(model).disable_adapter():
                logps = sequence_logps(model, *args)
        n = logps.shape[0] // 2
        return logps[:n], logps[n:]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logps = sequence_logps(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
        n = logps.shape[0] // 2
        chosen, rejected = logps[:n], logps[n:]
        ref_chosen, ref_rejected = self._reference_logps(model, inputs)
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen.to(chosen.dtype),
                                                            ref_rejected.to(chosen.dtype), self.beta)
        loss = losses.mean()
        metrics = {
            "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "logps/chosen": chosen, "logps/rejected": rejected,
        }
        if model.training:
            for k, v in metrics.items():
                self._metrics[k].append(self.accelerator.gather_for_metrics(v.detach()).mean().item())
        return (loss, metrics) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metrics:
            logs.update({k: sum(v) / len(v) for k, v in self._metrics.items()})
            self._metrics.clear()
        super().log(logs, start_time)


def _free(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, DPOTrainingArguments))
    model_args, data_args, args = parser.parse_args_into_dataclasses(args=argv)
    setup_logging(args)
    if not data_args.data_path:
        raise SystemExit("--data_path is required")
    transformers.set_seed(args.seed)

    tokenizer, template = load_tokenizer_and_template(model_args)
    try:
        records = load_dpo_records(data_args.data_path)
    except DataError as e:
        raise SystemExit(f"bad DPO data: {e}") from None
    records = records[: data_args.max_samples] if data_args.max_samples else records
    dataset, skipped = encode_dpo(records, tokenizer, template, args.model_max_length)
    if args.should_save:
        report_skipped(args.output_dir, data_args.data_path, len(records), skipped, log=logger.info)
    if not dataset:
        raise SystemExit(f"{data_args.data_path}: no usable pair (see {args.output_dir}/skipped_samples.json)")
    n_tok = sum(len(x["chosen_input_ids"]) + len(x["rejected_input_ids"]) for x in dataset)
    logger.info("DPO on %d pairs, %d tokens (chosen + rejected), beta=%g", len(dataset), n_tok, args.beta)

    collator = DPOCollator(tokenizer.pad_token_id)
    model = load_model(model_args.model_name_or_path, args)
    if args.disable_dropout:
        disable_dropout(model)
    ref_model, precompute_s = None, 0.0
    if args.precompute_ref_logps:
        start = time.perf_counter()
        ref = load_model(args.ref_model_name_or_path, args) if args.ref_model_name_or_path else model
        precompute_reference_logps(ref.to(args.device), dataset, collator, args.per_device_train_batch_size,
                                   args.device, bf16=args.bf16)
        if ref is not model:
            _free(ref)
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
    save_trained(trainer, tokenizer, template, model_args, args.output_dir)
    remove_checkpoints(trainer, args)
    if trainer.is_world_process_zero():
        write_summary(args.output_dir, pairs=len(dataset), tokens_per_epoch=n_tok, epochs=args.num_train_epochs,
                      train_runtime_s=result.metrics.get("train_runtime"), precompute_s=precompute_s,
                      precompute_ref_logps=args.precompute_ref_logps, train_loss=result.training_loss)
    logger.info("done: train_loss=%.4f in %.1fs", result.training_loss, result.metrics.get("train_runtime", 0.0))


if __name__ == "__main__":
    main(sys.argv[1:])
