"""Conversational rows: validating messages and splitting chat-template renderings.

A conversation is a list of ``{"role", "content"}`` messages (HuggingFace TRL's conversational
format). A prompt is rendered with ``add_generation_prompt=True``, so it ends where the assistant
starts writing; a completion is the rendering of prompt + completion minus the rendered prompt.
That split is only sound when the template renders the prompt as a prefix of the whole
conversation, which is checked for every row (templates that rewrite earlier turns, e.g. by
dropping reasoning, fail it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from tether.data.errors import describe
from tether.errors import TetherError

ROLES = ("system", "user", "assistant", "tool")
"""The message roles tether accepts."""

_SNIPPET_CHARS = 30

Message = dict[str, Any]
Fail = Callable[[str, str], None]
"""``fail(field, message)``: records a problem with the current row."""


class ChatTemplateError(TetherError, ValueError):
    """The tokenizer's chat template failed on a conversation, or cannot be split as needed."""


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``tokenizer`` can render conversations."""
    return getattr(tokenizer, "chat_template", None) is not None


def check_messages(value: Any, field: str, fail: Fail) -> list[Message] | None:
    """Validate a conversation and return a clean copy, or ``None`` after reporting problems.

    Each message must be a dict with a ``role`` in ``ROLES`` and a non-empty string ``content``.
    Other keys (``name``, ``tool_calls``...) pass through to the chat template, except those
    whose value is ``None``: Arrow-backed sources (Parquet, ``datasets``) write ``None`` for keys
    that only some messages have, and templates would render them.
    """
    if not isinstance(value, (list, tuple)):
        fail(field, f"expected a list of {{'role', 'content'}} messages, got {describe(value)}")
        return None
    if not value:
        fail(field, "expected a non-empty list of messages, got an empty list")
        return None
    messages: list[Message] = []
    ok = True
    for j, message in enumerate(value):
        where = f"{field}[{j}]"
        if not isinstance(message, Mapping):
            fail(where, f"expected a dict with 'role' and 'content', got {describe(message)}")
            ok = False
            continue
        for key in ("role", "content"):
            if key not in message:
                fail(f"{where}.{key}", f"missing; the message has keys {sorted(map(str, message))}")
                ok = False
        if "role" in message and message["role"] not in ROLES:
            fail(f"{where}.role", f"expected one of {ROLES}, got {describe(message['role'])}")
            ok = False
        content = message.get("content")
        if "content" in message and not (isinstance(content, str) and content):
            fail(f"{where}.content", f"expected a non-empty string, got {describe(content)}")
            ok = False
        messages.append({k: v for k, v in message.items() if v is not None})
    return messages if ok else None


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], add_generation_prompt: bool
) -> str:
    try:
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # templates raise anything (jinja2 errors, TypeError on odd content)
        raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from e
    if not isinstance(text, str):
        raise ChatTemplateError(f"the chat template returned {describe(text)}, not a string")
    return text


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> str:
    """The prompt text: ``messages`` rendered with ``add_generation_prompt=True``."""
    return _render(tokenizer, messages, add_generation_prompt=True)


def render_completion(
    tokenizer: PreTrainedTokenizerBase,
    prompt_messages: Sequence[Message],
    prompt_text: str,
    completion_messages: Sequence[Message],
) -> str:
    """The completion text: the rendering of prompt + completion minus ``prompt_text`` (the
    prompt's rendering by ``render_prompt``).

    Raises:
        ChatTemplateError: the template fails, does not render ``prompt_text`` as a prefix of the
            whole conversation, or renders the completion as nothing.
    """
    full = _render(tokenizer, [*prompt_messages, *completion_messages], add_generation_prompt=False)
    if not full.startswith(prompt_text):
        at = len(os.path.commonprefix([prompt_text, full]))
        raise ChatTemplateError(
            "the chat template does not render the prompt (with add_generation_prompt=True) as "
            "a prefix of prompt + completion, so the completion cannot be split off; they differ "
            f"from character {at}: the prompt has {prompt_text[at : at + _SNIPPET_CHARS]!r}, "
            f"prompt + completion has {full[at : at + _SNIPPET_CHARS]!r}"
        )
    completion = full[len(prompt_text) :]
    if not completion.strip():
        raise ChatTemplateError(
            f"the chat template renders the completion messages as {completion!r}"
        )
    return completion
