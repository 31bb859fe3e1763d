"""What DPO did to the pairs it trained on: chosen / rejected log-probabilities before and after.

    python -m scripts.dpo_diagnostics --pairs outputs/run/pairs/iter1.json \\
        --before outputs/run/models/sft --after outputs/run/models/dpo_iter1 --out diag.json

For every pair: the summed log-probability of the chosen and rejected continuations (assistant tokens,
as in training) under the model before DPO (the reference) and after, the implicit reward margin
beta * ((after_c - before_c) - (after_r - before_r)) and whether it is positive. The summary holds the
means, the fraction of pairs with a positive margin, and the trainer's logged loss / margins /
accuracies per step (trainer_state.json of --after, when present). Output written atomically.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fastchat.conversation import template_for_model
from fastchat.records import write_json_atomic
from fastchat.train.data import DPOCollator, encode_dpo, load_dpo_records
from fastchat.train.train_dpo import sequence_logps


@torch.no_grad()
def pair_logps(model_dir: Path, dataset: list[dict], pad_id: int, batch_size: int) -> list[tuple[float, float]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    collator = DPOCollator(pad_id)
    out = []
    for start in range(0, len(dataset), batch_size):
        items = dataset[start:start + batch_size]
        batch = collator(items)
        logps = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).tolist()
        out += list(zip(logps[:len(items)], logps[len(items):]))
    return out


def trainer_log(model_dir: Path) -> list[dict]:
    path = model_dir / "trainer_state.json"
    if not path.exists():
        return []
    keep = ("step", "epoch", "loss", "learning_rate", "rewards/margins", "rewards/accuracies", "rewards/chosen",
            "rewards/rejected", "logps/chosen", "logps/rejected")
    return [{k: e[k] for k in keep if k in e} for e in json.loads(path.read_text()).get("log_history", [])
            if "loss" in e]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", required=True, type=Path)
    p.add_argument("--before", required=True, type=Path, help="the model DPO started from (its reference)")
    p.add_argument("--after", required=True, type=Path, help="the model DPO produced")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--model_max_length", type=int, default=4096)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(a.before)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    records = load_dpo_records(a.pairs)
    dataset, skipped = encode_dpo(records, tokenizer, template_for_model(a.before, None, tokenizer),
                                  a.model_max_length)
    skipped_at = {s.index for s in skipped}
    kept_ids = [r.get("id") for i, r in enumerate(records) if i not in skipped_at]
    before = pair_logps(a.before, dataset, tokenizer.pad_token_id, a.batch_size)
    after = pair_logps(a.after, dataset, tokenizer.pad_token_id, a.batch_size)
    rows = []
    for pid, (bc, br), (ac, ar) in zip(kept_ids, before, after):
        margin = a.beta * ((ac - bc) - (ar - br))
        rows.append({"id": pid, "before_chosen": bc, "before_rejected": br, "after_chosen": ac,
                     "after_rejected": ar, "margin": margin, "margin_positive": margin > 0})
    n = len(rows) or 1
    summary = {
        "pairs": len(rows), "skipped": len(skipped), "beta": a.beta,
        "mean_change_chosen": sum(r["after_chosen"] - r["before_chosen"] for r in rows) / n,
        "mean_change_rejected": sum(r["after_rejected"] - r["before_rejected"] for r in rows) / n,
        "mean_margin": sum(r["margin"] for r in rows) / n,
        "fraction_margin_positive": sum(r["margin_positive"] for r in rows) / n,
    }
    write_json_atomic(a.out, {"summary": summary, "pairs": rows, "trainer_log": trainer_log(a.after)})
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
