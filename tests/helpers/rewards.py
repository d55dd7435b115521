"""Cheap, learnable rewards for smoke runs on the tiny byte-level model."""

from collections.abc import Sequence


def vowel_fraction(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Fraction of the completion's characters that are the letter 'e' (0 for an empty one)."""
    return [c.count("e") / len(c) if c else 0.0 for c in completions]


def lowercase_fraction(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Fraction of the completion's characters that are ASCII lowercase letters: a denser signal
    than one letter (about 10 % of a random byte-level model's output to begin with)."""
    return [sum("a" <= ch <= "z" for ch in c) / len(c) if c else 0.0 for c in completions]


def negated_vowel_fraction(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """A planted "gold" that disagrees with :func:`vowel_fraction` everywhere: its negative."""
    return [-v for v in vowel_fraction(prompts, completions)]
