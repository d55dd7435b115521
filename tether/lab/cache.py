"""The lab's cache: a stage's result is a JSON record written once, atomically, with the
fingerprint of the request that produced it; asked the same again, the stage loads the record
instead of recomputing (a killed lab re-runs only what had not finished)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

ARM_SCHEMA = 1
"""Version of the ``arm.json`` layout: {"schema", "kind", "fingerprint", "request", "points"}."""


def fingerprint(request: dict[str, Any]) -> str:
    """A stable hash of an arm's request (JSON with sorted keys)."""
    text = json.dumps(request, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_cached(path: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    """The record in the JSON file ``path`` if it answered this very request, else None."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it to re-run that stage") from e
    if saved.get("schema") != ARM_SCHEMA or saved.get("fingerprint") != fingerprint(request):
        return None
    return saved


def save_cached(path: Path, kind: str, request: dict[str, Any], **payload: Any) -> dict[str, Any]:
    """Write {"schema", "kind", "fingerprint", "request", **payload} to ``path`` atomically (a
    temp file in the same directory, then rename); return the record as read back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "schema": ARM_SCHEMA,
        "kind": kind,
        "fingerprint": fingerprint(request),
        "request": request,
        **payload,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)
    return json.loads(path.read_text(encoding="utf-8"))
