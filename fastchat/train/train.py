"""Supervised fine-tuning on agent trajectories, with loss on the assistant (gpt) turns only.

    python -m fastchat.train.train \\
        --model_name_or_path models/SmolLM2-135M-Instruct --data_path data/webshop_sft.json \\
        --output_dir outputs/webshop-sft --num_train_epochs 3 --per_device_train_batch_size 4 \\
        --gradient_accumulation_steps 4 --learning_rate 2e-5 --lr_scheduler_type cosine --warmup_ratio 0.03 \\
        --model_max_length 2048 [--bf16] [--gradient_checkpointing] [--lora --lora_r 8] \\
        [--deepspeed fastchat/train/configs/zero2.json]

Multi-GPU: `torchrun --nproc_per_node 8 -m fastchat.train.train ... --deepspeed fastchat/train/configs/zero3.json`
or `accelerate launch --config_file fastchat/train/configs/fsdp.yaml -m fastchat.train.train ...`.
All transformers TrainingArguments flags are accepted. Writes the model, tokenizer, eto_template.txt,
trainer_state.json (loss log) and skipped_samples.json to --output_dir.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal

from transformers import Trainer

from fastchat.train.common import (
    EtoTrainingArguments,
    apply_lora,
    finish_training,
    load_model,
    logger,
    save_trained,
    start_training,
    train_resuming,
)
from fastchat.train.data import SFTCollator, encode_sft, load_sft_records
from fastchat.train.packing import supervised_token_logps


@dataclass
class SFTTrainingArguments(EtoTrainingArguments):
    loss_normalization: Literal["micro_batch", "global_tokens"] = field(default="micro_batch", metadata={
        "help": "how a step's loss weighs tokens under gradient accumulation and several ranks. micro_batch (the "
                "original's, transformers 4.37): the mean over micro-batches of each micro-batch's mean per "
                "supervised token, a micro-batch being --per_device_train_batch_size sequences on one rank; "
                "global_tokens (transformers >= 4.46): the sum over all supervised tokens of the step, accumulated "
                "micro-batches and ranks together, divided by their count, so every token weighs the same"})


class SFTTrainer(Trainer):
    """transformers' Trainer with the step loss of --loss_normalization. micro_batch keeps the model from seeing
    `num_items_in_batch`: each micro-batch's loss is then its own token mean and Trainer divides it by the number
    of accumulated micro-batches before backward (DDP, FSDP and DeepSpeed average the ranks' gradients), as
    Trainer 4.37 did. global_tokens leaves transformers' own normalisation by the step's token count."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.loss_normalization == "micro_batch":
            self.model_accepts_loss_kwargs = False


class PackedSFTTrainer(SFTTrainer):
    """Loss from packed batches with the LM head at supervised positions only: the value transformers' causal-LM
    loss gives on the same batch padded. A packed batch holds the same sequences as the padded one (the collator
    packs each micro-batch the sampler hands out), so the micro-batch means are the same too."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logps, _ = supervised_token_logps(model, inputs)
        if num_items_in_batch is None:  # micro_batch
            loss = -logps.mean()
        else:  # global_tokens: the count covers the accumulated micro-batches (and every rank, below)
            loss = -logps.sum() / num_items_in_batch
            if self.args.average_tokens_across_devices:  # DDP averages gradients over the ranks
                loss = loss * self.accelerator.num_processes
        return (loss, {}) if return_outputs else loss


def sft_trainer_class(args: SFTTrainingArguments) -> type[SFTTrainer]:
    return PackedSFTTrainer if args.padding_free else SFTTrainer


def main(argv: list[str] | None = None) -> None:
    prepared = start_training(argv, SFTTrainingArguments, lambda path, args: load_sft_records(path), encode_sft,
                              "training data", "sample")
    args, dataset, tokenizer = prepared.args, prepared.dataset, prepared.tokenizer
    n_sup = sum(sum(t != -100 for t in x["labels"]) for x in dataset)
    n_tok = sum(len(x["input_ids"]) for x in dataset)
    logger.info("SFT on %d samples, %d tokens, %d supervised (assistant) tokens", len(dataset), n_tok, n_sup)

    model = load_model(prepared.model_args.model_name_or_path, args)
    if prepared.model_args.lora:
        model = apply_lora(model, prepared.model_args, args)
    collator = SFTCollator(tokenizer.pad_token_id, packed=args.padding_free)
    trainer = sft_trainer_class(args)(model=model, args=args, train_dataset=dataset, data_collator=collator,
                            processing_class=tokenizer)
    result = train_resuming(trainer, args)
    trainer.save_state()
    save_trained(trainer, tokenizer, prepared.template, prepared.model_args, args.output_dir)
    finish_training(trainer, args, result, samples=len(dataset), tokens_per_epoch=n_tok, supervised_tokens=n_sup,
                    **collator.work_stats())


if __name__ == "__main__":
    main(sys.argv[1:])
