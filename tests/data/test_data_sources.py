"""Every source kind reads the same rows: JSONL, JSON, CSV, Parquet files, lists, Datasets; and
sources that cannot be read fail with the source's name in the error."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tether.data import DataError, load_preference_dataset, load_prompt_dataset
from tether.models.tiny import tiny_tokenizer

TOK = tiny_tokenizer()

STANDARD = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"prompt": "Héllo, ", "chosen": "world", "rejected": "moon\n"},
    {"prompt": "1, 2,", "chosen": " 3", "rejected": " 4"},
]
CONVERSATIONAL = [
    {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Bye."}],
    },
    {
        "prompt": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "2+2?"},
        ],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    },
]

Rows = list[dict[str, Any]]


def write_jsonl(path: Path, rows: Rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_json(path: Path, rows: Rows) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: Rows) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: Rows) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


FILE_WRITERS: dict[str, Callable[[Path, Rows], Path]] = {
    ".jsonl": write_jsonl,
    ".json": write_json,
    ".csv": write_csv,
    ".parquet": write_parquet,
}


def make_source(kind: str, tmp_path: Path, rows: Rows) -> Any:
    """The rows as a source of ``kind``: a file extension, "list" or "Dataset"."""
    if kind == "list":
        return [dict(r) for r in rows]
    if kind == "Dataset":
        return datasets.Dataset.from_list(rows)
    return FILE_WRITERS[kind](tmp_path / f"data{kind}", rows)


@pytest.mark.parametrize("kind", [".jsonl", ".json", ".csv", ".parquet", "list", "Dataset"])
def test_standard_preferences_round_trip(kind: str, tmp_path: Path) -> None:
    expected = load_preference_dataset(STANDARD, TOK)
    ds = load_preference_dataset(make_source(kind, tmp_path, STANDARD), TOK)
    assert ds.examples == expected.examples
    assert ds.fingerprint() == expected.fingerprint()
    assert ds.source == {"list": "<list>", "Dataset": "<Dataset>"}.get(
        kind, str(tmp_path / f"data{kind}")
    )


@pytest.mark.parametrize("kind", [".jsonl", ".json", ".parquet", "list", "Dataset"])
def test_conversational_preferences_round_trip(kind: str, tmp_path: Path) -> None:
    expected = load_preference_dataset(CONVERSATIONAL, TOK)
    ds = load_preference_dataset(make_source(kind, tmp_path, CONVERSATIONAL), TOK)
    assert ds.examples == expected.examples
    assert ds[1].prompt.startswith("<|im_start|>system\nBe terse.<|im_end|>\n")


@pytest.mark.parametrize("kind", [".jsonl", ".json", ".csv", ".parquet", "list", "Dataset"])
def test_prompts_round_trip(kind: str, tmp_path: Path) -> None:
    rows = [{"prompt": r["prompt"], "id": str(i)} for i, r in enumerate(STANDARD)]
    ds = load_prompt_dataset(make_source(kind, tmp_path, rows), TOK)
    assert [ex.prompt for ex in ds] == [r["prompt"] for r in STANDARD]
    assert [ex.index for ex in ds] == [0, 1, 2]
    assert ds.fingerprint() == load_prompt_dataset(rows, TOK).fingerprint()


def test_extension_is_case_insensitive_and_blank_jsonl_lines_skipped(tmp_path: Path) -> None:
    path = tmp_path / "DATA.JSONL"
    path.write_text('{"prompt": "a"}\n\n   \n{"prompt": "b"}\n', encoding="utf-8")
    ds = load_prompt_dataset(path, TOK)
    assert [(ex.index, ex.prompt) for ex in ds] == [(0, "a"), (1, "b")]
    assert load_prompt_dataset(str(path), TOK).examples == ds.examples


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError, match=r"(?s)prompts\.txt: .*unsupported file extension '\.txt'"):
        load_prompt_dataset(path, TOK)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_prompt_dataset(tmp_path / "nope.jsonl", TOK)


def test_unsupported_source_types() -> None:
    with pytest.raises(TypeError, match="got int"):
        load_prompt_dataset(42, TOK)  # type: ignore[arg-type]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "a"}])})
    with pytest.raises(TypeError, match=r"pass one split, e\.g\. ds\['train'\]"):
        load_prompt_dataset(splits, TOK)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "content"),
    [("empty.jsonl", "\n\n"), ("empty.json", "[]"), ("empty.csv", "prompt\n"), ("empty.csv", "")],
)
def test_empty_files_are_errors(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(
        DataError, match=rf"{name}: 1 problem in the data\n  the source holds no rows"
    ):
        load_prompt_dataset(path, TOK)


def test_empty_list_and_dataset_are_errors() -> None:
    with pytest.raises(DataError, match="(?s)<list>: .*holds no rows"):
        load_preference_dataset([], TOK)
    with pytest.raises(DataError, match="(?s)<Dataset>: .*holds no rows"):
        load_prompt_dataset(datasets.Dataset.from_dict({"prompt": []}), TOK)


def test_malformed_jsonl_lines_name_row_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b",}\n["not", "an object"]\n{"prompt": "c"}\n')
    with pytest.raises(DataError) as err:
        load_prompt_dataset(path, TOK)
    msg = str(err.value)
    assert msg.startswith(f"{path}: 2 problems in the data\n")
    assert "row 1 (line 3): malformed JSON: Expecting property name" in msg
    assert "row 2 (line 4): expected a JSON object, got a list of 2 items" in msg
    assert [(p.row, p.line) for p in err.value.problems] == [(1, 3), (2, 4)]


def test_malformed_json_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n {"prompt": "a"},\n {"prompt": }\n]')
    with pytest.raises(DataError, match=r"(?s)broken\.json: .*\n  line 3: malformed JSON"):
        load_prompt_dataset(path, TOK)
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    with pytest.raises(DataError, match=r"one object per line\? name the file \.jsonl"):
        load_prompt_dataset(path, TOK)
    path.write_text('{"prompt": "a"}')
    with pytest.raises(DataError, match=r"expected a JSON array of objects, got a dict"):
        load_prompt_dataset(path, TOK)
    path.write_text('[{"prompt": "a"}, "b"]')
    with pytest.raises(DataError, match=r"row 1: expected a JSON object, got str 'b'"):
        load_prompt_dataset(path, TOK)


def test_csv_rows_with_wrong_value_counts(tmp_path: Path) -> None:
    path = tmp_path / "ragged.csv"
    path.write_text("prompt,chosen,rejected\na,b,c\nd,e\nf,g,h,i\n")
    with pytest.raises(DataError) as err:
        load_preference_dataset(path, TOK)
    msg = str(err.value)
    assert "row 1: expected 3 values (one per column), got 2" in msg
    assert "row 2: expected 3 values (one per column), got 4" in msg
    path.write_text("prompt,prompt\na,b\n")
    with pytest.raises(DataError, match=r"the header repeats columns \['prompt'\]"):
        load_prompt_dataset(path, TOK)


def test_unreadable_files(tmp_path: Path) -> None:
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"(?s)junk\.parquet: .*not a readable Parquet file"):
        load_prompt_dataset(path, TOK)
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"(?s)latin1\.jsonl: .*not UTF-8 text"):
        load_prompt_dataset(path, TOK)
