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


def ties_on_odd_prompts(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """:func:`lowercase_fraction`, except 0 for every completion of a prompt ending in an odd
    number ("Say 3:"): its two online-DPO samples tie, so a process can get only ties."""
    scores = lowercase_fraction(prompts, completions)
    odd = [int(p.rstrip(":").split()[-1]) % 2 == 1 for p in prompts]
    return [0.0 if o else s for o, s in zip(odd, scores, strict=True)]


def uppercase_fraction(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Fraction of the completion's characters that are ASCII capitals: dense like
    :func:`lowercase_fraction`, but learning it moves the model away from ordinary text (its NLL
    on English passages rises: an alignment tax to measure)."""
    return [sum("A" <= ch <= "Z" for ch in c) / len(c) if c else 0.0 for c in completions]


def negated_uppercase_fraction(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """A planted "gold" that disagrees with :func:`uppercase_fraction` everywhere."""
    return [-v for v in uppercase_fraction(prompts, completions)]
