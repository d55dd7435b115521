"""Completion length as a reward: the proxy that RLHF is best known for over-optimising.

Longer answers win human and reward-model comparisons more often than they should, and much of
the reward gained by RLHF can come from length alone (Singhal et al. 2023, "A Long Way to Go:
Investigating Length Correlations in RLHF", arXiv:2310.03716). As an explicit reward, length makes
that failure mode a controlled experiment: the reward is trivially hackable, so the KL penalty is
all that keeps the policy from rambling to the token limit. It is also a cheap, deterministic
reward for smoke tests.
"""

from __future__ import annotations

from collections.abc import Sequence

from tether.rewards.base import check_texts

DEFAULT_CHARS_PER_UNIT = 100.0
"""100 characters = reward 1, so typical completions score O(1), like VADER in [−1, 1]."""


class Length:
    """Reward = number of characters in the completion / ``chars_per_unit``.

    Characters, not tokens, so the reward does not depend on the tokenizer.
    """

    name = "length"

    def __init__(self, chars_per_unit: float = DEFAULT_CHARS_PER_UNIT) -> None:
        if not chars_per_unit > 0:
            raise ValueError(f"chars_per_unit must be > 0, got {chars_per_unit}")
        self.chars_per_unit = float(chars_per_unit)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """Length of each completion in units of ``chars_per_unit`` characters."""
        check_texts(prompts, completions, self.name)
        return [len(c) / self.chars_per_unit for c in completions]
