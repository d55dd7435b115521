"""The reward-function contract and the check of what a reward function returns.

A reward function is any callable ``(prompts, completions) -> rewards``: two equal-length lists of
strings (the rendered prompt texts and the decoded completions, special tokens skipped) to one
real number per completion, higher is better. Rule-based rewards (:mod:`tether.rewards.vader`),
learned reward models (:func:`tether.rewards.model.load_reward_model`) and user functions all have
this shape, so every loop (PPO, GRPO, online DPO, best-of-N) takes any of them.

What comes back is checked at this boundary by :func:`validate_rewards`: one finite real number per
completion, or an error that names the reward function, the sample and what was wrong.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

from tether.errors import TetherError

RewardFn = Callable[[list[str], list[str]], Sequence[float]]
"""``reward_fn(prompts, completions) -> rewards``, one real number per completion."""

OnInvalid = Literal["raise", "skip"]

SNIPPET_CHARS = 80
"""How much of a completion an error message quotes."""


class RewardError(TetherError, ValueError):
    """A reward function raised, or returned something other than one finite real number per
    completion; the message names the reward, the step when known, and the sample."""


@dataclass(frozen=True)
class ValidatedRewards(Sequence[float]):
    """Rewards that passed :func:`validate_rewards`: a sequence of floats, one per completion.

    Attributes:
        values: the rewards as floats; with ``on_invalid="skip"`` a non-finite reward is NaN here.
        skipped: indices of the samples whose reward was not finite (always empty with
            ``on_invalid="raise"``). Drop these samples from the batch and log ``num_skipped``.
    """

    values: tuple[float, ...]
    skipped: tuple[int, ...] = ()

    @property
    def num_skipped(self) -> int:
        """How many samples had a non-finite reward."""
        return len(self.skipped)

    @property
    def valid(self) -> list[bool]:
        """Per sample: True when its reward is finite and the sample should be used."""
        dropped = set(self.skipped)
        return [i not in dropped for i in range(len(self.values))]

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self) -> Iterator[float]:
        return iter(self.values)

    @overload
    def __getitem__(self, i: int) -> float: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[float, ...]: ...
    def __getitem__(self, i: int | slice) -> float | tuple[float, ...]:
        return self.values[i]


def reward_name(reward_fn: Any) -> str:
    """A name for ``reward_fn`` in messages: its ``name`` attribute, qualified name or type."""
    name = getattr(reward_fn, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(reward_fn, "__qualname__", None) or type(reward_fn).__name__


def check_texts(prompts: Sequence[str], completions: Sequence[str], name: str) -> None:
    """Check the inputs of a reward function: two equal-length sequences of strings.

    Raises:
        TypeError: either argument is a single string, or holds a non-string.
        ValueError: the two lengths differ.
    """
    for field, texts in (("prompts", prompts), ("completions", completions)):
        if isinstance(texts, str):
            raise TypeError(f"reward {name!r}: {field} must be a list of strings, not one string")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(
                    f"reward {name!r}: {field}[{i}] is a {type(text).__name__}, expected a str"
                )
    if len(prompts) != len(completions):
        raise ValueError(
            f"reward {name!r}: got {len(prompts)} prompts and {len(completions)} completions; "
            "expected one prompt per completion"
        )


def validate_rewards(
    values: Any,
    expected_len: int,
    name: str,
    *,
    on_invalid: OnInvalid = "raise",
    completions: Sequence[str] | None = None,
    rows: Sequence[int] | None = None,
    where: str = "",
) -> ValidatedRewards:
    """Check what the reward function ``name`` returned for ``expected_len`` completions.

    ``values`` must be a sequence (a list, a tuple, or a 1-D array or tensor) of ``expected_len``
    real numbers (``bool`` counts as 0/1). A NaN or infinite reward either raises
    (``on_invalid="raise"``) or is kept as NaN and its index listed in
    :attr:`ValidatedRewards.skipped` (``on_invalid="skip"``), so that a trainer can drop those
    samples and log how many it dropped.

    Args:
        values: what the reward function returned.
        expected_len: the number of completions it was given.
        name: the reward function's name (a spec such as ``"vader"``), quoted in errors.
        on_invalid: ``"raise"`` or ``"skip"`` for non-finite rewards.
        completions: the completions that were scored, to quote the offending one in errors.
        rows: the source row of each sample's prompt (``PromptExample.index``), named in errors.
        where: appended to error messages, e.g. ``" at step 12"`` (see :func:`call_reward`).

    Raises:
        RewardError: wrong type, wrong length, a non-real element, or (with ``"raise"``) a
            non-finite reward: the message names the function, the sample index and, when
            ``completions`` is given, the start of the completion.
    """
    if on_invalid not in ("raise", "skip"):
        raise ValueError(f"on_invalid must be 'raise' or 'skip', got {on_invalid!r}")
    if hasattr(values, "tolist") and getattr(values, "ndim", 1) == 1:
        values = values.tolist()  # numpy arrays and torch tensors
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise RewardError(
            f"reward {name!r} returned a {type(values).__name__}; expected a sequence of "
            f"{expected_len} real numbers{where}"
        )
    if len(values) != expected_len:
        raise RewardError(
            f"reward {name!r} returned {len(values)} values for {expected_len} completions; "
            f"expected one per completion{where}"
        )
    out: list[float] = []
    skipped: list[int] = []
    for i, v in enumerate(values):
        if not isinstance(v, numbers.Real):
            raise RewardError(
                f"reward {name!r}: value {i} is a {type(v).__name__} ({v!r}), expected a real "
                f"number{_quote(completions, i, rows)}{where}"
            )
        x = float(v)
        if not math.isfinite(x):
            if on_invalid == "raise":
                raise RewardError(
                    f"reward {name!r} returned {x} for sample {i}"
                    f"{_quote(completions, i, rows)}{where}"
                )
            skipped.append(i)
            x = math.nan
        out.append(x)
    return ValidatedRewards(tuple(out), tuple(skipped))


def _quote(completions: Sequence[str] | None, i: int, rows: Sequence[int] | None = None) -> str:
    """``' (prompt row 17, completion: "...")'`` for error messages: what is known of sample
    ``i``, or ``""``."""
    parts = []
    if rows is not None and i < len(rows):
        parts.append(f"prompt row {rows[i]}")
    if completions is not None and i < len(completions):
        text = completions[i]
        snippet = text if len(text) <= SNIPPET_CHARS else text[:SNIPPET_CHARS] + "…"
        parts.append(f"completion: {snippet!r}")
    return f" ({', '.join(parts)})" if parts else ""


def _context(step: int | None, stage: str | None) -> str:
    """``" in the held-out evaluation at step 12"``, ``" at step 12"`` or ``""``."""
    text = f" in {stage}" if stage else ""
    return text + (f" at step {step}" if step is not None else "")


def call_reward(
    reward_fn: RewardFn,
    prompts: Sequence[str],
    completions: Sequence[str],
    name: str | None = None,
    *,
    step: int | None = None,
    rows: Sequence[int] | None = None,
    stage: str | None = None,
    on_invalid: OnInvalid = "raise",
    find_failing_sample: bool = True,
) -> ValidatedRewards:
    """Score ``completions`` with ``reward_fn`` and check what it returns: the one place where
    tether calls a reward function (trainers, best-of-n, held-out evaluation).

    An exception inside the reward function becomes a :class:`RewardError` naming the reward,
    the step (when given) and the sample. With ``find_failing_sample`` (and more than one
    sample, and not out of memory) the function is then called on the samples one at a time
    to find the first that fails, whose index, prompt row and completion the message quotes;
    if every sample alone succeeds the message says the failure depends on the batch. What it
    returns is checked by :func:`validate_rewards` (one finite real per completion).

    Args:
        reward_fn: ``(prompts, completions) -> rewards``.
        prompts: the prompt text of each sample.
        completions: the completion of each sample.
        name: the reward's name in messages (its spec, e.g. ``"vader"`` or
            ``"my_rewards:score"``; default :func:`reward_name`).
        step: the training step, when known.
        rows: the source row of each sample's prompt (``PromptExample.index``).
        stage: where the call happens when not in a training step, e.g. ``"best-of-n"``,
            ``"the held-out evaluation"``.
        on_invalid: ``"raise"`` or ``"skip"`` for non-finite rewards (:func:`validate_rewards`).
        find_failing_sample: re-score one sample at a time after a failure of the batch call.

    Raises:
        RewardError: the reward function raised, or returned an invalid value.
    """
    name = reward_name(reward_fn) if name is None else name
    where = _context(step, stage)
    try:
        values = reward_fn(list(prompts), list(completions))
    except Exception as exc:
        error, cause = _reward_failure(
            exc, reward_fn, prompts, completions, name, rows, where, find_failing_sample
        )
        raise error from cause
    return validate_rewards(
        values,
        len(completions),
        name,
        on_invalid=on_invalid,
        completions=completions,
        rows=rows,
        where=where,
    )


def _reward_failure(
    exc: Exception,
    reward_fn: RewardFn,
    prompts: Sequence[str],
    completions: Sequence[str],
    name: str,
    rows: Sequence[int] | None,
    where: str,
    find_failing_sample: bool,
) -> tuple[RewardError, Exception]:
    """The :class:`RewardError` for ``exc`` raised by a batch call of ``reward_fn``, and its
    cause: the first failing sample's own exception when one is found, else ``exc``."""
    n = len(completions)
    what = f"{type(exc).__name__}: {exc}".rstrip(": ")
    fix = "; fix the reward function"
    out_of_memory = isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()
    if n == 1:
        return RewardError(
            f"reward {name!r} raised {what} on sample 0 of 1{_quote(completions, 0, rows)}"
            f"{where}{fix}"
        ), exc
    if not find_failing_sample or out_of_memory or n == 0:
        message = f"reward {name!r} raised {what} on a batch of {n} samples{where}{fix}"
        return RewardError(message), exc
    for i in range(n):
        try:
            reward_fn([prompts[i]], [completions[i]])
        except Exception as one:
            alone = f"{type(one).__name__}: {one}".rstrip(": ")
            sample = f"sample {i} of {n}{_quote(completions, i, rows)}"
            if alone == what:
                message = (
                    f"reward {name!r} raised {what} on {sample}{where} (the first sample that "
                    f"fails when scored alone){fix}"
                )
            else:
                message = (
                    f"reward {name!r} raised {what} on a batch of {n} samples{where}; the first "
                    f"sample that fails alone is {sample}, with {alone}{fix}"
                )
            return RewardError(message), one
    return RewardError(
        f"reward {name!r} raised {what} on a batch of {n} samples{where}, but each sample "
        f"scored alone succeeds: the failure depends on the batch (its size or its mix){fix}"
    ), exc
