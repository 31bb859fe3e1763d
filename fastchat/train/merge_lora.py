"""Merge a LoRA adapter saved by `--lora --no_merge` into its base model.

    python -m fastchat.train.merge_lora --base models/SmolLM2-135M-Instruct \\
        --adapter outputs/webshop-sft --output_dir outputs/webshop-sft-merged

The merged folder holds the full weights, the tokenizer and eto_template.txt, ready for serving.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from fastchat.model.portable import make_portable


def merge(base: str, adapter: str, output_dir: str) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastchat.conversation import TEMPLATE_FILE

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    out = Path(output_dir)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(out)
    make_portable(out)
    if (Path(adapter) / TEMPLATE_FILE).is_file():
        shutil.copy(Path(adapter) / TEMPLATE_FILE, out / TEMPLATE_FILE)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the base model the adapter was trained on")
    p.add_argument("--adapter", required=True, help="folder written by train/train_dpo with --lora --no_merge")
    p.add_argument("--output_dir", required=True)
    a = p.parse_args(argv)
    print(f"merged model written to {merge(a.base, a.adapter, a.output_dir)}")


if __name__ == "__main__":
    main()
