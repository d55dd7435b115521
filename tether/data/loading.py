"""Loading prompt and preference datasets: read, validate every row, render, tokenise.

Row formats follow HuggingFace TRL:

* *standard*: ``prompt``, ``chosen`` and ``rejected`` are strings, tokenised as they are;
* *conversational*: they are lists of ``{"role", "content"}`` messages and the tokenizer's chat
  template renders them (see ``tether.data.chat``);
* *implicit prompt* (preferences only): no ``prompt`` field; ``chosen`` and ``rejected`` are whole
  conversations and the messages they share at the start are the prompt.

With ``as_chat=True`` plain strings are wrapped as messages (the prompt as one user message, a
response as one assistant message) and rendered with the chat template, as instruct models expect.

Text is tokenised with ``add_special_tokens=False``: whatever special tokens the data should
carry come from the text itself or the chat template. Every response ends with the tokenizer's
EOS: it is appended as a token id when missing, and whitespace a template writes after a final
EOS (ChatML's ``<|im_end|>\\n``) is dropped, since generation stops at EOS. Prompts never end with
EOS. A response cut to fit ``max_length`` keeps its prompt whole and loses its end, EOS included.

Every problem in a source is collected and raised as one ``DataError`` naming the source, row,
line (JSONL), field, and what was expected versus what was found.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from tether.data.chat import (
    ChatTemplateError,
    Message,
    check_messages,
    has_chat_template,
    render_completion,
    render_prompt,
)
from tether.data.errors import DataError, Problem, describe
from tether.data.examples import PreferenceDataset, PreferenceExample, PromptDataset, PromptExample
from tether.data.sources import RawRow, Source, read_source

log = logging.getLogger(__name__)

_MISSING: Any = object()
_MAX_ROWS_IN_WARNING = 10


class _Row:
    """One raw row and the shared list its problems go to."""

    def __init__(self, raw: RawRow, problems: list[Problem]) -> None:
        self.raw = raw
        self.ok = True
        self._problems = problems

    def fail(self, field: str, message: str) -> None:
        """Record a problem with ``field`` of this row."""
        self._problems.append(Problem(message, self.raw.index, self.raw.line, field))
        self.ok = False

    def get(self, field: str) -> Any:
        """The value of ``field``, or ``_MISSING`` after reporting that it is missing."""
        if field in self.raw.fields:
            return self.raw.fields[field]
        self.fail(field, f"missing; the row has fields {sorted(map(str, self.raw.fields))}")
        return _MISSING


@dataclass(frozen=True)
class _Rendered:
    """A valid row's texts, ready to tokenise."""

    row: _Row
    prompt: str
    completions: tuple[str, ...]  # (chosen, rejected) for preferences, () for prompts
    messages: list[Message] | None  # what the chat template rendered as the prompt


def load_prompt_dataset(
    source: Source,
    tokenizer: PreTrainedTokenizerBase,
    *,
    prompt_field: str = "prompt",
    max_prompt_length: int | None = None,
    as_chat: bool = False,
) -> PromptDataset:
    """Load prompts for rollouts.

    Args:
        source: a ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` path, a HuggingFace dataset
            source string (a ``save_to_disk`` or hub-format directory, a cached hub id
            ``org/name``; ``:SPLIT`` or ``:CONFIG:SPLIT`` picks a split, see
            :mod:`tether.data.hf`), a list of dicts, or a ``datasets.Dataset``.
        tokenizer: tokenises the prompts; its chat template renders conversational ones.
        prompt_field: the field holding each prompt: a string, or a list of messages.
        max_prompt_length: a longer prompt (in tokens) is an error, never silently cut.
        as_chat: wrap string prompts as one user message and apply the chat template.

    Raises:
        DataError: listing every bad row of the source (and the empty source).
    """
    _check_limit("max_prompt_length", max_prompt_length)
    if not (isinstance(prompt_field, str) and prompt_field):
        raise ValueError(f"prompt_field must be a non-empty string, got {prompt_field!r}")
    _check_chat_possible(tokenizer, as_chat)
    raw = read_source(source)
    problems = list(raw.problems)
    rendered = []
    for raw_row in raw.rows:
        row = _Row(raw_row, problems)
        prompt = _prompt(row, prompt_field, as_chat)
        if prompt is None:
            continue
        if isinstance(prompt, str):
            rendered.append(_Rendered(row, prompt, (), None))
            continue
        _require_chat_template(tokenizer, row, prompt_field, raw.name)
        try:
            rendered.append(_Rendered(row, render_prompt(tokenizer, prompt), (), prompt))
        except ChatTemplateError as e:
            row.fail(prompt_field, str(e))

    all_ids = _encode(tokenizer, [r.prompt for r in rendered])
    examples = []
    for r, prompt_ids in zip(rendered, all_ids, strict=True):
        _check_prompt_ids(r.row, prompt_field, prompt_ids, tokenizer, max_prompt_length)
        if r.row.ok:
            examples.append(PromptExample(r.row.raw.index, r.prompt, prompt_ids, r.messages))
    if problems:
        raise DataError(raw.name, sorted(problems, key=_problem_order))
    return PromptDataset(raw.name, tuple(examples))


def load_preference_dataset(
    source: Source,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    as_chat: bool = False,
) -> PreferenceDataset:
    """Load preference pairs (``prompt``, ``chosen``, ``rejected``) for the DPO family.

    Args:
        source: a ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` path, a HuggingFace dataset
            source string (a ``save_to_disk`` or hub-format directory, a cached hub id
            ``org/name``; ``:SPLIT`` or ``:CONFIG:SPLIT`` picks a split, see
            :mod:`tether.data.hf`), a list of dicts, or a ``datasets.Dataset``.
        tokenizer: tokenises the rows; its chat template renders conversational ones; its EOS
            ends every response.
        max_length: prompt + response tokens allowed; a longer response is cut from the end
            (counted in ``num_truncated``, logged as a warning). A prompt that alone fills it is
            an error.
        max_prompt_length: a longer prompt (in tokens) is an error, never silently cut.
        as_chat: wrap string prompts as one user message and string responses as one assistant
            message, and apply the chat template.

    Raises:
        DataError: listing every bad row of the source (and the empty source).
    """
    _check_limit("max_length", max_length)
    _check_limit("max_prompt_length", max_prompt_length)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; responses must end with one")
    _check_chat_possible(tokenizer, as_chat)
    raw = read_source(source)
    problems = list(raw.problems)
    rendered = []
    for raw_row in raw.rows:
        r = _render_preference(_Row(raw_row, problems), tokenizer, as_chat, raw.name)
        if r is not None:
            rendered.append(r)

    eos = tokenizer.eos_token
    texts = []
    for r in rendered:
        texts += [r.prompt, *(_drop_after_eos(c, eos) for c in r.completions)]
    all_ids = _encode(tokenizer, texts)
    examples = []
    num_truncated = 0
    identical = []
    for k, r in enumerate(rendered):
        prompt_ids, chosen_ids, rejected_ids = all_ids[3 * k : 3 * k + 3]
        _check_prompt_ids(r.row, "prompt", prompt_ids, tokenizer, max_prompt_length)
        if max_length is not None and len(prompt_ids) >= max_length:
            r.row.fail(
                "prompt",
                f"expected fewer than max_length={max_length} tokens, leaving room for a "
                f"response, got {len(prompt_ids)}",
            )
        if not r.row.ok:
            continue
        chosen_ids = _end_with_eos(chosen_ids, tokenizer.eos_token_id)
        rejected_ids = _end_with_eos(rejected_ids, tokenizer.eos_token_id)
        if max_length is not None:
            budget = max_length - len(prompt_ids)
            if max(len(chosen_ids), len(rejected_ids)) > budget:
                num_truncated += 1
                chosen_ids, rejected_ids = chosen_ids[:budget], rejected_ids[:budget]
        if chosen_ids == rejected_ids:
            identical.append(r.row.raw.index)
        examples.append(
            PreferenceExample(r.row.raw.index, r.prompt, prompt_ids, chosen_ids, rejected_ids)
        )
    if problems:
        raise DataError(raw.name, sorted(problems, key=_problem_order))
    if num_truncated:
        log.warning(
            "%s: %d of %d rows had a response truncated to max_length=%d tokens "
            "(prompt + response; the prompt is kept whole)",
            raw.name,
            num_truncated,
            len(examples),
            max_length,
        )
    if identical:
        log.warning(
            "%s: %d rows have identical chosen and rejected token ids (after any truncation), "
            "so they carry no preference signal: rows %s",
            raw.name,
            len(identical),
            _list_rows(identical),
        )
    return PreferenceDataset(raw.name, tuple(examples), num_truncated=num_truncated)


def _render_preference(
    row: _Row, tokenizer: PreTrainedTokenizerBase, as_chat: bool, source: str
) -> _Rendered | None:
    """Validate a preference row and render its prompt, chosen and rejected texts."""
    if "prompt" in row.raw.fields:
        prompt = _prompt(row, "prompt", as_chat)
        chat = as_chat or isinstance(row.raw.fields["prompt"], (list, tuple))
        chosen = _completion(row, "chosen", chat, as_chat)
        rejected = _completion(row, "rejected", chat, as_chat)
    else:
        prompt, chosen, rejected = _split_implicit_prompt(row)
    if prompt is None or chosen is None or rejected is None:
        return None
    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        return _Rendered(row, prompt, (chosen, rejected), None)
    # _completion and _split_implicit_prompt give responses in the prompt's format: all lists now
    assert isinstance(prompt, list) and isinstance(chosen, list) and isinstance(rejected, list)
    _require_chat_template(tokenizer, row, "prompt", source)
    try:
        prompt_text = render_prompt(tokenizer, prompt)
    except ChatTemplateError as e:
        row.fail("prompt", str(e))
        return None
    completions = []
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        try:
            completions.append(render_completion(tokenizer, prompt, prompt_text, messages))
        except ChatTemplateError as e:
            row.fail(field, str(e))
    return _Rendered(row, prompt_text, tuple(completions), prompt) if row.ok else None


def _prompt(row: _Row, field: str, as_chat: bool) -> str | list[Message] | None:
    """A prompt: a non-empty string (wrapped as a user message when ``as_chat``) or messages."""
    value = row.get(field)
    if value is _MISSING:
        return None
    if isinstance(value, (list, tuple)):
        return check_messages(value, field, row.fail)
    if isinstance(value, str) and value:
        return [{"role": "user", "content": value}] if as_chat else value
    row.fail(
        field,
        "expected a non-empty string or a list of {'role', 'content'} messages, "
        f"got {describe(value)}",
    )
    return None


def _completion(row: _Row, field: str, chat: bool, as_chat: bool) -> str | list[Message] | None:
    """A response in the same format as its prompt (``chat``: messages, else a string)."""
    value = row.get(field)
    if value is _MISSING:
        return None
    if not chat:
        if isinstance(value, str) and value:
            return value
        row.fail(field, f"expected a non-empty string, like the prompt, got {describe(value)}")
        return None
    if isinstance(value, str):
        if as_chat and value:
            return [{"role": "assistant", "content": value}]
        row.fail(
            field,
            "expected a list of {'role', 'content'} messages, like the prompt (as_chat=True "
            f"wraps a string as one assistant message), got {describe(value)}",
        )
        return None
    return check_messages(value, field, row.fail)


def _split_implicit_prompt(
    row: _Row,
) -> tuple[list[Message] | None, list[Message] | None, list[Message] | None]:
    """TRL's implicit prompt: the messages ``chosen`` and ``rejected`` share at the start."""
    none = (None, None, None)
    values = {field: row.get(field) for field in ("chosen", "rejected")}
    if any(isinstance(v, str) for v in values.values()):
        row.fail(
            "prompt",
            "missing; an implicit prompt can only be split off conversations, so chosen and "
            "rejected must be lists of messages, got "
            + " and ".join(f"{f} as {describe(v)}" for f, v in values.items()),
        )
        return none
    chosen_v, rejected_v = values["chosen"], values["rejected"]
    chosen = None if chosen_v is _MISSING else check_messages(chosen_v, "chosen", row.fail)
    rejected = None if rejected_v is _MISSING else check_messages(rejected_v, "rejected", row.fail)
    if chosen is None or rejected is None:
        return none
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        row.fail(
            "prompt",
            "missing, and chosen and rejected differ from their first message, so there is no "
            "shared start to use as the implicit prompt",
        )
        return none
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        if len(messages) == n:
            row.fail(
                field,
                f"expected messages after the implicit prompt (the first {n} messages, shared "
                f"by chosen and rejected), got none",
            )
    return (chosen[:n], chosen[n:], rejected[n:]) if row.ok else none


def _check_prompt_ids(
    row: _Row,
    field: str,
    prompt_ids: list[int],
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_length: int | None,
) -> None:
    """A prompt must leave the turn open (no final EOS) and fit ``max_prompt_length``."""
    if prompt_ids and prompt_ids[-1] == tokenizer.eos_token_id:
        row.fail(
            field,
            f"ends with the EOS token {tokenizer.eos_token!r}; expected a prompt that leaves the "
            "turn open for the response",
        )
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        row.fail(
            field,
            f"expected at most max_prompt_length={max_prompt_length} tokens, got {len(prompt_ids)}",
        )


def _drop_after_eos(text: str, eos_token: str) -> str:
    """Drop whitespace after a final EOS (a template's newline between turns)."""
    stripped = text.rstrip()
    return stripped if stripped.endswith(eos_token) else text


def _end_with_eos(ids: list[int], eos_id: int) -> list[int]:
    """``ids`` ending with ``eos_id``, appended if it is not already last."""
    return ids if ids and ids[-1] == eos_id else [*ids, eos_id]


def _encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens added (one batched call)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def _check_chat_possible(tokenizer: PreTrainedTokenizerBase, as_chat: bool) -> None:
    if as_chat and not has_chat_template(tokenizer):
        raise ValueError("as_chat=True needs a tokenizer with a chat template; this one has none")


def _require_chat_template(
    tokenizer: PreTrainedTokenizerBase, row: _Row, field: str, source: str
) -> None:
    """Stop at the first conversational row when the tokenizer cannot render any of them."""
    if not has_chat_template(tokenizer):
        raise DataError(
            source,
            [
                Problem(
                    "is a list of messages, but the tokenizer has no chat template to render it; "
                    "set tokenizer.chat_template or use string prompts",
                    row.raw.index,
                    row.raw.line,
                    field,
                )
            ],
        )


def _problem_order(p: Problem) -> int:
    """Sort key: problems with the whole source first, then by row (stable within a row)."""
    return -1 if p.row is None else p.row


def _list_rows(rows: list[int]) -> str:
    """The first few row numbers, and how many more."""
    shown = ", ".join(map(str, rows[:_MAX_ROWS_IN_WARNING]))
    more = len(rows) - _MAX_ROWS_IN_WARNING
    return f"{shown} and {more} more" if more > 0 else shown
