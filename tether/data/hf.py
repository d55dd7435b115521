"""HuggingFace dataset sources: saved datasets, hub-format directories, cached hub ids.

A source string names one split of a dataset::

    SOURCE              the split "train" (or the only split there is)
    SOURCE:SPLIT        that split
    SOURCE:CONFIG:SPLIT that split of that config (hub-format directories and hub ids)

where SOURCE is

- a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``;
- a directory in the HuggingFace hub layout (data files such as
  ``data/train-00000-of-00001.parquet`` or ``train.jsonl``, with or without a README.md
  ``configs:`` block), read with ``datasets.load_dataset(directory)``;
- a hub id ``org/name`` already in the local HuggingFace cache: a snapshot downloaded with
  ``hf download org/name --repo-type dataset`` (the hub cache, ``$HF_HUB_CACHE``), or a dataset
  an earlier ``datasets.load_dataset("org/name")`` prepared (the datasets cache,
  ``$HF_DATASETS_CACHE``).

Nothing here goes to the network: every ``datasets`` / ``huggingface_hub`` call runs in
offline mode, and a hub id that is not cached is an error saying how to download it. An
existing path always wins over the ``:SPLIT`` reading of the same string, and over a hub id.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from tether.data.errors import DataError, Problem

if TYPE_CHECKING:
    from datasets import Dataset

DEFAULT_SPLIT = "train"
"""The split a source without ``:SPLIT`` names (when the dataset has more than one)."""

SPLIT_SEPARATOR = ":"
"""Separates a source from its config and split: ``org/name:test``, ``dir:config:test``."""

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
"""``org/name`` as the hub spells repository ids (one slash, word characters, ``-`` and ``.``)."""

_SYNTAX = "expected SOURCE, SOURCE:SPLIT or SOURCE:CONFIG:SPLIT"


@dataclass(frozen=True)
class SourceSpec:
    """A source string taken apart: the path or hub id, and the config and split named after it
    (``None``: not named)."""

    base: str
    config: str | None = None
    split: str | None = None

    def __str__(self) -> str:
        return SPLIT_SEPARATOR.join(p for p in (self.base, self.config, self.split) if p)


@dataclass(frozen=True)
class ResolvedSource:
    """Where a dataset source's rows live, found without loading them.

    ``kind`` is ``"file"`` (a data file tether reads itself), ``"saved"`` (``save_to_disk``),
    ``"dir"`` (a hub-format directory) or ``"hub"`` (a cached hub id). ``path`` is what to load:
    the file, the directory, the cached snapshot directory, or the hub id itself when only the
    datasets cache holds it. ``split`` is the split to read (``None`` for a file and a single
    saved ``Dataset``).
    """

    kind: Literal["file", "saved", "dir", "hub"]
    spec: SourceSpec
    path: str
    split: str | None = None

    @property
    def name(self) -> str:
        """How errors name the source: the string as given, with the split read."""
        if self.kind == "file" or self.split is None:
            return self.spec.base
        return str(SourceSpec(self.spec.base, self.spec.config, self.split))


def parse_source(value: str) -> SourceSpec:
    """Split ``value`` into path-or-hub-id, config and split.

    An existing path is taken whole (a directory named ``a:b`` is a directory). Otherwise the
    colons in the last path component separate ``SOURCE[:CONFIG]:SPLIT``.

    Raises:
        DataError: more than two colons, or an empty part (``data:``, ``:test``).
    """
    if Path(value).exists():
        return SourceSpec(value)
    head, sep, tail = value.rpartition("/")
    name, *parts = tail.split(SPLIT_SEPARATOR)
    if not parts:
        return SourceSpec(value)
    if len(parts) > 2 or not name or not all(parts):
        raise DataError(value, [Problem(f"cannot read the source string: {_SYNTAX}")])
    config, split = (None, parts[0]) if len(parts) == 1 else parts
    return SourceSpec(head + sep + name, config, split)


def is_hub_id(value: str) -> bool:
    """``value`` is spelled like a hub dataset id ``org/name`` (it may or may not exist)."""
    return bool(_HUB_ID.fullmatch(value)) and ".." not in value and "--" not in value


def resolve_source(value: str, file_suffixes: tuple[str, ...]) -> ResolvedSource:
    """Find what ``value`` names and check the split it asks for exists, reading only metadata.

    Raises:
        DataError: the source does not exist, is not a dataset, is not cached, or lacks the
            config or split; the message says what was expected.
    """
    spec = parse_source(value)
    path = Path(spec.base)
    if path.is_file():
        if spec.split is not None:
            _fail(
                value,
                f"{spec.base!r} is a data file; a split applies only to a dataset "
                "directory or a hub id (drop the ':...')",
            )
        return ResolvedSource("file", spec, spec.base)
    if path.is_dir():
        return _resolve_dir(spec)
    if path.suffix.lower() in file_suffixes or not is_hub_id(spec.base):
        raise FileNotFoundError(
            f"{spec.base!r} not found (no such file or directory; relative paths are read "
            f"from {Path.cwd()})"
        )
    return _resolve_hub_id(spec)


def load_resolved(source: ResolvedSource) -> Dataset:
    """The rows of the split ``source`` names, as a ``datasets.Dataset`` (kind != "file").

    Raises:
        DataError: ``datasets`` could not load it (the message carries its reason).
    """
    import datasets

    try:
        with offline():
            if source.kind == "saved":
                loaded = datasets.load_from_disk(source.path)
                ds = loaded if source.split is None else loaded[source.split]
            else:
                ds = datasets.load_dataset(source.path, name=source.spec.config, split=source.split)
    except Exception as e:  # datasets raises many kinds; all mean "cannot load"
        _fail(source.name, f"datasets could not load it: {_reason(e)}")
    return ds.with_format(None)


@contextmanager
def offline() -> Iterator[None]:
    """Run ``datasets`` and ``huggingface_hub`` calls with the network off (their offline mode),
    whatever ``HF_HUB_OFFLINE`` says; restored afterwards."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _fail(name: str, message: str) -> NoReturn:
    raise DataError(name, [Problem(message)])


def _open_builder(path: str, config: str | None) -> Any:
    """``datasets.load_dataset_builder`` offline: resolves data files or cached metadata, reads
    no rows."""
    import datasets

    with offline():
        return datasets.load_dataset_builder(path, name=config)


def _resolve_dir(spec: SourceSpec) -> ResolvedSource:
    """A ``save_to_disk`` directory, else a hub-format directory."""
    import datasets.config

    path = Path(spec.base)
    if (path / datasets.config.DATASETDICT_JSON_FILENAME).is_file():
        if spec.config is not None:
            _fail(str(spec), "a saved DatasetDict has splits but no configs; name only the split")
        try:
            meta = json.loads((path / datasets.config.DATASETDICT_JSON_FILENAME).read_text())
            splits = [str(s) for s in meta["splits"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            _fail(spec.base, f"unreadable {datasets.config.DATASETDICT_JSON_FILENAME}: {e}")
        split = _pick_split(spec, splits, "saved DatasetDict")
        if not (path / split / datasets.config.DATASET_STATE_JSON_FILENAME).is_file():
            _fail(
                str(spec),
                f"the saved split {split!r} is missing ({path / split} holds no saved Dataset)",
            )
        return ResolvedSource("saved", spec, spec.base, split)
    if (path / datasets.config.DATASET_STATE_JSON_FILENAME).is_file():
        if spec.split is not None:
            _fail(
                str(spec),
                "a saved Dataset (save_to_disk of one split) has no splits or "
                "configs; drop the ':...'",
            )
        return ResolvedSource("saved", spec, spec.base, None)
    try:
        builder = _open_builder(spec.base, spec.config)
    except Exception as e:  # datasets raises many kinds; all mean "not a dataset"
        if "Config name is missing" in str(e) or (
            spec.config is not None and "BuilderConfig" in str(e)
        ):
            _fail(str(spec), f"the dataset has {_reason(e, spec)}")
        _fail(
            str(spec),
            "a directory that is neither a saved dataset (save_to_disk: no "
            "dataset_dict.json or state.json) nor a dataset in the hub layout (data files "
            f"such as train.jsonl or data/train-00000-of-00001.parquet): {_reason(e, spec)}",
        )
    return ResolvedSource("dir", spec, spec.base, _pick_split(spec, _splits(builder)))


def _resolve_hub_id(spec: SourceSpec) -> ResolvedSource:
    """A hub id: its snapshot in the hub cache (``hf download``), else its prepared copy in the
    datasets cache (an earlier ``load_dataset``); the snapshot's error when neither reads."""
    snapshot = _cached_snapshot(spec.base)
    snapshot_error = None
    if snapshot is not None:
        try:
            builder = _open_builder(snapshot, spec.config)
        except Exception as e:  # a partial snapshot: the datasets cache may still hold it
            snapshot_error = e
        else:
            return ResolvedSource("hub", spec, snapshot, _pick_split(spec, _splits(builder)))
    try:
        builder = _open_builder(spec.base, spec.config)
    except Exception as e:  # datasets raises many kinds; all mean "cannot read it"
        if snapshot_error is not None:
            _fail(
                str(spec),
                f"cannot read the cached hub snapshot {snapshot}: {_reason(snapshot_error, spec)}",
            )
        if isinstance(e, ConnectionError):  # offline, and no prepared copy in the datasets cache
            _fail(spec.base, _not_cached_message(spec.base))
        _fail(
            str(spec),
            f"cannot read the hub dataset's copy in the datasets cache: {_reason(e, spec)}",
        )
    return ResolvedSource("hub", spec, spec.base, _pick_split(spec, _splits(builder)))


def _not_cached_message(repo_id: str) -> str:
    import datasets.config
    import huggingface_hub.constants as hub_constants

    return (
        f"not a file or directory, and the hub dataset {repo_id!r} is not in the local "
        f"HuggingFace cache (looked in {hub_constants.HF_HUB_CACHE} and "
        f"{datasets.config.HF_DATASETS_CACHE}); tether never downloads. Download it first: "
        f"`hf download {repo_id} --repo-type dataset` (older huggingface_hub: "
        f"`huggingface-cli download --repo-type dataset {repo_id}`), or in Python "
        f"`datasets.load_dataset({repo_id!r}).save_to_disk('DIR')` and pass DIR"
    )


def _cached_snapshot(repo_id: str) -> str | None:
    """The directory of the ``main`` snapshot of dataset ``repo_id`` in the hub cache, or
    ``None`` when it was never downloaded. An interrupted download is an error."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        with offline():
            return snapshot_download(repo_id, repo_type="dataset", local_files_only=True)
    except LocalEntryNotFoundError:
        return None
    except Exception as e:  # e.g. IncompleteSnapshotError
        _fail(repo_id, f"the cached hub snapshot cannot be used: {_reason(e)}")


def _reason(error: Exception, spec: SourceSpec | None = None) -> str:
    """Why ``datasets`` failed, on one line; a missing or unknown config said plainly."""
    text = " ".join(str(error).split())
    if spec is not None and "Config name is missing" in text:
        available = text[text.find("available configs:") :].split(" Example")[0]
        return (
            f"several configs and no default one; name one as "
            f"{spec.base}{SPLIT_SEPARATOR}CONFIG{SPLIT_SEPARATOR}SPLIT ({available})"
        )
    if spec is not None and spec.config is not None and "BuilderConfig" in text:
        return f"no config {spec.config!r} ({text})"
    return f"{type(error).__name__}: {text}"


def _splits(builder: Any) -> list[str]:
    """The split names a ``datasets`` builder knows: its data files' keys, else its info's."""
    if builder.config.data_files:
        return [str(s) for s in builder.config.data_files]
    return [str(s) for s in (builder.info.splits or {})]


def _pick_split(spec: SourceSpec, splits: list[str], what: str = "dataset") -> str:
    """The split ``spec`` names, else ``train``, else the only split; an error listing the
    splits when none of these exists."""
    if not splits:
        _fail(str(spec), f"the {what} lists no splits")
    if spec.split is not None:
        if spec.split not in splits:
            _fail(
                str(spec),
                f"the {what} has no split {spec.split!r}; its splits are {splits} "
                f"(name one as {spec.base}{SPLIT_SEPARATOR}SPLIT)",
            )
        return spec.split
    if DEFAULT_SPLIT in splits:
        return DEFAULT_SPLIT
    if len(splits) == 1:
        return splits[0]
    _fail(
        spec.base,
        f"the {what} has no {DEFAULT_SPLIT!r} split; name one of its splits "
        f"{splits} as {spec.base}{SPLIT_SEPARATOR}SPLIT",
    )
