"""Build a tiny random-weight Llama with a locally trained byte-level BPE tokenizer, or any model's architecture
with random weights from its config and tokenizer files alone.

    python -m fastchat.model.tiny --out models/tiny-llama [--corpus DIR] [--hidden 128 --layers 2 --vocab 4096]
    python -m fastchat.model.tiny --from-config models/SmolLM2-135M-Instruct --out /tmp/SmolLM2-135M-Instruct

Used by tests and the CI pipeline run: no hub access, a few million parameters,
ChatML special tokens and chat template, so serving and training code paths are
the same as with a real chat model. The tokenizer learns its merges from the text files
(*.txt, *.json) of the --corpus folders (the tests pass the agent's prompt folder) and a few
agent-style lines. Deterministic for a given corpus and seed.
"""
from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

from fastchat.conversation import TEMPLATES, save_template_name, template_for_model
from fastchat.model.portable import make_portable

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_JINJA = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def corpus_texts(folders: Sequence[str | Path] = ()) -> list[str]:
    """Text the tokenizer learns its merges from: the folders' text files plus a few agent-style lines."""
    texts = [p.read_text(encoding="utf-8") for folder in folders for p in sorted(Path(folder).rglob("*"))
             if p.suffix in (".txt", ".json")]
    texts.append("Thought: I should look around.\nAction: look around\nObservation: You see a table 1.\n"
                 "search[red shoes] click[buy now] go to drawer 1 take apple 1 from table 1 OK")
    return texts


def build_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=["<|im_start|>"], chat_template=CHATML_JINJA, model_max_length=4096,
    )


def build_tiny_model(out_dir: str | Path, hidden: int = 128, layers: int = 2, heads: int = 4,
                     vocab_size: int = 4096, max_positions: int = 4096, seed: int = 0,
                     corpus_dirs: Sequence[str | Path] = ()) -> Path:
    """The model and tokenizer in `out_dir`; the tokenizer is trained on corpus_texts(corpus_dirs)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(corpus_texts(corpus_dirs), vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    make_portable(out)
    save_template_name(out, TEMPLATES["chatml"])
    return out


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def build_from_config(config_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """The architecture of the model whose config.json and tokenizer files are in `config_dir`, with random weights
    (transformers' own initialisation, seeded), in `out_dir`: the folder's other files copied, weights ignored, the
    chat template it would be served with recorded (eto_template.txt). Nothing is downloaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, out = Path(config_dir), Path(out_dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json (a model folder's config and tokenizer files are needed)")
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.startswith("model.safetensors"):
            shutil.copy2(f, out / f.name)
    config = AutoConfig.from_pretrained(src)
    tokenizer = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    make_portable(out)
    save_template_name(out, template_for_model(src, tokenizer=tokenizer))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--from-config", metavar="DIR", help="random weights for this model folder's architecture, from "
                   "its config and tokenizer files (the other flags are ignored)")
    p.add_argument("--corpus", action="append", default=[], metavar="DIR",
                   help="train the tokenizer on this folder's *.txt and *.json files too (repeatable)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.from_config:
        print(f"random-weight model written to {build_from_config(a.from_config, a.out, a.seed)}")
        return
    out = build_tiny_model(a.out, a.hidden, a.layers, a.heads, a.vocab, seed=a.seed, corpus_dirs=a.corpus)
    print(f"tiny model written to {out}")


if __name__ == "__main__":
    main()
