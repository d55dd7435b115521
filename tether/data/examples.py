"""Tokenised examples and the datasets that hold them.

Datasets are plain indexable sequences (``len``, ``[i]``), so a ``torch.utils.data.DataLoader``
with ``collate_prompts`` / ``collate_preferences`` batches them directly. Token ids are stored
unpadded; padding and masks are made by the collate functions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

_FINGERPRINT_VERSION = 1
"""Bumped whenever what the fingerprint covers changes, so stale caches never match."""


@dataclass(frozen=True)
class PromptExample:
    """One prompt, ready for generation.

    Attributes:
        index: row number in the source (0-based).
        prompt: the text that was tokenised (after the chat template, if one was applied).
        prompt_ids: its token ids; never ends with EOS.
        messages: the messages the chat template rendered (a string prompt wrapped by
            ``as_chat=True`` appears as one user message); ``None`` for a plain-text prompt.
    """

    index: int
    prompt: str
    prompt_ids: list[int]
    messages: list[dict[str, Any]] | None


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair: a prompt and two responses, the chosen one preferred.

    Attributes:
        index: row number in the source (0-based).
        prompt: the prompt text that was tokenised (after the chat template, if any).
        prompt_ids: its token ids; never ends with EOS.
        chosen_ids: token ids of the preferred response only; ends with EOS unless truncated.
        rejected_ids: token ids of the other response only; ends with EOS unless truncated.
    """

    index: int
    prompt: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


E = TypeVar("E", PromptExample, PreferenceExample)


@dataclass(frozen=True, repr=False)
class _Examples(Sequence[E], Generic[E]):
    """An immutable sequence of examples read from ``source`` (a path, ``"<list>"`` or
    ``"<Dataset>"``)."""

    source: str
    examples: tuple[E, ...]

    def __len__(self) -> int:
        return len(self.examples)

    @overload
    def __getitem__(self, i: int) -> E: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[E, ...]: ...
    def __getitem__(self, i: int | slice) -> E | tuple[E, ...]:
        return self.examples[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={self.source!r}, {len(self)} examples)"

    def fingerprint(self) -> str:
        """A sha256 hex digest of the tokenised content: every example's row index and token ids,
        in order. Equal for two loads of the same data with the same tokenizer; different when
        any token of any row changes. Keys caches of per-example values (reference log-probs)."""
        h = hashlib.sha256(f"tether.data.{type(self).__name__}.v{_FINGERPRINT_VERSION}\n".encode())
        for ex in self.examples:
            h.update(json.dumps(_token_content(ex), separators=(",", ":")).encode())
            h.update(b"\n")
        return h.hexdigest()


def _token_content(ex: PromptExample | PreferenceExample) -> list[Any]:
    """What the fingerprint covers for one example."""
    if isinstance(ex, PreferenceExample):
        return [ex.index, ex.prompt_ids, ex.chosen_ids, ex.rejected_ids]
    return [ex.index, ex.prompt_ids]


@dataclass(frozen=True, repr=False)
class PromptDataset(_Examples[PromptExample]):
    """Prompts for rollouts (PPO, GRPO, online DPO). Batch with ``collate_prompts``."""


@dataclass(frozen=True, repr=False)
class PreferenceDataset(_Examples[PreferenceExample]):
    """Preference pairs for the DPO family. Batch with ``collate_preferences``.

    Attributes:
        num_truncated: how many rows had a response cut to fit ``max_length``.
    """

    num_truncated: int = 0

    def __repr__(self) -> str:
        return (
            f"PreferenceDataset(source={self.source!r}, {len(self)} examples, "
            f"num_truncated={self.num_truncated})"
        )
