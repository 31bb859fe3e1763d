"""Export our training data in the ecosystem's formats (TRL's conversational datasets), and import it back
(docs/data-formats.md).

    python -m scripts.interchange export --input data/alfworld_sft.json --output exports/alfworld_sft.jsonl
    python -m scripts.interchange export --input data/pairs.json --output exports/pairs --format datasets
    python -m scripts.interchange import --input exports/alfworld_sft.jsonl --output data/alfworld_sft.json
    python -m scripts.interchange import --input exports/pairs --output data/pairs.json --format datasets
    python -m scripts.interchange import --input eto_sft/alfworld_sft.json --output data/alfworld_sft.json \\
        --format eto --task alfworld

export: a file of trajectory records ({"id", "conversations", ...}: expert (SFT) data, episodes) becomes rows
{"messages", "id", ...} (TRL's conversational language-modeling format); a file of pair records ({"id", "kind",
"prompt", "chosen", "rejected", ...}, a DPO file) becomes rows {"prompt", "chosen", "rejected", "kind", "id", ...}
(TRL's conversational preference format; "rejected" is null for an sft record, "kind" is always written). Turns
become messages {"role": "user"|"assistant", "content"}; every other field of a record is kept as a column of the
same name. The input is validated as the trainers validate it (fastchat.train.data). What the trainers supervise
follows from the roles and the prompt/completion split: in a messages row every assistant message, in a pair
row the assistant messages of "chosen" and "rejected" (never the prompt's); the docs say how to make TRL do the
same.

import: the reverse, into our JSON list of records, from --format jsonl (one row a line), datasets (a
datasets.Dataset.save_to_disk folder) or eto (ETO's official expert file, ShareGPT "conversations": converted by
scripts.convert_eto_sft, which maps its ids and task text to ours; needs --task).

--format jsonl writes one JSON row a line, datasets a save_to_disk folder (Arrow: a field some records lack reads
back as null for them). Outputs are written atomically; errors name the file, the record and the field.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import datasets
import pyarrow

from fastchat.records import (
    ROLE_TO_FROM,
    RecordError,
    messages_to_turns,
    pair_record,
    record_where,
    trajectory_record,
    turns_to_messages,
    write_json_atomic,
    write_text_atomic,
)
from fastchat.train.data import load_dpo_records, load_json_list, load_sft_records
from scripts.convert_eto_sft import BENCHMARKS, convert_file

FORMATS = ("jsonl", "datasets")
PAIR_SIDES = ("prompt", "chosen", "rejected")


# -- export -----------------------------------------------------------------------------------------

def export_rows(path: Path) -> list[dict]:
    """The rows of a file of trajectory records (one with "conversations" first) or of pair records (one with
    "prompt" first), validated as the trainers validate them."""
    records = load_json_list(path)
    if not records:
        raise RecordError(f"{path}: no records")
    first = records[0] if isinstance(records[0], dict) else {}
    if "conversations" in first:
        return [{"messages": turns_to_messages(r["conversations"]),
                 **{k: v for k, v in r.items() if k != "conversations"}} for r in load_sft_records(path)]
    if "prompt" in first:
        return [{"prompt": turns_to_messages(r["prompt"]), "chosen": turns_to_messages(r["chosen"]),
                 "rejected": turns_to_messages(r["rejected"]) if "rejected" in r else None,
                 "kind": r.get("kind", "trajectory"), **{k: v for k, v in r.items() if k not in (*PAIR_SIDES, "kind")}}
                for r in load_dpo_records(path)]
    raise RecordError(f"{record_where(path, 0, first)}: has neither field 'conversations' (trajectory records) nor "
                      "'prompt' (pair records)")


def write_rows(rows: list[dict], out: Path, fmt: str, source: Path) -> None:
    if fmt == "jsonl":
        write_text_atomic(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        return
    columns = dict.fromkeys(k for row in rows for k in row)  # every row's fields (from_list takes the first's)
    try:
        dataset = datasets.Dataset.from_dict({k: [row.get(k) for row in rows] for k in columns})
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError) as e:
        raise RecordError(f"{source}: the records' fields cannot make one Arrow table ({e})") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        dataset.save_to_disk(staged)
        staged.chmod(0o755)  # mkdtemp makes it owner-only
        replaced = out.with_name(staged.name + ".old")
        if out.exists():
            out.rename(replaced)
        staged.rename(out)  # readers see the old folder or the new one, never half of one
        shutil.rmtree(replaced, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


# -- import -----------------------------------------------------------------------------------------

def read_rows(path: Path, fmt: str) -> list[dict]:
    if fmt == "datasets":
        if not (path / "state.json").is_file():
            raise RecordError(f"{path}: not a datasets.Dataset.save_to_disk folder (no state.json)")
        return datasets.load_from_disk(str(path)).to_list()
    if not path.is_file():
        raise RecordError(f"{path}: no such file")
    rows = []
    # split at "\n" only: str.splitlines() also splits at U+2028 and others, which JSON strings may hold as is
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}: line {n}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise RecordError(f"{path}: line {n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def to_turns(path: Path, index: int, row: dict, field: str) -> list[dict[str, str]]:
    """The turns of the message list row[field]; RecordError naming the file, record, field and message."""
    messages = row.get(field)
    where = f"{record_where(path, index, row)}: field {field!r}"
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"{where} must be a non-empty list of messages, got {str(messages)[:80]}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLE_TO_FROM or not isinstance(m.get("content"), str):
            raise RecordError(f"{where}: message {i} must be {{'role': 'user'|'assistant', 'content': str}}, "
                              f"got {str(m)[:120]}")
    return messages_to_turns(messages)


def import_records(path: Path, rows: list[dict]) -> list[dict]:
    """Our records from exported rows: trajectory records from "messages" rows, pair records from "prompt" rows."""
    if not rows:
        raise RecordError(f"{path}: no rows")
    pairs = "messages" not in rows[0]
    records = []
    for i, row in enumerate(rows):
        rest = {k: v for k, v in row.items() if k not in ("id", "messages", *PAIR_SIDES, "kind")}
        if not pairs:
            records.append(trajectory_record(row.get("id"), to_turns(path, i, row, "messages"), **rest))
            continue
        kind = row.get("kind") or "trajectory"
        rejected = None if kind == "sft" else to_turns(path, i, row, "rejected")
        try:
            records.append(pair_record(row.get("id"), kind, to_turns(path, i, row, "prompt"),
                                       to_turns(path, i, row, "chosen"), rejected, **rest))
        except ValueError as e:
            raise RecordError(f"{record_where(path, i, row)}: field 'kind': {e}") from None
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="direction", required=True)
    exp = sub.add_parser("export", help="our records -> TRL conversational rows")
    exp.add_argument("--input", required=True, type=Path, help="a JSON list of trajectory records or pair records")
    exp.add_argument("--output", required=True, type=Path, help="the .jsonl file or datasets folder to write")
    exp.add_argument("--format", choices=FORMATS, default="jsonl")
    imp = sub.add_parser("import", help="TRL conversational rows (or ETO's official file) -> our records")
    imp.add_argument("--input", required=True, type=Path, help="a .jsonl file, a datasets folder or ETO's file")
    imp.add_argument("--output", required=True, type=Path, help="the JSON list of records to write")
    imp.add_argument("--format", choices=(*FORMATS, "eto"), default="jsonl")
    imp.add_argument("--task", choices=BENCHMARKS, help="--format eto: the benchmark of ETO's file")
    a = p.parse_args(argv)
    if a.direction == "import" and (a.format == "eto") != (a.task is not None):
        p.error("--task goes with --format eto, and --format eto needs it")
    try:
        if a.direction == "export":
            rows = export_rows(a.input)
            write_rows(rows, a.output, a.format, a.input)
            print(f"exported {len(rows)} rows of {a.input} -> {a.output} ({a.format})")
        elif a.format == "eto":
            convert_file(a.task, a.input, a.output)
        else:
            records = import_records(a.input, read_rows(a.input, a.format))
            write_json_atomic(a.output, records, indent=None)
            print(f"imported {len(records)} records of {a.input} ({a.format}) -> {a.output}")
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
