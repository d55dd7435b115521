"""Lexical diversity of a set of completions: distinct-n and expectation-adjusted distinct-n.

Inputs are token sequences (lists of hashable tokens: token ids, or words), so the choice of
tokenisation stays with the caller; every function is pure.

* distinct-n (Li et al. 2016, arXiv:1510.03055 §4.3): the number of distinct n-grams over all
  completions divided by the total number of n-grams (corpus level). It falls with length: a
  longer text repeats n-grams by chance alone.
* EAD, expectation-adjusted distinct (Liu et al., ACL 2022, "Rethinking and Refining the Distinct
  Metric", arXiv:2202.13587 eq. 4): the distinct count divided by its expectation when the C
  n-grams are drawn uniformly from V types, V·(1 − ((V − 1)/V)^C), so that the length bias cancels;
  V is the vocabulary size (the paper uses the tokenizer's).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence


def ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple[Hashable, ...]]:
    """The n-grams of one sequence, in order: ``len(tokens) − n + 1`` tuples (none if shorter)."""
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _counts(sequences: Sequence[Sequence[Hashable]], n: int) -> tuple[int, int]:
    """(distinct, total) n-grams over all sequences."""
    seen: set[tuple[Hashable, ...]] = set()
    total = 0
    for seq in sequences:
        grams = ngrams(seq, n)
        total += len(grams)
        seen.update(grams)
    return len(seen), total


def distinct_n(sequences: Sequence[Sequence[Hashable]], n: int) -> float:
    """Corpus-level distinct-n: distinct n-grams / all n-grams over ``sequences`` (0 if none)."""
    distinct, total = _counts(sequences, n)
    return distinct / total if total else 0.0


def expected_distinct(vocab_size: int, count: int) -> float:
    """E[#distinct] of ``count`` draws, uniform over ``vocab_size`` types: V·(1 − ((V − 1)/V)^C),
    computed as −V·expm1(C·log1p(−1/V)) so that it stays accurate for large V."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be ≥ 1, got {vocab_size}")
    if count < 0:
        raise ValueError(f"count must be ≥ 0, got {count}")
    if vocab_size == 1:
        return 1.0 if count else 0.0
    return -vocab_size * math.expm1(count * math.log1p(-1.0 / vocab_size))


def expectation_adjusted_distinct(
    sequences: Sequence[Sequence[Hashable]], n: int, vocab_size: int
) -> float:
    """EAD-n: distinct n-grams over ``sequences`` / :func:`expected_distinct` (0 if none)."""
    distinct, total = _counts(sequences, n)
    if total == 0:
        return 0.0
    return distinct / expected_distinct(vocab_size, total)
