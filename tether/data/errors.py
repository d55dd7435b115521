"""``DataError``: every problem found in a data source, reported at once with where it is."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tether.errors import TetherError

MAX_LISTED_PROBLEMS = 20
"""How many problems a ``DataError`` message lists before summarising the rest as a count."""

_MAX_REPR_CHARS = 40


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a data source.

    ``row`` is the 0-based row number in the source (``None`` for a problem with the whole
    source), ``line`` the 1-based line number where the format has lines (JSONL), ``field`` the
    column or path inside it (``"chosen[1].role"``), ``message`` what was expected and what was got.
    """

    message: str
    row: int | None = None
    line: int | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}" + (f" (line {self.line})" if self.line else ""))
        elif self.line is not None:
            where.append(f"line {self.line}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        return f"{', '.join(where)}: {self.message}" if where else self.message


class DataError(TetherError, ValueError):
    """A data source failed validation. Lists the source and every problem (the first
    ``MAX_LISTED_PROBLEMS`` of them, then how many more) in its message.

    Attributes:
        source: the file path, ``"<list>"`` or ``"<Dataset>"``.
        problems: every problem found, in row order.
    """

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        if not problems:
            raise ValueError("DataError needs at least one problem")
        self.source = source
        self.problems = tuple(problems)
        n = len(self.problems)
        lines = [f"{source}: {n} problem{'s' if n > 1 else ''} in the data"]
        lines += [f"  {p}" for p in self.problems[:MAX_LISTED_PROBLEMS]]
        if n > MAX_LISTED_PROBLEMS:
            lines.append(f"  ... and {n - MAX_LISTED_PROBLEMS} more")
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple[type[DataError], tuple[str, tuple[Problem, ...]]]:
        return (DataError, (self.source, self.problems))


def describe(value: Any) -> str:
    """A short description of a value for "expected ..., got ..." messages."""
    if value is None:
        return "None"
    if isinstance(value, str):
        if not value:
            return "an empty string"
        text = value if len(value) <= _MAX_REPR_CHARS else value[:_MAX_REPR_CHARS] + "..."
        return f"str {text!r}"
    if isinstance(value, Mapping):
        return f"a dict with keys {sorted(map(str, value))}"
    if isinstance(value, (list, tuple)):
        kind = type(value).__name__
        n = len(value)
        return f"a {kind} of {n} item{'s' if n != 1 else ''}" if n else f"an empty {kind}"
    text = repr(value)
    if len(text) > _MAX_REPR_CHARS:
        text = text[:_MAX_REPR_CHARS] + "..."
    return f"{type(value).__name__} {text}"
