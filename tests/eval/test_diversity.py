"""Distinct-n and EAD against hand-computed values."""

import math

import pytest

from tether.eval import distinct_n, expectation_adjusted_distinct, ngrams
from tether.eval.diversity import expected_distinct


def test_ngrams_by_hand():
    assert ngrams("abcd", 2) == [("a", "b"), ("b", "c"), ("c", "d")]
    assert ngrams([1, 2], 3) == []
    with pytest.raises(ValueError, match="n must be"):
        ngrams([1], 0)


def test_distinct_n_by_hand():
    texts = [["the", "cat", "the", "cat"], ["the", "dog"]]
    # unigrams: 6 in all, {the, cat, dog} distinct → 3/6
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)
    # bigrams: (the cat) (cat the) (the cat) | (the dog): 4 in all, 3 distinct
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n([["a"]], 2) == 0.0  # no bigram at all
    assert distinct_n([list("abcd"), list("efgh")], 1) == 1.0


def test_expected_distinct_by_hand_and_by_enumeration():
    # V = 2, C = 2: draws {aa, ab, ba, bb} equally likely → E[#distinct] = (1 + 2 + 2 + 1)/4 = 1.5
    assert expected_distinct(2, 2) == pytest.approx(1.5)
    # V = 3, C = 2: 3·(1 − (2/3)²) = 5/3; by enumeration 3 pairs with 1 type, 6 with 2
    assert expected_distinct(3, 2) == pytest.approx((3 * 1 + 6 * 2) / 9)
    assert expected_distinct(50_000, 0) == 0.0
    # large V: ≈ C when C ≪ V (almost no collisions), accurate to rounding
    assert expected_distinct(10**9, 1000) == pytest.approx(1000 - 1000 * 999 / 2 / 1e9, rel=1e-12)
    with pytest.raises(ValueError):
        expected_distinct(0, 3)


def test_ead_divides_by_the_expectation():
    texts = [["a", "b", "a"], ["c"]]  # 4 unigrams, 3 distinct
    v = 10
    expected = v * (1 - ((v - 1) / v) ** 4)
    assert expectation_adjusted_distinct(texts, 1, v) == pytest.approx(3 / expected)
    assert expectation_adjusted_distinct([[]], 1, v) == 0.0


def test_ead_removes_the_length_bias_of_distinct():
    """Uniform random text over V types: distinct-1 falls with length, EAD's mean stays 1. At
    C = V draws the distinct count has SD ≈ √(V·e⁻¹·(1 − 2e⁻¹)) ≈ 4.4 of 126, so the mean of
    100 corpora has SE ≈ 0.0035: the tolerance is ≈ 4 SE."""
    import random

    rng = random.Random(0)
    v = 200

    def corpus(length):
        return [[rng.randrange(v) for _ in range(length)] for _ in range(4)]

    shorts = [corpus(50) for _ in range(100)]  # C = 200 = V
    long = corpus(2000)  # C = 8000 = 40·V: every type seen
    mean_distinct_short = sum(distinct_n(c, 1) for c in shorts) / len(shorts)
    assert distinct_n(long, 1) < 0.2 * mean_distinct_short
    mean_ead_short = sum(expectation_adjusted_distinct(c, 1, v) for c in shorts) / len(shorts)
    assert math.isclose(mean_ead_short, 1.0, abs_tol=0.015)
    assert math.isclose(expectation_adjusted_distinct(long, 1, v), 1.0, abs_tol=1e-6)
