"""Every source kind reads the same rows: JSONL, JSON, CSV, Parquet files, lists, Datasets,
save_to_disk and hub-layout directories, hub ids in the local cache (filled by the real download
code against a local fake Hub), with ``:SPLIT`` / ``:CONFIG:SPLIT``; sources that cannot be read
fail with the source's name in the error, and before any model loads."""

from __future__ import annotations

import csv
import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers.fake_hub import fake_hub_online, use_tmp_hf_cache
from tether.data import DataError, load_preference_dataset, load_prompt_dataset
from tether.data.hf import SourceSpec, parse_source
from tether.data.sources import check_source
from tether.models.tiny import tiny_tokenizer
from tether.runs.config import ConfigError

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


# --- HuggingFace dataset sources: save_to_disk and hub-format directories, cached hub ids ---

PROMPTS = [{"prompt": r["prompt"]} for r in STANDARD]
TEST_PAIRS = [{"prompt": "Up is", "chosen": " up.", "rejected": " down."}]


@pytest.fixture(autouse=True)
def tmp_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every HuggingFace cache in tmp, offline: no test reads or fills the user's cache."""
    home = tmp_path / "hf-home"
    use_tmp_hf_cache(monkeypatch, home)
    return home


def save_dict(path: Path, splits: dict[str, Rows]) -> Path:
    datasets.DatasetDict(
        {name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}
    ).save_to_disk(str(path))
    return path


def parquet_bytes(rows: Rows) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def hub_files(splits: dict[str, Rows]) -> dict[str, bytes]:
    """A dataset repository as ``push_to_hub`` lays it out: a card, one Parquet shard a split."""
    files = {"README.md": b"---\nlicense: mit\n---\n# A test dataset\n"}
    for split, rows in splits.items():
        files[f"data/{split}-00000-of-00001.parquet"] = parquet_bytes(rows)
    return files


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


def test_parse_source() -> None:
    assert parse_source("org/name") == SourceSpec("org/name")
    assert parse_source("org/name:test") == SourceSpec("org/name", None, "test")
    assert parse_source("data/dir:cfg:validation") == SourceSpec("data/dir", "cfg", "validation")
    assert parse_source("a:b/dir") == SourceSpec("a:b/dir")  # colons before the last '/'
    for bad in ("dir:", ":test", "dir:a:b:c", "dir::test"):
        with pytest.raises(DataError, match="expected SOURCE, SOURCE:SPLIT or SOURCE:CONFIG"):
            parse_source(bad)


def test_an_existing_path_wins_over_the_split_syntax(tmp_path: Path) -> None:
    path = save_dict(tmp_path / "odd:name", {"train": PROMPTS})
    assert parse_source(str(path)) == SourceSpec(str(path))
    assert [e.prompt for e in load_prompt_dataset(path, TOK)] == [r["prompt"] for r in PROMPTS]


@pytest.mark.parametrize("rows", [STANDARD, CONVERSATIONAL], ids=["standard", "conversational"])
def test_saved_dataset_and_dataset_dict(tmp_path: Path, rows: Rows) -> None:
    expected = load_preference_dataset(rows, TOK)
    one = tmp_path / "one"
    datasets.Dataset.from_list(rows).save_to_disk(str(one))
    ds = load_preference_dataset(one, TOK)
    assert ds.examples == expected.examples and ds.source == str(one)
    both = save_dict(tmp_path / "both", {"train": rows, "test": TEST_PAIRS})
    ds = load_preference_dataset(str(both), TOK)  # no split named: train
    assert ds.examples == expected.examples and ds.source == f"{both}:train"
    ds = load_preference_dataset(f"{both}:test", TOK)
    assert ds.examples == load_preference_dataset(TEST_PAIRS, TOK).examples
    assert ds.source == f"{both}:test"


def test_saved_prompts_and_the_only_split(tmp_path: Path) -> None:
    only = save_dict(tmp_path / "only", {"validation": PROMPTS})  # one split, not 'train'
    ds = load_prompt_dataset(only, TOK)
    assert [e.prompt for e in ds] == [r["prompt"] for r in PROMPTS]
    assert ds.source == f"{only}:validation"
    assert ds.fingerprint() == load_prompt_dataset(PROMPTS, TOK).fingerprint()


def test_split_errors(tmp_path: Path) -> None:
    both = save_dict(tmp_path / "both", {"train": PROMPTS, "test": PROMPTS})
    with pytest.raises(
        DataError, match=r"has no split 'dev'; its splits are \['train', 'test'\]"
    ) as err:
        load_prompt_dataset(f"{both}:dev", TOK)
    assert err.value.source == f"{both}:dev"
    no_train = save_dict(tmp_path / "no-train", {"a": PROMPTS, "b": PROMPTS})
    with pytest.raises(DataError, match=r"no 'train' split; name one of its splits \['a', 'b'\]"):
        load_prompt_dataset(no_train, TOK)
    one = tmp_path / "one"
    datasets.Dataset.from_list(PROMPTS).save_to_disk(str(one))
    with pytest.raises(DataError, match="a saved Dataset .* has no splits"):
        load_prompt_dataset(f"{one}:train", TOK)
    with pytest.raises(DataError, match="a split applies only to a dataset directory"):
        load_prompt_dataset(f"{write_jsonl(tmp_path / 'p.jsonl', PROMPTS)}:train", TOK)


def test_bad_rows_of_a_saved_dataset_are_named(tmp_path: Path) -> None:
    rows = [dict(r) for r in STANDARD]
    rows[1]["chosen"] = None
    rows[2]["prompt"] = ""
    path = save_dict(tmp_path / "bad", {"train": STANDARD, "test": rows})
    with pytest.raises(DataError) as err:
        load_preference_dataset(f"{path}:test", TOK)
    assert str(err.value).startswith(f"{path}:test: 2 problems in the data\n")
    assert [(p.row, p.field) for p in err.value.problems] == [(1, "chosen"), (2, "prompt")]
    assert "row 1, field 'chosen': expected a non-empty string" in str(err.value)


@pytest.mark.parametrize("layout", ["parquet shards", "jsonl per split"])
def test_hub_format_directory(tmp_path: Path, layout: str) -> None:
    splits = {"train": STANDARD, "validation": TEST_PAIRS}
    if layout == "parquet shards":
        root = write_tree(tmp_path / "repo", hub_files(splits))
    else:
        root = tmp_path / "repo"
        root.mkdir()
        for split, rows in splits.items():
            write_jsonl(root / f"{split}.jsonl", rows)
    ds = load_preference_dataset(root, TOK)
    assert ds.examples == load_preference_dataset(STANDARD, TOK).examples
    assert ds.source == f"{root}:train"
    ds = load_preference_dataset(f"{root}:validation", TOK)
    assert ds.examples == load_preference_dataset(TEST_PAIRS, TOK).examples
    with pytest.raises(DataError, match=r"no split 'test'; its splits are \['train', 'valid"):
        load_preference_dataset(f"{root}:test", TOK)


def test_hub_format_directory_with_configs(tmp_path: Path) -> None:
    """A README ``configs:`` block: CONFIG:SPLIT picks the files of one config."""
    card = textwrap.dedent(
        """\
        ---
        configs:
        - config_name: easy
          data_files:
          - split: train
            path: easy/train.jsonl
          - split: test
            path: easy/test.jsonl
        - config_name: hard
          data_files:
          - split: train
            path: hard/*.jsonl
        ---
        """
    ).encode()
    lines = {
        k: "".join(json.dumps(r) + "\n" for r in v)
        for k, v in {
            "easy/train.jsonl": PROMPTS[:1],
            "easy/test.jsonl": PROMPTS[1:2],
            "hard/0.jsonl": PROMPTS[2:],
        }.items()
    }
    root = write_tree(
        tmp_path / "cfg", {"README.md": card, **{k: v.encode() for k, v in lines.items()}}
    )

    def prompts(source: str) -> list[str]:
        return [e.prompt for e in load_prompt_dataset(source, TOK)]

    assert prompts(f"{root}:easy:test") == [PROMPTS[1]["prompt"]]
    assert prompts(f"{root}:hard:train") == [PROMPTS[2]["prompt"]]
    with pytest.raises(DataError, match="has no config 'medium'"):
        load_prompt_dataset(f"{root}:medium:train", TOK)
    with pytest.raises(
        DataError,
        match=r"several configs and no default one; name one as .*cfg:CONFIG:SPLIT "
        r"\(available configs: \['easy', 'hard'\]\)",
    ):
        load_prompt_dataset(root, TOK)
    (root / "README.md").write_bytes(
        card.replace(b"- config_name: hard", b"- config_name: hard\n  default: true")
    )
    assert prompts(str(root)) == [PROMPTS[2]["prompt"]]  # the default config, split train


def test_a_directory_that_is_no_dataset(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        DataError, match="(?s)empty: .*neither a saved dataset .* nor a dataset in the hub layout"
    ):
        load_prompt_dataset(tmp_path / "empty", TOK)
    with pytest.raises(FileNotFoundError, match="'.*missing-dir' not found"):
        load_prompt_dataset(tmp_path / "missing-dir", TOK)


def test_a_hub_id_not_in_the_cache(tmp_hf_cache: Path) -> None:
    with pytest.raises(DataError) as err:
        load_prompt_dataset("someone/not-downloaded:test", TOK)
    msg = str(err.value)
    assert msg.startswith("someone/not-downloaded: 1 problem")
    assert "is not in the local HuggingFace cache" in msg
    assert f"looked in {tmp_hf_cache / 'hub'} and {tmp_hf_cache / 'datasets'}" in msg
    assert "hf download someone/not-downloaded --repo-type dataset" in msg
    assert "huggingface-cli download --repo-type dataset someone/not-downloaded" in msg
    assert ".save_to_disk(" in msg


def test_a_hub_id_downloaded_with_hf_download(
    monkeypatch: pytest.MonkeyPatch, tmp_hf_cache: Path
) -> None:
    """The hub cache as ``hf download`` fills it (the real ``snapshot_download`` against a local
    fake Hub), read offline: ``datasets`` 4+/5 alone cannot, it reads only its own cache when
    offline."""
    from huggingface_hub import scan_cache_dir, snapshot_download

    files = hub_files({"train": STANDARD, "test": TEST_PAIRS})
    with fake_hub_online(monkeypatch, "org/pairs", files):
        snapshot = snapshot_download("org/pairs", repo_type="dataset")
    assert Path(snapshot).is_relative_to(tmp_hf_cache / "hub" / "datasets--org--pairs")
    assert [r.repo_id for r in scan_cache_dir().repos] == ["org/pairs"]  # a real cache entry

    ds = load_preference_dataset("org/pairs", TOK)
    assert ds.examples == load_preference_dataset(STANDARD, TOK).examples
    assert ds.source == "org/pairs:train"
    ds = load_preference_dataset("org/pairs:test", TOK)
    assert ds.examples == load_preference_dataset(TEST_PAIRS, TOK).examples
    with pytest.raises(DataError, match=r"no split 'dev'; its splits are \['train', 'test'\]"):
        load_preference_dataset("org/pairs:dev", TOK)
    check_source("train_data", "org/pairs:test")


def test_a_hub_id_prepared_by_load_dataset(
    monkeypatch: pytest.MonkeyPatch, tmp_hf_cache: Path
) -> None:
    """The datasets cache as an online ``datasets.load_dataset("org/name")`` fills it, read
    offline even with the hub cache gone."""
    import shutil

    with fake_hub_online(monkeypatch, "org/prompts", hub_files({"train": PROMPTS})) as hub:
        datasets.load_dataset("org/prompts")
        assert any("/resolve/" in r for r in hub.requests)
    assert (tmp_hf_cache / "datasets" / "org___prompts").is_dir()
    shutil.rmtree(tmp_hf_cache / "hub")
    ds = load_prompt_dataset("org/prompts", TOK)
    assert [e.prompt for e in ds] == [r["prompt"] for r in PROMPTS]
    assert ds.source == "org/prompts:train"
    with pytest.raises(DataError, match=r"no split 'test'; its splits are \['train'\]"):
        load_prompt_dataset("org/prompts:test", TOK)


def test_check_source_reads_no_rows_and_names_the_option(tmp_path: Path) -> None:
    both = save_dict(tmp_path / "both", {"train": PROMPTS, "test": PROMPTS})
    (tmp_path / "empty").mkdir()
    check_source("prompts", str(both))
    check_source("eval_prompts", f"{both}:test")
    check_source("prompts", write_jsonl(tmp_path / "p.jsonl", PROMPTS))
    cases = {
        f"{both}:dev": "has no split 'dev'",
        str(tmp_path / "empty"): "a directory that is neither a saved dataset",
        str(tmp_path / "missing"): "not found",
        "org/absent": "not in the local HuggingFace cache",
        str(tmp_path / "p.jsonl") + ":train": "a split applies only to",
    }
    for value, fragment in cases.items():
        with pytest.raises(ConfigError) as err:
            check_source("eval_prompts", value)
        msg = str(err.value)
        assert msg.startswith("eval_prompts: ") and repr(value) in msg and fragment in msg, msg
        assert "\n" not in msg
    (tmp_path / "notes.txt").write_text("x\n")
    with pytest.raises(ConfigError, match=r"unsupported file extension '\.txt'"):
        check_source("prompts", tmp_path / "notes.txt")


def test_trainer_configs_are_checked_before_any_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tether.train.common import check_input_files
    from tether.train.dpo import DPOConfig
    from tether.train.grpo import GRPOConfig

    saved = save_dict(tmp_path / "pairs", {"train": STANDARD, "test": TEST_PAIRS})
    check_input_files(DPOConfig(train_data=str(saved), eval_data=f"{saved}:test"))
    with pytest.raises(ConfigError, match=r"^eval_data: '.*pairs:dev': .*no split 'dev'"):
        check_input_files(DPOConfig(train_data=str(saved), eval_data=f"{saved}:dev"))
    with pytest.raises(ConfigError, match=r"^train_data: 'org/absent': .*not in the local"):
        check_input_files(DPOConfig(train_data="org/absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^prompts: '.*empty': a directory that is neither"):
        check_input_files(GRPOConfig(prompts=str(tmp_path / "empty")))


def test_bon_checks_its_prompts_before_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tether.cli import main

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before the mistake was found")

    monkeypatch.setattr("tether.models.load_policy", refuse)
    monkeypatch.setattr("tether.models.loading.load_policy", refuse)
    saved = save_dict(tmp_path / "prompts", {"train": PROMPTS})
    argv = ["bon", "--model", "tiny", "--reward", "length", "--prompts", f"{saved}:test"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--prompts: " in err and "no split 'test'; its splits are ['train']" in err, err


def test_dpo_trains_on_a_saved_dataset_dict(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end: DPO with train_data a save_to_disk directory and eval_data its ':test'
    split trains exactly as on the same rows as JSONL files, and learns the preference."""
    from tether.runs import read_metrics
    from tether.train.dpo import DPOConfig, train

    words = ["film", "plot", "cast", "story"]
    rows = [
        {
            "prompt": f"Review {i}: the {words[i % 4]} was",
            "chosen": f" good, {words[(i * 3) % 4]} good",
            "rejected": f" bad, {words[(i * 5) % 4]} bad",
        }
        for i in range(40)
    ]
    train_rows, test_rows = rows[:32], rows[32:]
    saved = save_dict(tmp_path / "prefs", {"train": train_rows, "test": test_rows})
    files = (
        write_jsonl(tmp_path / "train.jsonl", train_rows),
        write_jsonl(tmp_path / "test.jsonl", test_rows),
    )

    def losses(name: str, train_data: str, eval_data: str) -> tuple[list[float], list[float]]:
        monkeypatch.setenv("TETHER_CACHE", str(tmp_path / f"cache-{name}"))
        cfg = DPOConfig(
            model=str(tiny_dir),
            train_data=train_data,
            eval_data=eval_data,
            output_dir=str(tmp_path / name),
            learning_rate=3e-3,
            lr_scheduler="constant",
            batch_size=8,
            max_steps=3,
            logging_steps=1,
            eval_steps=3,
            save_steps=3,
            beta=0.5,
            max_length=64,
            max_prompt_length=32,
            seed=1,
            eval_generate=False,
        )
        train(cfg)
        metrics = read_metrics(tmp_path / name)
        return (
            [r["loss"] for r in metrics if "loss" in r],
            [r["eval/loss"] for r in metrics if "eval/loss" in r],
        )

    from_saved = losses("saved", str(saved), f"{saved}:test")
    from_files = losses("files", str(files[0]), str(files[1]))
    assert from_saved == from_files  # the same rows, in the same order, give the same run
    train_losses, eval_losses = from_saved
    assert len(train_losses) == 3 and len(eval_losses) >= 1
    assert train_losses[0] == pytest.approx(0.6931, abs=0.02)  # π = π_ref at the start: ln 2
    assert train_losses[-1] < 0.3 and eval_losses[-1] < 0.3  # it learned the preference
