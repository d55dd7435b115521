"""Reading raw rows from the sources tether accepts.

A source is a path to a ``.jsonl`` (one JSON object per line), ``.json`` (a JSON array of
objects), ``.csv`` (a header row, then one row per example) or ``.parquet`` file, a Python list of
dicts, a HuggingFace ``datasets.Dataset``, or a string naming one split of a HuggingFace dataset:
a ``save_to_disk`` directory, a hub-format directory or a cached hub id ``org/name``, optionally
followed by ``:SPLIT`` or ``:CONFIG:SPLIT`` (see :mod:`tether.data.hf`). Reading never stops at
the first bad row: rows that cannot be parsed become ``Problem``s, so the loader reports them
together with the field problems of the rows that could.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from tether.data.errors import DataError, Problem, describe
from tether.data.hf import load_resolved, resolve_source

if TYPE_CHECKING:
    from datasets import Dataset

Source = Union[str, os.PathLike, Sequence[Mapping[str, Any]], "Dataset"]
"""What ``load_*_dataset`` accepts: a file path, a HuggingFace dataset source string (a
``save_to_disk`` or hub-format directory, a cached hub id; ``:SPLIT`` / ``:CONFIG:SPLIT``), a list
of dicts, or a ``datasets.Dataset``."""

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
"""File extensions tether reads (matched case-insensitively)."""


@dataclass(frozen=True)
class RawRow:
    """One row as read: its 0-based row number, its 1-based line (JSONL only), its fields."""

    index: int
    line: int | None
    fields: Mapping[str, Any]


@dataclass
class RawSource:
    """The rows that could be read, and the problems met reading the others.

    ``name`` is how errors refer to the source: the file path, ``"<list>"`` or ``"<Dataset>"``.
    """

    name: str
    rows: list[RawRow] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def read_source(source: Source) -> RawSource:
    """Read every row of ``source``.

    Raises:
        FileNotFoundError: the path does not exist (and is not spelled like a hub id).
        DataError: the file cannot be read at all (unknown extension, not UTF-8, not JSON or
            Parquet at all), or it holds no rows; a directory is not a dataset; a hub id is not
            in the local cache; the split asked for does not exist.
        TypeError: ``source`` is none of the accepted kinds.
    """
    if isinstance(source, (str, os.PathLike)):
        resolved = resolve_source(os.fspath(source), SUFFIXES)
        if resolved.kind == "file":
            raw = _read_file(Path(resolved.path))
        else:
            raw = RawSource(resolved.name)
            for i, fields in enumerate(load_resolved(resolved)):
                raw.rows.append(RawRow(i, None, fields))
    elif isinstance(source, (list, tuple)):
        raw = RawSource("<list>")
        for i, fields in enumerate(source):
            _add_row(raw, i, None, fields, "a dict")
    else:
        raw = RawSource("<Dataset>")
        for i, fields in enumerate(_dataset_rows(source)):
            raw.rows.append(RawRow(i, None, fields))
    if not raw.rows and not raw.problems:
        raise DataError(raw.name, [Problem("the source holds no rows")])
    return raw


def check_source(option: str, value: str | os.PathLike) -> None:
    """Check, before any model loads, that ``value`` names a source :func:`read_source` can read:
    an existing data file with a known extension, a ``save_to_disk`` or hub-format dataset
    directory, or a hub id in the local cache, with the config and split it names. Reads
    metadata only, never the rows.

    Raises:
        tether.runs.ConfigError: naming ``option`` and ``value``, and what was expected.
    """
    from tether.runs.config import ConfigError  # deferred: the config layer sits above data

    text = os.fspath(value)
    try:
        resolved = resolve_source(text, SUFFIXES)
    except FileNotFoundError as e:
        raise ConfigError(f"{option}: {e}") from None
    except DataError as e:
        raise ConfigError(f"{option}: {text!r}: {_one_line(e)}") from None
    suffix = Path(resolved.path).suffix
    if resolved.kind == "file" and suffix.lower() not in SUFFIXES:
        raise ConfigError(
            f"{option}: {text!r}: unsupported file extension {suffix!r}; expected one of "
            f"{SUFFIXES}, a dataset directory, or a cached hub id org/name"
        )


def _one_line(error: DataError) -> str:
    """A DataError's problems, without the source header, on one line."""
    return "; ".join(str(p) for p in error.problems)


def _add_row(raw: RawSource, index: int, line: int | None, fields: Any, expected: str) -> None:
    """Keep ``fields`` as row ``index`` if it is a mapping, else record a problem."""
    if isinstance(fields, Mapping):
        raw.rows.append(RawRow(index, line, fields))
    else:
        raw.problems.append(Problem(f"expected {expected}, got {describe(fields)}", index, line))


def _dataset_rows(source: Any) -> Any:
    """The rows of a ``datasets.Dataset``; a clear ``TypeError`` for anything else."""
    import datasets  # deferred: importing ``datasets`` costs about a second

    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise TypeError(
            f"got a {type(source).__name__} with splits {sorted(source)}; pass one split, "
            "e.g. ds['train']"
        )
    raise TypeError(
        "source must be a path to a "
        + "/".join(SUFFIXES)
        + f" file, a list of dicts, or a datasets.Dataset; got {type(source).__name__}"
    )


def _read_file(path: Path) -> RawSource:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(
            str(path),
            [Problem(f"unsupported file extension {path.suffix!r}; expected one of {SUFFIXES}")],
        )
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist or is not a file")
    raw = RawSource(str(path))
    try:
        if suffix == ".jsonl":
            _read_jsonl(path, raw)
        elif suffix == ".json":
            _read_json(path, raw)
        elif suffix == ".csv":
            _read_csv(path, raw)
        else:
            _read_parquet(path, raw)
    except UnicodeDecodeError as e:
        raise DataError(raw.name, [Problem(f"not UTF-8 text: {e}")]) from None
    return raw


def _read_jsonl(path: Path, raw: RawSource) -> None:
    """One JSON object per line; blank lines are skipped and take no row number."""
    index = 0
    with path.open(encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as e:
                raw.problems.append(
                    Problem(f"malformed JSON: {e.msg} at column {e.colno}", index, line_no)
                )
            else:
                _add_row(raw, index, line_no, fields, "a JSON object")
            index += 1


def _read_json(path: Path, raw: RawSource) -> None:
    """A JSON array of objects."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (one object per line? name the file .jsonl)" if e.msg == "Extra data" else ""
        raise DataError(
            raw.name, [Problem(f"malformed JSON: {e.msg} at column {e.colno}{hint}", line=e.lineno)]
        ) from None
    if not isinstance(data, list):
        raise DataError(
            raw.name, [Problem(f"expected a JSON array of objects, got {describe(data)}")]
        )
    for i, fields in enumerate(data):
        _add_row(raw, i, None, fields, "a JSON object")


def _read_csv(path: Path, raw: RawSource) -> None:
    """A header row naming the columns, then one row per example; every value is a string."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        duplicates = sorted({name for name in header if header.count(name) > 1})
        if duplicates:
            raise DataError(raw.name, [Problem(f"the header repeats columns {duplicates}")])
        for i, fields in enumerate(reader):
            extra = fields.pop(None, None)  # values beyond the header
            n_values = sum(v is not None for v in fields.values()) + len(extra or ())
            if n_values != len(header):
                raw.problems.append(
                    Problem(f"expected {len(header)} values (one per column), got {n_values}", i)
                )
            else:
                raw.rows.append(RawRow(i, None, fields))


def _read_parquet(path: Path, raw: RawSource) -> None:
    import pyarrow as pa  # deferred: only Parquet needs it
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(raw.name, [Problem(f"not a readable Parquet file: {e}")]) from None
    for i, fields in enumerate(table.to_pylist()):
        raw.rows.append(RawRow(i, None, fields))
