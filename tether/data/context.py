"""Does every example fit the model's context? A check of tokenised data against the number of
positions the model attends over (``config.max_position_embeddings``).

A row longer than the context is not silently cut or trained on with positions the model never
learnt (RoPE beyond its range, a learnt position table indexed out of range): it is a
:class:`~tether.data.DataError` naming the source and the row.
"""

from __future__ import annotations

from collections.abc import Iterable

from tether.data.errors import DataError, Problem
from tether.data.examples import PreferenceExample


def check_preference_context(
    examples: Iterable[PreferenceExample],
    context_length: int | None,
    source: str,
    *,
    max_length: int | None = None,
) -> None:
    """Check that prompt + chosen and prompt + rejected of every pair fit ``context_length``
    tokens (after the loader's ``max_length`` truncation, which the examples already carry).

    Args:
        examples: the tokenised pairs (a :class:`~tether.data.PreferenceDataset` or a list).
        context_length: the model's context in positions; ``None`` (unknown) checks nothing.
        source: the data's path (or ``"<list>"``), named in the error.
        max_length: the configured ``max_length``, quoted in the fix the error suggests.

    Raises:
        DataError: listing every row that is too long, with its token counts.
    """
    if context_length is None:
        return
    problems = []
    for ex in examples:
        prompt = len(ex.prompt_ids)
        sides = {"chosen": prompt + len(ex.chosen_ids), "rejected": prompt + len(ex.rejected_ids)}
        over = {side: n for side, n in sides.items() if n > context_length}
        if not over:
            continue
        counts = " and ".join(f"prompt + {side} is {n} tokens" for side, n in over.items())
        limit = f"max_length={max_length}" if max_length is not None else "no max_length"
        problems.append(
            Problem(
                f"{counts} ({prompt} in the prompt) after truncation to {limit}, more than "
                f"the model's context of {context_length} positions "
                f"(config.max_position_embeddings): set max_length ≤ {context_length} (and "
                "max_prompt_length below it), or shorten or drop the row",
                row=ex.index,
                field="/".join(over),
            )
        )
    if problems:
        raise DataError(source, problems)
