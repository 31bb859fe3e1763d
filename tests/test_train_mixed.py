"""Mixed DPO batches (trajectory pairs, step pairs, SFT samples): the loss is the weighted sum of each kind's loss
computed on its own, live or with precomputed references, packed or padded; malformed kinds are refused."""
from __future__ import annotations

import json

import pytest
import torch

from fastchat.conversation import TEMPLATES
from fastchat.train.data import DataError, DPOCollator, encode_dpo, load_dpo_records
from fastchat.train.train_dpo import DPOTrainer, DPOTrainingArguments, precompute_reference_logps
from tests.test_train_dpo import BETA, make_pairs, plain_dpo_loss, setup  # noqa: F401 (setup: the shared fixture)

WEIGHTS = {"trajectory": 1.0, "step": 0.5, "sft": 0.25}


def mixed_records() -> tuple[list[dict], list[dict], list[dict]]:
    trajectory = make_pairs(2)
    # a step pair: the prompt runs on into the expert's first step; the sides differ from the second step on
    base = make_pairs(3)[2]
    step = [{"id": "s0", "kind": "step", "prompt": base["prompt"] + base["chosen"][:2], "chosen": base["chosen"][2:],
             "rejected": base["rejected"][2:3]}]
    sft = [{"id": f"e{i}", "kind": "sft", "prompt": p["prompt"], "chosen": p["chosen"]} for i, p in
           enumerate(make_pairs(4)[2:])]
    return trajectory, step, sft


def sft_nll(model, tokenizer, records) -> float:
    """Mean over samples of transformers' own mean token loss on each sample's chosen turns."""
    encoded, _ = encode_dpo(records, tokenizer, TEMPLATES["chatml"], max_length=256)
    losses = []
    with torch.no_grad():
        for x in encoded:
            out = model(input_ids=torch.tensor([x["chosen_input_ids"]]), labels=torch.tensor([x["chosen_labels"]]))
            losses.append(out.loss.item())
    return sum(losses) / len(losses)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_mixed_batch_loss_is_the_weighted_sum_of_each_kinds_loss(setup, packed, tmp_path):  # noqa: F811
    tokenizer, policy, ref, _, _, _ = setup
    trajectory, step, sft = mixed_records()
    records = [sft[0], trajectory[0], step[0], sft[1], trajectory[1]]  # kinds interleaved in one batch
    dataset, skipped = encode_dpo(records, tokenizer, TEMPLATES["chatml"], max_length=256)
    assert not skipped and [x["kind"] for x in dataset] == [2, 0, 1, 2, 0]
    args = DPOTrainingArguments(output_dir=str(tmp_path), beta=BETA, report_to="none",
                                trajectory_weight=WEIGHTS["trajectory"], step_weight=WEIGHTS["step"],
                                sft_weight=WEIGHTS["sft"])
    collator = DPOCollator(tokenizer.pad_token_id, packed=packed)
    trainer = DPOTrainer(model=policy, args=args, train_dataset=dataset, data_collator=collator, beta=BETA,
                         ref_model=ref)
    with torch.no_grad():
        loss, parts = trainer.compute_loss(policy, collator(dataset), return_outputs=True)

    separate = {"trajectory": plain_dpo_loss(policy, ref, tokenizer, TEMPLATES["chatml"], trajectory),
                "step": plain_dpo_loss(policy, ref, tokenizer, TEMPLATES["chatml"], step),
                "sft": sft_nll(policy, tokenizer, sft)}
    for kind, value in separate.items():
        assert parts[f"loss/{kind}"].item() == pytest.approx(value, abs=1e-5)
    assert loss.item() == pytest.approx(sum(WEIGHTS[k] * v for k, v in separate.items()), abs=1e-5)
    assert parts["rewards/margins"].shape == (3,)  # one per pair; SFT samples have none

    # precomputed references: the same loss, without a reference model
    precomputed = [dict(x) for x in dataset]
    precompute_reference_logps(ref, precomputed, collator, batch_size=2, device=torch.device("cpu"))
    assert ["ref_rejected_logps" in x for x in precomputed] == [False, True, True, False, True]
    alone = DPOTrainer(model=policy, args=args, train_dataset=precomputed, data_collator=collator, beta=BETA)
    with torch.no_grad():
        assert alone.compute_loss(policy, collator(precomputed)).item() == pytest.approx(loss.item(), abs=1e-5)


def test_a_batch_of_sft_samples_alone_trains_on_the_lm_loss(setup, tmp_path):  # noqa: F811
    tokenizer, policy, ref, _, _, _ = setup
    _, _, sft = mixed_records()
    dataset, _ = encode_dpo(sft, tokenizer, TEMPLATES["chatml"], max_length=256)
    args = DPOTrainingArguments(output_dir=str(tmp_path), beta=BETA, report_to="none", sft_weight=2.0)
    collator = DPOCollator(tokenizer.pad_token_id, packed=True)
    trainer = DPOTrainer(model=policy, args=args, train_dataset=dataset, data_collator=collator, beta=BETA,
                         ref_model=ref)
    with torch.no_grad():
        loss, parts = trainer.compute_loss(policy, collator(dataset), return_outputs=True)
    assert set(k for k in parts if k.startswith("loss/")) == {"loss/sft"}
    assert loss.item() == pytest.approx(2.0 * sft_nll(policy, tokenizer, sft), abs=1e-5)


@pytest.mark.parametrize("record, message", [
    ({"kind": "bogus"}, "field 'kind' must be one of trajectory, step, sft"),
    ({"kind": "step", "rejected": None}, "'rejected'"),
])
def test_malformed_kinds_are_refused_naming_the_record(tmp_path, record, message):
    trajectory, _, sft = mixed_records()
    bad = {**trajectory[0], **record}
    if record.get("rejected", "") is None:
        del bad["rejected"]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([sft[0], bad]))
    with pytest.raises(DataError, match=message) as e:
        load_dpo_records(path)
    assert str(path) in str(e.value) and "record 1" in str(e.value)
    path.write_text(json.dumps(sft))  # SFT samples need no rejected side
    assert len(load_dpo_records(path)) == 2
