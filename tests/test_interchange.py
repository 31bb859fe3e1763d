"""scripts.interchange: our records <-> TRL's conversational datasets (JSONL, a datasets folder), and ETO's official
file in. A round trip gives the trainers identical items; TRL's own trainers load the export and train the tokens
ours train (SFT), or split prompt and completion where ours start training (DPO)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_dataset, load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from trl.data_utils import is_conversational

from fastchat.conversation import TEMPLATES
from fastchat.records import pair_record, trajectory, write_json_atomic
from fastchat.train.data import IGNORE_INDEX, encode_dpo, encode_sft, load_dpo_records, load_sft_records
from scripts import convert_eto_sft, interchange
from tests.test_convert_eto_sft import eto_alfworld_record
from tests.test_train_data import sample

EXPERT_FILE = Path(__file__).resolve().parents[1] / "data" / "alfworld_sft.json"
TEMPLATE = TEMPLATES["chatml"]  # the tiny model's (fastchat.model.tiny)
MAX_LENGTH = 4096
# Our chatml template as a Jinja chat template with {% generation %} around what our trainers supervise in an
# assistant turn (its content and <|im_end|>): what TRL's assistant_only_loss reads (return_assistant_tokens_mask).
CHATML_TRAINING_JINJA = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}"
    "{% if not loop.last or add_generation_prompt %}{{ '\\n' }}{% endif %}"
    "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def experts() -> list[dict]:
    """A few records of the real expert data when it is there, else records of its shape."""
    if EXPERT_FILE.is_file():
        return json.loads(EXPERT_FILE.read_text(encoding="utf-8"))[:3]
    return [sample(f"task-{i}") for i in range(3)]


@pytest.fixture(scope="module")
def pairs(experts) -> list[dict]:
    """One record of each kind, with the extra fields the pair builders write, and one without "kind"."""
    first, second = (trajectory(r["conversations"]) for r in experts[:2])
    prompt = experts[0]["conversations"][:3]
    trajectory_pair = pair_record("t", "trajectory", prompt, first, trajectory(experts[1]["conversations"], 2),
                                  rule="outcome", chosen_reward=1.0, rejected_reward=0.0, rejected_cap_rounds=None)
    step_pair = pair_record("s", "step", prompt + first[:2], first[2:], second[2:], rule="step", step=1,
                            note="web text may hold\u2028line separators")
    no_kind = {k: v for k, v in pair_record("n", "trajectory", prompt, first, second).items() if k != "kind"}
    return [trajectory_pair, step_pair, pair_record("e", "sft", prompt, first), no_kind]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = CHATML_TRAINING_JINJA
    return tok


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def run(*args: str) -> int:
    return interchange.main([str(a) for a in args])


def exported(records: list[dict], tmp_path: Path, fmt: str, name: str) -> Path:
    source = tmp_path / f"{name}.json"
    write_json_atomic(source, records)
    out = tmp_path / (f"{name}.jsonl" if fmt == "jsonl" else name)
    assert run("export", "--input", source, "--output", out, "--format", fmt) == 0
    return out


def trl_rows(path: Path, tmp_path: Path):
    """The export as TRL users load it: datasets' JSON loader or load_from_disk."""
    if path.is_dir():
        return load_from_disk(str(path))
    return load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf-cache"))


def supervised(labels: list[int]) -> list[bool]:
    return [label != IGNORE_INDEX for label in labels]


@pytest.mark.parametrize("fmt", interchange.FORMATS)
def test_round_trip_gives_the_trainers_identical_items(experts, pairs, tokenizer, tmp_path, fmt):
    for name, records, load, encode in (("sft", experts, load_sft_records, encode_sft),
                                        ("pairs", pairs, load_dpo_records, encode_dpo)):
        back = tmp_path / f"{name}_back.json"
        assert run("import", "--input", exported(records, tmp_path, fmt, name), "--output", back,
                   "--format", fmt) == 0
        imported = load(back)  # the trainers accept it
        original_items, original_skipped = encode(records, tokenizer, TEMPLATE, MAX_LENGTH)
        items, skipped = encode(imported, tokenizer, TEMPLATE, MAX_LENGTH)
        assert len(original_items) == len(records) and not original_skipped and not skipped
        assert items == original_items  # input_ids and labels (and a pair's kind), token for token
        expected = [{"kind": "trajectory", **r} for r in records] if name == "pairs" else records
        if fmt == "jsonl":
            assert imported == expected
        else:  # every field comes back; an Arrow table adds, as null, the fields only other records have
            assert [{k: v for k, v in r.items() if k in e} for r, e in zip(imported, expected)] == expected
            assert all(r[k] is None for r, e in zip(imported, expected) for k in r.keys() - e.keys())


@pytest.mark.parametrize("fmt", interchange.FORMATS)
def test_trl_sft_trainer_trains_exactly_the_assistant_turns_we_train(experts, tokenizer, model, tmp_path, fmt):
    rows = trl_rows(exported(experts, tmp_path, fmt, "sft"), tmp_path)
    assert all(is_conversational(row) for row in rows)
    trainer = SFTTrainer(model=model, train_dataset=rows, processing_class=tokenizer, args=SFTConfig(
        output_dir=str(tmp_path / "sft-out"), assistant_only_loss=True, max_length=None, use_cpu=True, bf16=False,
        report_to="none"))
    ours, _ = encode_sft(experts, tokenizer, TEMPLATE, MAX_LENGTH)
    for trl_item, our_item in zip(trainer.train_dataset, ours, strict=True):
        assert trl_item["input_ids"] == our_item["input_ids"]
        assert trl_item["labels"] == our_item["labels"]  # "OK" and every agent turn; no prompt, no observation


@pytest.mark.parametrize("fmt", interchange.FORMATS)
def test_trl_dpo_trainer_starts_the_completion_where_we_start_training(pairs, tokenizer, model, tmp_path, fmt):
    rows = trl_rows(exported(pairs, tmp_path, fmt, "pairs"), tmp_path).filter(lambda row: row["kind"] != "sft")
    assert all(is_conversational(row) for row in rows)
    trainer = DPOTrainer(model=model, train_dataset=rows, processing_class=tokenizer, args=DPOConfig(
        output_dir=str(tmp_path / "dpo-out"), max_length=None, use_cpu=True, bf16=False, report_to="none"))
    ours, _ = encode_dpo([p for p in pairs if p.get("kind") != "sft"], tokenizer, TEMPLATE, MAX_LENGTH)
    trains_observations = False
    for row, trl_item, our_item in zip(rows, trainer.train_dataset, ours, strict=True):
        for side in ("chosen", "rejected"):
            ids = trl_item["prompt_ids"] + trl_item[f"{side}_ids"]
            assert ids == our_item[f"{side}_input_ids"]
            in_completion = [i >= len(trl_item["prompt_ids"]) for i in range(len(ids))]
            assistant = tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=True, return_dict=True,
                                                      return_assistant_tokens_mask=True)["assistant_masks"]
            # ours: the assistant tokens of TRL's completion (the prompt's "OK" and expert steps are not in it)
            assert supervised(our_item[f"{side}_labels"]) == [c and a for c, a in zip(in_completion, assistant)]
            trains_observations |= not all(a for c, a in zip(in_completion, assistant) if c)
    assert trains_observations  # TRL's DPO loss also covers the observations between agent turns (docs say so)


def test_trl_sft_trainer_trains_an_sft_record_of_a_pair_file_as_we_do(pairs, tokenizer, model, tmp_path):
    rows = trl_rows(exported(pairs, tmp_path, "jsonl", "pairs"), tmp_path).filter(lambda row: row["kind"] == "sft")
    rows = rows.select_columns(["prompt", "chosen"]).rename_column("chosen", "completion")
    trainer = SFTTrainer(model=model, train_dataset=rows, processing_class=tokenizer, args=SFTConfig(
        output_dir=str(tmp_path / "sft-out"), assistant_only_loss=True, max_length=None, use_cpu=True, bf16=False,
        report_to="none"))
    ours, _ = encode_dpo([p for p in pairs if p.get("kind") == "sft"], tokenizer, TEMPLATE, MAX_LENGTH)
    assert len(ours) == 1
    for trl_item, our_item in zip(trainer.train_dataset, ours, strict=True):
        assert trl_item["input_ids"] == our_item["chosen_input_ids"]
        assert trl_item["labels"] == our_item["chosen_labels"]


def test_etos_official_file_imports_as_the_converter_converts_it(tmp_path):
    official = tmp_path / "eto_alfworld_sft.json"
    official.write_text(json.dumps([eto_alfworld_record(["go to sinkbasin 1", "go to microwave 1"])]))
    assert run("import", "--format", "eto", "--task", "alfworld", "--input", official,
               "--output", tmp_path / "imported.json") == 0
    convert_eto_sft.convert_file("alfworld", official, tmp_path / "converted.json")
    imported = load_sft_records(tmp_path / "imported.json")
    assert imported == json.loads((tmp_path / "converted.json").read_text())
    rows = trl_rows(exported(imported, tmp_path, "jsonl", "sft"), tmp_path)
    assert [m["content"] for m in rows[0]["messages"] if m["role"] == "assistant"] == \
        ["OK", "Thought: step 0.\nAction: go to sinkbasin 1", "Thought: step 1.\nAction: go to microwave 1"]


def break_row(path: Path, index: int, change) -> None:
    rows = [json.loads(line) for line in path.read_text().split("\n") if line]
    change(rows[index])
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize("name, change, field", [
    ("sft", lambda row: row.pop("messages"), "field 'messages'"),
    ("sft", lambda row: row["messages"][2].update(role="system"), "field 'messages': message 2"),
    ("sft", lambda row: row["messages"][0].pop("content"), "field 'messages': message 0"),
    ("pairs", lambda row: row.update(rejected=None), "field 'rejected'"),
    ("pairs", lambda row: row.update(kind="best"), "field 'kind'"),
    ("pairs", lambda row: row["chosen"][0].update(role="gpt"), "field 'chosen': message 0"),
])
def test_a_bad_row_is_refused_naming_the_file_record_and_field(experts, pairs, tmp_path, capsys, name, change,
                                                                field):
    path = exported(experts if name == "sft" else pairs, tmp_path, "jsonl", name)
    break_row(path, 1, change)
    assert run("import", "--input", path, "--output", tmp_path / "back.json") == 1
    err = capsys.readouterr().err
    assert f"{path}: record 1 (id=" in err and field in err
    assert not (tmp_path / "back.json").exists()


@pytest.mark.parametrize("change, field", [
    (lambda r: r.update(chosen=r["prompt"]), "field 'chosen' must start with a 'gpt' turn"),
    (lambda r: r.pop("prompt"), "field 'prompt'"),
    (lambda r: r["rejected"][0].update({"from": "system"}), "field 'rejected'"),
])
def test_a_bad_record_is_not_exported_naming_the_file_record_and_field(pairs, tmp_path, capsys, change, field):
    records = json.loads(json.dumps(pairs))
    change(records[1])
    source = tmp_path / "pairs.json"
    write_json_atomic(source, records)
    assert run("export", "--input", source, "--output", tmp_path / "pairs.jsonl") == 1
    assert f"{source}: record 1 (id='s'): {field}" in capsys.readouterr().err
    assert not (tmp_path / "pairs.jsonl").exists()
