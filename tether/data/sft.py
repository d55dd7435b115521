"""Supervised fine-tuning data: read, validate every row, render, tokenise, mask the loss.

Row formats follow HuggingFace TRL's SFT conventions, detected row by row (one file may mix them):

* *prompt-completion*: ``prompt`` and ``completion``, each a string or a list of
  ``{"role", "content"}`` messages. The loss is on the completion's tokens.
* *conversational*: ``messages``, a list of messages ending with an assistant message. The loss
  is on the assistant turns (each turn's content and the end-of-turn token the template writes).
* *language modelling*: ``text``, a string. The loss is on every token.

With ``completion_only_loss=False`` every token after the first is a target, in every format.
With ``as_chat=True`` plain-string prompts and completions are wrapped as one user and one
assistant message and rendered with the chat template (``text`` rows are never wrapped).

Text is tokenised with ``add_special_tokens=False`` (special tokens come from the text or the
chat template), one rendered segment at a time, so the boundary between untrained and trained
tokens is exact. Every row ends with the tokenizer's EOS, a trained token (appended when
missing; whitespace a template writes after the final EOS is dropped). A row longer than
``max_length`` loses the end of its completion (or is an error with ``truncate=False``); a
prompt that alone fills ``max_length`` is an error.

Every problem in a source is collected and raised as one ``DataError`` naming the source, row,
line (JSONL), field, and what was expected versus what was found.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from tether.data.chat import (
    ChatTemplateError,
    Message,
    check_messages,
    has_chat_template,
    render_completion,
    render_prompt,
)
from tether.data.collate import pad_sequences
from tether.data.errors import DataError, Problem, describe
from tether.data.sources import RawRow, Source, read_source

log = logging.getLogger(__name__)

FORMAT_FIELDS = {"messages": ("messages",), "prompt": ("prompt", "completion"), "text": ("text",)}
"""Row format → the columns it needs (the format is named by its first column)."""

_EXPECTED_COLUMNS = (
    "expected a 'messages' column (conversational), 'prompt' and 'completion' "
    "(prompt-completion) or 'text' (language modelling)"
)


@dataclass(frozen=True)
class SFTExample:
    """One tokenised training sequence.

    Attributes:
        index: row number in the source (0-based).
        input_ids: the whole sequence's token ids (prompt and completion, or every turn).
        loss_mask: aligned with ``input_ids``: True where the token is a target of the loss
            (predicted from the tokens before it); never True at position 0.
        prompt_length: tokens before the first completion token (the first assistant turn's
            content for conversations; 0 for ``text`` rows).
    """

    index: int
    input_ids: list[int]
    loss_mask: list[bool]
    prompt_length: int

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask)


@dataclass(frozen=True, repr=False)
class SFTDataset(Sequence[SFTExample]):
    """SFT examples read from ``source`` (a path, ``"<list>"`` or ``"<Dataset>"``). Batch with
    :func:`collate_sft`.

    Attributes:
        num_truncated: how many rows were cut to fit ``max_length``.
    """

    source: str
    examples: tuple[SFTExample, ...]
    num_truncated: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    @overload
    def __getitem__(self, i: int) -> SFTExample: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[SFTExample, ...]: ...
    def __getitem__(self, i: int | slice) -> SFTExample | tuple[SFTExample, ...]:
        return self.examples[i]

    def __repr__(self) -> str:
        return (
            f"SFTDataset(source={self.source!r}, {len(self)} examples, "
            f"num_truncated={self.num_truncated})"
        )


class _Row:
    """One raw row and the shared list its problems go to."""

    def __init__(self, raw: RawRow, problems: list[Problem]) -> None:
        self.raw = raw
        self.ok = True
        self._problems = problems

    def fail(self, field: str | None, message: str) -> None:
        self._problems.append(Problem(message, self.raw.index, self.raw.line, field))
        self.ok = False

    def present(self, field: str) -> bool:
        """Whether the row has ``field`` with a value (Arrow sources write None for absent)."""
        return self.raw.fields.get(field) is not None


@dataclass(frozen=True)
class _Segments:
    """A valid row as rendered text pieces, each trained (in the loss) or not."""

    row: _Row
    field: str  # where a problem with the prompt is reported
    texts: tuple[str, ...]
    trained: tuple[bool, ...]


def load_sft_dataset(
    source: Source,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = None,
    as_chat: bool = False,
    completion_only_loss: bool = True,
    truncate: bool = True,
) -> SFTDataset:
    """Load supervised fine-tuning rows (prompt-completion, conversational or text).

    Args:
        source: a ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` path, a list of dicts, or a
            ``datasets.Dataset`` (whatever :func:`tether.data.sources.read_source` reads).
        tokenizer: tokenises the rows; its chat template renders conversations; its EOS ends
            every row.
        max_length: tokens allowed per row; a longer row loses the end of its completion
            (counted in ``num_truncated``, logged as a warning). A prompt that alone fills it
            is an error.
        as_chat: wrap string prompts/completions as one user/assistant message each and apply
            the chat template.
        completion_only_loss: loss on completions / assistant turns only (False: every token).
        truncate: cut rows longer than ``max_length`` (False: such a row is an error).

    Raises:
        DataError: listing every bad row of the source (and the empty source).
    """
    if max_length is not None and (
        isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2
    ):
        raise ValueError(f"max_length must be an int ≥ 2 or None, got {max_length!r}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; every SFT row must end with one")
    if as_chat and not has_chat_template(tokenizer):
        raise ValueError("as_chat=True needs a tokenizer with a chat template; this one has none")
    raw = read_source(source)
    problems = list(raw.problems)
    rendered = []
    for raw_row in raw.rows:
        seg = _render_row(_Row(raw_row, problems), tokenizer, as_chat)
        if seg is not None:
            rendered.append(seg)

    flat = [t for s in rendered for t in s.texts]
    all_ids = iter(_encode(tokenizer, flat))
    examples = []
    num_truncated = 0
    for s in rendered:
        ids: list[int] = []
        mask: list[bool] = []
        prompt_length = None
        for trained, seg_ids in zip(s.trained, (next(all_ids) for _ in s.texts), strict=True):
            if trained and prompt_length is None:
                prompt_length = len(ids)
            ids += seg_ids
            mask += [trained or not completion_only_loss] * len(seg_ids)
        if not ids or ids[-1] != tokenizer.eos_token_id:
            ids.append(tokenizer.eos_token_id)
            mask.append(True)
        mask[0] = False  # the first token is never predicted
        if not any(mask):
            s.row.fail(s.field, "has no token to train on (only an EOS token)")
            continue
        prompt_length = prompt_length or 0
        if max_length is not None and len(ids) > max_length:
            if prompt_length >= max_length:
                s.row.fail(
                    s.field,
                    f"expected fewer than max_length={max_length} tokens before the completion, "
                    f"leaving room for it, got {prompt_length}",
                )
                continue
            if not truncate:
                s.row.fail(
                    None,
                    f"expected at most max_length={max_length} tokens, got {len(ids)} "
                    "(truncate=true cuts the end of the completion)",
                )
                continue
            ids, mask = ids[:max_length], mask[:max_length]
            num_truncated += 1
        examples.append(SFTExample(s.row.raw.index, ids, mask, prompt_length))
    if problems:
        raise DataError(raw.name, sorted(problems, key=lambda p: -1 if p.row is None else p.row))
    if num_truncated:
        log.warning(
            "%s: %d of %d rows were truncated to max_length=%d tokens (the completion loses "
            "its end)",
            raw.name,
            num_truncated,
            len(examples),
            max_length,
        )
    return SFTDataset(raw.name, tuple(examples), num_truncated=num_truncated)


def _render_row(row: _Row, tokenizer: PreTrainedTokenizerBase, as_chat: bool) -> _Segments | None:
    """Validate a row and render it as trained / untrained text segments."""
    present = [name for name in FORMAT_FIELDS if row.present(name)]
    if not present:
        row.fail(
            None, f"{_EXPECTED_COLUMNS}; the row has fields {sorted(map(str, row.raw.fields))}"
        )
        return None
    if len(present) > 1:
        row.fail(
            None,
            f"has columns of more than one format ({', '.join(map(repr, present))}); "
            f"{_EXPECTED_COLUMNS}, one of them per row",
        )
        return None
    kind = present[0]
    if kind == "text":
        text = row.raw.fields["text"]
        if not (isinstance(text, str) and text):
            row.fail("text", f"expected a non-empty string, got {describe(text)}")
            return None
        return _Segments(row, "text", (text,), (True,))
    if kind == "messages":
        return _render_messages(row, tokenizer)
    return _render_prompt_completion(row, tokenizer, as_chat)


def _render_prompt_completion(
    row: _Row, tokenizer: PreTrainedTokenizerBase, as_chat: bool
) -> _Segments | None:
    prompt, completion = row.raw.fields["prompt"], row.raw.fields.get("completion")
    if completion is None:
        row.fail(
            "completion",
            f"missing; a row with 'prompt' needs a 'completion' (the row has fields "
            f"{sorted(map(str, row.raw.fields))})",
        )
        return None
    chat = as_chat or isinstance(prompt, (list, tuple))
    if not chat:
        for field, value in (("prompt", prompt), ("completion", completion)):
            if not (isinstance(value, str) and value):
                row.fail(
                    field,
                    "expected a non-empty string (or, for both prompt and completion, a list of "
                    f"messages), got {describe(value)}",
                )
        if not row.ok:
            return None
        return _Segments(
            row, "prompt", (prompt, _drop_after_eos(completion, tokenizer)), (False, True)
        )
    prompt_msgs = _as_messages(row, "prompt", prompt, "user", as_chat)
    completion_msgs = _as_messages(row, "completion", completion, "assistant", as_chat)
    if prompt_msgs is None or completion_msgs is None:
        return None
    if not has_chat_template(tokenizer):
        row.fail("prompt", "is a list of messages, but the tokenizer has no chat template")
        return None
    try:
        prompt_text = render_prompt(tokenizer, prompt_msgs)
    except ChatTemplateError as e:
        row.fail("prompt", str(e))
        return None
    try:
        completion_text = render_completion(tokenizer, prompt_msgs, prompt_text, completion_msgs)
    except ChatTemplateError as e:
        row.fail("completion", str(e))
        return None
    return _Segments(
        row, "prompt", (prompt_text, _drop_after_eos(completion_text, tokenizer)), (False, True)
    )


def _as_messages(
    row: _Row, field: str, value: Any, role: str, as_chat: bool
) -> list[Message] | None:
    """A prompt or completion as messages: a list is checked, a string wrapped (``as_chat``)."""
    if isinstance(value, str):
        if as_chat and value:
            return [{"role": role, "content": value}]
        row.fail(
            field,
            "expected a list of {'role', 'content'} messages, like the prompt (as_chat=true "
            f"wraps a string as one {role} message), got {describe(value)}",
        )
        return None
    return check_messages(value, field, row.fail)


def _render_messages(row: _Row, tokenizer: PreTrainedTokenizerBase) -> _Segments | None:
    """A conversation as segments: the text before each assistant turn (untrained) and the
    turn itself (trained), split with the chat template (each turn's prefix rendered with
    ``add_generation_prompt=True`` must be a prefix of the conversation's rendering)."""
    messages = check_messages(row.raw.fields["messages"], "messages", row.fail)
    if messages is None:
        return None
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        row.fail("messages", "expected at least one assistant message (the loss is on them)")
        return None
    if turns[0] == 0:
        row.fail(
            "messages[0].role",
            "expected a prompt (e.g. a user message) before the first "
            "assistant message, got 'assistant'",
        )
        return None
    if turns[-1] != len(messages) - 1:
        row.fail(
            f"messages[{len(messages) - 1}].role",
            "expected the conversation to end with an assistant message, got "
            f"{messages[-1]['role']!r}",
        )
        return None
    if not has_chat_template(tokenizer):
        row.fail("messages", "is a list of messages, but the tokenizer has no chat template")
        return None
    texts: list[str] = []
    trained: list[bool] = []
    done = ""  # the rendering so far: every segment joined
    after = ""  # what a template writes after a turn's final EOS: untrained, with the next part
    for i in turns:
        try:
            prompt_text = render_prompt(tokenizer, messages[:i])
            turn = render_completion(tokenizer, messages[:i], prompt_text, [messages[i]])
        except ChatTemplateError as e:
            row.fail(f"messages[{i}]", str(e))
            return None
        if not prompt_text.startswith(done):
            row.fail(
                f"messages[{i}]",
                "the chat template renders the conversation before this turn differently from "
                "how it rendered the earlier turns (it rewrites earlier turns), so the "
                "assistant turns cannot be masked",
            )
            return None
        body = _drop_after_eos(turn, tokenizer)
        texts += [after + prompt_text[len(done) :], body]
        trained += [False, True]
        done, after = prompt_text + turn, turn[len(body) :]
    return _Segments(row, "messages", tuple(texts), tuple(trained))


def _drop_after_eos(text: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """Drop whitespace after a final EOS (a template's newline between turns)."""
    stripped = text.rstrip()
    return stripped if stripped.endswith(tokenizer.eos_token) else text


def _encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens added (one batched call; '' → [])."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def collate_sft(examples: Sequence[SFTExample], pad_id: int) -> dict[str, Tensor]:
    """Batch SFT examples, RIGHT-padded.

    Returns:
        ``input_ids`` LongTensor (B, T); ``attention_mask`` BoolTensor (B, T), True on real
        tokens; ``loss_mask`` BoolTensor (B, T), True on target tokens, aligned with
        ``input_ids`` (``loss_mask[:, 1:]`` aligns with the log-probs of next tokens);
        ``index`` LongTensor (B,), each example's row in its source.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    input_ids, attention_mask = pad_sequences([ex.input_ids for ex in examples], pad_id)  # (B, T)
    loss_mask = torch.zeros_like(attention_mask)  # (B, T)
    for i, ex in enumerate(examples):
        loss_mask[i, : len(ex.loss_mask)] = torch.tensor(ex.loss_mask, dtype=torch.bool)
    index = torch.tensor([ex.index for ex in examples], dtype=torch.long)  # (B,)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "index": index,
    }
