"""Cheap, learnable rewards for smoke runs on the tiny byte-level model."""

from collections.abc import Sequence


def vowel_fraction(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Fraction of the completion's characters that are the letter 'e' (0 for an empty one)."""
    return [c.count("e") / len(c) if c else 0.0 for c in completions]
