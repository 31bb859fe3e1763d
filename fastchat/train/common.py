"""Flags, model loading, LoRA and saving shared by the SFT and DPO trainers."""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
from transformers.trainer_utils import SaveStrategy

from fastchat.constants import default_model_path
from fastchat.conversation import save_template_name, template_for_model
from fastchat.model.portable import make_portable
from fastchat.records import write_json_atomic
from fastchat.reporting import Progress, missing_writers, wandb_offline_unless_asked
from fastchat.train.data import DataError, report_skipped

logger = logging.getLogger("fastchat.train")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default_factory=lambda: str(default_model_path()),
                                    metadata={"help": "model folder (default: the embedded SmolLM2-135M-Instruct)"})
    conv_template: str | None = field(default=None, metadata={
        "help": "chat template name (chatml, smollm2, llama-2, vicuna_v1.1, ... or 'hf'); default: the model "
                "folder's eto_template.txt, then the model's name, then the tokenizer's own template"})
    use_fast_tokenizer: Literal["auto", "true", "false"] = field(default="auto", metadata={
        "help": "the tokenizer: false is the original's slow one (transformers 4.37's LlamaTokenizer, SentencePiece in "
                "Python; Llama-style folders with tokenizer.model only), true the fast one (tokenizers), auto the slow "
                "one where it tokenizes differently from the fast one (Llama-style SentencePiece) and the fast one "
                "where both give the same ids (byte-level BPE, e.g. the default model): bench/tokenizer_agreement.py"})
    lora: bool = field(default=False, metadata={"help": "train a LoRA adapter (peft) instead of all weights"})
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: str = field(default="all-linear", metadata={"help": "comma list or 'all-linear'"})
    merge: bool = field(default=True, metadata={
        "help": "with --lora, save the merged model (--no_merge saves the adapter; merge later with "
                "python -m fastchat.train.merge_lora)"})


@dataclass
class DataArguments:
    data_path: str = field(default=None, metadata={"help": "training data (JSON list)"})
    max_samples: int | None = field(default=None, metadata={"help": "use only the first N records"})


@dataclass
class EtoTrainingArguments(transformers.TrainingArguments):
    """transformers' TrainingArguments with FastChat-style additions and CPU-safe defaults."""

    model_max_length: int = field(default=2048, metadata={
        "help": "sequences are cut from the right to this many tokens"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "linear warmup over this fraction of steps"})
    save_strategy: SaveStrategy | str = field(default="no", metadata={
        "help": "checkpoint strategy during training: no, steps, epoch (the final model is always saved)"})
    logging_steps: float = 10
    remove_unused_columns: bool = False
    resume: bool = field(default=True, metadata={
        "help": "continue from the last complete checkpoint-* in --output_dir when there is one (--no_resume: start "
                "over); checkpoints are written with --save_strategy steps --save_steps N"})
    keep_checkpoints: bool = field(default=False, metadata={
        "help": "keep the checkpoint-* folders once the final model is saved (default: delete them)"})
    padding_free: bool = field(default=True, metadata={
        "help": "pack each batch into one row without padding and compute the LM head only where a token is "
                "supervised; --no_padding_free restores padded batches with the full-vocabulary head (same loss, "
                "more time and memory; kept for comparison)"})

    def __post_init__(self):
        if self.deepspeed:
            check_deepspeed()
        if not torch.cuda.is_available():
            if self.bf16 or self.fp16:
                logger.warning("no CUDA GPU: training in fp32 (ignoring --bf16/--fp16; bf16 matmuls are very slow "
                               "on CPU)")
            self.bf16 = self.fp16 = False
            self.dataloader_pin_memory = False
            # without it transformers never sets up CPU DDP: under torchrun every rank would train alone on all data
            self.use_cpu = True
        if self.warmup_ratio and not self.warmup_steps:
            self.warmup_steps = self.warmup_ratio  # transformers reads a float < 1 as a ratio of all steps
        super().__post_init__()
        if missing := missing_writers(self.report_to):
            raise SystemExit("\n".join(missing))
        if "wandb" in self.report_to:
            wandb_offline_unless_asked()


def check_deepspeed() -> None:
    """DeepSpeed is optional and imported lazily; say clearly what is missing."""
    if importlib.util.find_spec("deepspeed") is None:
        raise SystemExit("--deepspeed was given but DeepSpeed is not installed. It needs CUDA GPUs: "
                         "`pip install deepspeed` on a GPU machine, or drop --deepspeed to train without it "
                         "(on CPU, plain fp32 training).")
    if not torch.cuda.is_available():
        raise SystemExit("--deepspeed was given but no CUDA GPU is visible; the trainers use DeepSpeed on GPUs only "
                         "(on CPU it gains nothing). Drop --deepspeed to train on CPU.")


def zero3_gathered(model):
    """Under ZeRO-3, from_pretrained shards every weight across the ranks and only a DeepSpeed engine gathers them for
    a forward; a pass outside one (the reference log-probs before training) needs them gathered for its duration
    (the whole model on each rank). Elsewhere a no-op. Collective: every rank must enter it."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()))


def prepare_reference(ref_model, trainer: transformers.Trainer):
    """A frozen reference model for forwards during training. Under ZeRO-3 it is sharded like the policy, so it is
    wrapped in a DeepSpeed engine of its own (no optimizer), which gathers each layer's weights as it runs."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    ref_model.eval().requires_grad_(False)
    if not is_deepspeed_zero3_enabled():
        return ref_model.to(trainer.args.device)
    import deepspeed

    config = copy.deepcopy(trainer.accelerator.state.deepspeed_plugin.deepspeed_config)
    hidden = ref_model.config.hidden_size
    # transformers fills these "auto" sizes only when training starts; the same values it will use
    sizes = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
             "stage3_param_persistence_threshold": 10 * hidden}
    for key, value in sizes.items():
        if config["zero_optimization"].get(key) == "auto":
            config["zero_optimization"][key] = value
    engine, *_ = deepspeed.initialize(model=ref_model, config=config)
    engine.eval()  # DeepSpeedEngine.eval() returns None
    return engine


def setup_logging(args: transformers.TrainingArguments) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()


SPIECE_UNDERLINE = "\u2581"


def without_dummy_prefix(proto: bytes) -> bytes:
    """A SentencePiece model with normalizer_spec.add_dummy_prefix = false, as transformers 4.37 loads it for
    legacy=False, edited in protobuf's wire format (no protobuf package needed): the normalizer spec is the model's
    field 3 (a message), the flag its field 3 (a varint), and a scalar field given twice takes the last value."""
    def varint(data: bytes, i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = data[i]
            value, shift, i = value | (byte & 0x7F) << shift, shift + 7, i + 1
            if byte < 0x80:
                return value, i

    def encode_varint(value: int) -> bytes:
        out = bytearray()
        while True:
            out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
            value >>= 7
            if not value:
                return bytes(out)

    out, i = bytearray(), 0
    while i < len(proto):
        key, j = varint(proto, i)
        wire = key & 7
        if wire == 0:
            end = varint(proto, j)[1]
        elif wire == 2:
            length, start = varint(proto, j)
            end = start + length
            if key >> 3 == 3:  # normalizer_spec: append add_dummy_prefix (field 3, varint) = 0
                body = proto[start:end] + b"\x18\x00"
                out += proto[i:j] + encode_varint(len(body)) + body
                i = end
                continue
        else:
            end = j + (8 if wire == 1 else 4)
        out += proto[i:end]
        i = end
    return bytes(out)


class SlowLlamaTokenizer(SentencePieceBackend):
    """transformers 4.37's LlamaTokenizer, the original's `use_fast=False` tokenizer for Llama-2, which transformers 5
    no longer has: SentencePiece run in Python on the text between special tokens (split out first, never stripped),
    BOS added in front. With legacy=False (as Llama-2 folders set it) the model has no dummy prefix: the text gets a
    "\u2581" in front once, and a piece after a special token none. Tokens carry no offsets: fastchat.train.data
    places them on the text."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, legacy=True, add_bos_token=True, add_eos_token=False, unk_token="<unk>",
                 bos_token="<s>", eos_token="</s>", **kwargs):
        kwargs.pop("special_tokens_pattern", None)
        pattern = {(True, False): "bos", (True, True): "bos_eos", (False, True): "eos"}.get(
            (add_bos_token, add_eos_token), "none")
        # loaded as legacy (the stored model); legacy=False's model without dummy prefix is set below
        super().__init__(vocab_file=vocab_file, legacy=True, unk_token=unk_token, bos_token=bos_token,
                         eos_token=eos_token, add_bos_token=add_bos_token, add_eos_token=add_eos_token,
                         special_tokens_pattern=pattern, **kwargs)
        self.legacy = legacy
        self.init_kwargs["legacy"] = legacy
        if not legacy:
            self.sp_model.LoadFromSerializedProto(without_dummy_prefix(self.sp_model.serialized_model_proto()))

    def tokenize(self, text, **kwargs) -> list[str]:
        if self.legacy or not text:
            return super().tokenize(text, **kwargs)
        tokens = super().tokenize(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "), **kwargs)
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.all_special_tokens:
            tokens = tokens[1:]
        return tokens

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """SentencePiece decodes the pieces between special tokens (byte fallback included), as 4.37 did."""
        if tokens and tokens[0].startswith(SPIECE_UNDERLINE):
            tokens = [tokens[0][1:], *tokens[1:]]
        out, pieces, prev_special = "", [], False
        for i, token in enumerate(tokens):
            if token in self.all_special_tokens:
                if not prev_special and i and self.legacy:
                    out += " "
                out, pieces, prev_special = out + self.sp_model.decode(pieces) + token, [], True
            else:
                pieces.append(token)
                prev_special = False
        return out + self.sp_model.decode(pieces)


def has_slow_tokenizer(path) -> bool:
    """A Llama-style SentencePiece folder (tokenizer.model, a Llama tokenizer class): SlowLlamaTokenizer reads it."""
    config = Path(path) / "tokenizer_config.json"
    if not ((Path(path) / "tokenizer.model").is_file() and config.is_file()):
        return False
    return (json.loads(config.read_text()).get("tokenizer_class") or "").removesuffix("Fast") == "LlamaTokenizer"


def load_tokenizer(path, use_fast: str = "auto"):
    """The slow tokenizer where the original's (use_fast=False) tokenizes differently from the fast one, else the
    fast one (`--use_fast_tokenizer`), as measured against transformers 4.37 by bench/tokenizer_agreement.py. Byte-
    level BPE (the default model): the same ids and labels slow and fast on every expert conversation. Llama-style
    SentencePiece: 4.37's fast tokenizer puts a "\u2581" after a special token where the legacy=False slow one puts
    none, and transformers 5's fast one, though it agrees on the templated expert data, differs on other text (a
    leading space, a space after a special token)."""
    slow = has_slow_tokenizer(path) if use_fast == "auto" else use_fast == "false"
    if not slow:
        return AutoTokenizer.from_pretrained(path)
    if not has_slow_tokenizer(path):
        raise SystemExit(f"--use_fast_tokenizer false: {path} has no slow tokenizer we can load (only Llama-style "
                         "SentencePiece folders, with tokenizer.model, have one here; transformers 5 has no other "
                         "slow tokenizer). Use --use_fast_tokenizer auto or true.")
    return SlowLlamaTokenizer.from_pretrained(path)


def load_tokenizer_and_template(model_args: ModelArguments):
    path = model_args.model_name_or_path
    if not Path(path).is_dir():
        raise SystemExit(f"--model_name_or_path {path}: no such model folder (models are never downloaded here)")
    tokenizer = load_tokenizer(path, model_args.use_fast_tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = template_for_model(path, model_args.conv_template, tokenizer)
    logger.info("chat template: %s; tokenizer: %s (%s)", template.name, type(tokenizer).__name__,
                "fast" if tokenizer.is_fast else "slow")
    return tokenizer, template


def return_freed_memory_to_os() -> None:
    """Have glibc map every block of 1 MiB or more on its own, so that a freed activation goes back to the OS. By
    default glibc raises that threshold to the largest block freed so far (up to 32 MiB); activations then come from
    its heap and stay there once freed. With --gradient_checkpointing, SFT of the default model on 2 x 2,048 tokens
    peaked at 4.9 GB RSS that way and at 2.9 GB this way, for ~10% more CPU time (page faults)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD; setting it also stops glibc's dynamic adjustment


def load_model(path: str, args: EtoTrainingArguments):
    """Weights in fp32 (on GPU, --bf16 autocasts; DeepSpeed keeps fp32 master weights itself)."""
    if args.gradient_checkpointing:  # the user trades time for memory: in the allocator too
        return_freed_memory_to_os()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    if args.padding_free:
        from fastchat.train.packing import PACKED_ATTENTION

        model.set_attn_implementation(PACKED_ATTENTION)
    return model


def apply_lora(model, model_args: ModelArguments, args: EtoTrainingArguments):
    from peft import LoraConfig, get_peft_model

    targets = model_args.lora_target_modules
    config = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                        target_modules=targets if targets == "all-linear" else targets.split(","),
                        task_type="CAUSAL_LM")
    if args.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed frozen embeddings would otherwise cut the graph
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    return model


def last_complete_checkpoint(output_dir) -> str | None:
    """The newest checkpoint-N in output_dir that was written to the end (its trainer_state.json is saved last)."""
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    complete = [p for p in folders if (p / "trainer_state.json").is_file()]
    return str(max(complete, key=lambda p: int(p.name.split("-")[-1]))) if complete else None


class StepProgress(transformers.TrainerCallback):
    """Optimizer steps done/total with the time left (fastchat.reporting.Progress), and the logged numbers, in place
    of transformers' ProgressCallback, whose tqdm bar written to a stage log is one line per step redrawn."""

    def __init__(self):
        self.progress: Progress | None = None
        self.step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.step = state.global_step  # where a resumed run starts
            self.progress = Progress(state.max_steps, "training", "steps", initial=self.step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(state.global_step - self.step)
            self.step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is not None:
            shown = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in logs.items() if k != "total_flos"}
            self.progress.write(str(shown))

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.close()
            self.progress = None


def train_resuming(trainer: transformers.Trainer, args: EtoTrainingArguments):
    """trainer.train(), continuing from --resume_from_checkpoint or, with --resume, the last complete checkpoint
    (model, optimizer, scheduler, RNG states and the position in the data order). Progress is reported by
    StepProgress (unless --disable_tqdm, which keeps transformers' plain log printer)."""
    if trainer.pop_callback(transformers.trainer_callback.ProgressCallback) is not None:
        trainer.add_callback(StepProgress())
    checkpoint = args.resume_from_checkpoint
    if checkpoint is None and args.resume:
        checkpoint = last_complete_checkpoint(args.output_dir)
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    cpu = time.process_time()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    # CPU seconds of all this process's threads: with other load on the machine, a steadier measure than wall time
    result.metrics["train_cpu_s"] = time.process_time() - cpu
    return result


def close_distributed() -> None:
    """Tear the process group down before the interpreter exits: left to exit-time destructors, a rank sometimes
    aborted after training had finished ("terminate called without an active exception", seen in a 2-rank run)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def remove_checkpoints(trainer: transformers.Trainer, args: EtoTrainingArguments) -> None:
    """Once the final model is saved the checkpoints are only disk space, unless --keep_checkpoints."""
    if args.keep_checkpoints or not trainer.is_world_process_zero():
        return
    for folder in Path(args.output_dir).glob("checkpoint-*"):
        shutil.rmtree(folder, ignore_errors=True)


def save_trained(trainer: transformers.Trainer, tokenizer, template, model_args: ModelArguments, output_dir) -> None:
    """Save a loadable model folder: weights (merged LoRA by default), tokenizer, eto_template.txt."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    out = Path(output_dir)
    model = trainer.model
    merge = model_args.lora and model_args.merge
    if merge and is_deepspeed_zero3_enabled():
        logger.warning("LoRA under ZeRO-3: saving the adapter; merge it with fastchat.train.merge_lora")
        merge = False
    if merge:
        merged = trainer.accelerator.unwrap_model(model).merge_and_unload()
        if trainer.is_world_process_zero():
            merged.save_pretrained(out)
    else:
        trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        if tokenizer.is_fast:
            tokenizer.save_pretrained(out)
        else:  # SlowLlamaTokenizer would name a class only this code knows: keep the base folder's tokenizer files
            base = Path(model_args.model_name_or_path)
            for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (base / name).is_file():
                    shutil.copyfile(base / name, out / name)
        make_portable(out)
        save_template_name(out, template)
        if model_args.lora and not merge:
            logger.info("saved the LoRA adapter to %s; merge it into a full model with:\n  python -m "
                        "fastchat.train.merge_lora --base %s --adapter %s --output_dir %s-merged",
                        out, model_args.model_name_or_path, out, out)
        else:
            logger.info("saved the model, tokenizer and chat template name to %s", out)


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process, and peak CUDA memory allocated when on GPU (MiB)."""
    import resource

    mem = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    if torch.cuda.is_available():
        mem["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return mem


def write_summary(output_dir, **fields) -> None:
    """<output_dir>/train_summary.json: sizes, timings and peak memory of the run."""
    write_json_atomic(Path(output_dir) / "train_summary.json", {**fields, **peak_memory()})


@dataclass
class TrainingStart:
    """What every trainer has before it loads its model: its arguments, tokenizer, chat template, the records of
    its data file and their encodings (the usable ones)."""

    model_args: ModelArguments
    data_args: DataArguments
    args: EtoTrainingArguments
    tokenizer: Any
    template: Any
    records: list[dict]
    dataset: list[dict]


def start_training(argv: list[str] | None, training_arguments: type[EtoTrainingArguments],
                   load_records: Callable[[str, EtoTrainingArguments], list[dict]], encode: Callable,
                   data_kind: str, unit: str, check: Callable[[ModelArguments, EtoTrainingArguments], None] = None,
                   ) -> TrainingStart:
    """The trainers' common start: parse the arguments, log, `check` them, seed, load the tokenizer and chat
    template, read the data file (a bad one stops with "bad <data_kind>: <file and record>"), encode it (samples
    that cannot be trained on are listed in <output_dir>/skipped_samples.json) and stop when no <unit> is usable."""
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, training_arguments))
    model_args, data_args, args = parser.parse_args_into_dataclasses(args=argv)
    setup_logging(args)
    if not data_args.data_path:
        raise SystemExit("--data_path is required")
    if check is not None:
        check(model_args, args)
    transformers.set_seed(args.seed)
    tokenizer, template = load_tokenizer_and_template(model_args)
    try:
        records = load_records(data_args.data_path, args)
    except DataError as e:
        raise SystemExit(f"bad {data_kind}: {e}") from None
    records = records[: data_args.max_samples] if data_args.max_samples else records
    dataset, skipped = encode(records, tokenizer, template, args.model_max_length)
    if args.should_save:
        report_skipped(args.output_dir, data_args.data_path, len(records), skipped, log=logger.info)
    if not dataset:
        raise SystemExit(f"{data_args.data_path}: no usable {unit} (see {args.output_dir}/skipped_samples.json)")
    return TrainingStart(model_args, data_args, args, tokenizer, template, records, dataset)


def finish_training(trainer: transformers.Trainer, args: EtoTrainingArguments, result, **summary) -> None:
    """The trainers' common end, once the model is saved: remove the checkpoints, write train_summary.json (the
    trainer's `summary` fields and the epochs, times, loss and peak memory every trainer reports) and close the
    process group."""
    remove_checkpoints(trainer, args)
    if trainer.is_world_process_zero():
        write_summary(args.output_dir, **summary, epochs=args.num_train_epochs,
                      train_runtime_s=result.metrics.get("train_runtime"), train_cpu_s=result.metrics["train_cpu_s"],
                      train_loss=result.training_loss, padding_free=args.padding_free)
    logger.info("done: train_loss=%.4f in %.1fs", result.training_loss, result.metrics.get("train_runtime", 0.0))
    close_distributed()
