"""The built-in rewards: VADER sentiment and length."""

import math

import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from tether.rewards import Length, VaderSentiment

POSITIVE = "I love this movie, it is wonderful!"
NEGATIVE = "This is terrible and I hate it."
NEUTRAL = "The cat sat on the mat."
VADER_ALPHA = 15.0
"""VADER's compound normalisation s/√(s² + α) (Hutto & Gilbert 2014)."""


@pytest.fixture(scope="module")
def vader():
    return VaderSentiment()


def test_vader_orders_and_signs_sentiment(vader):
    pos, neg, neutral = vader(["p"] * 3, [POSITIVE, NEGATIVE, NEUTRAL])
    assert pos > 0 > neg
    assert pos > neutral > neg
    assert neutral == 0.0


def test_vader_is_the_compound_score_of_the_completion(vader):
    texts = [POSITIVE, NEGATIVE, NEUTRAL, "meh, not great but not awful", "", "GREAT!!!"]
    # the prompt is ignored: a strongly negative prompt does not change the scores
    got = vader(["I hate everything."] * len(texts), texts)
    reference = SentimentIntensityAnalyzer()
    assert got == [reference.polarity_scores(t)["compound"] for t in texts]
    assert all(-1.0 <= v <= 1.0 for v in got)


@pytest.mark.parametrize("word", ["good", "horrible"])
def test_vader_single_word_matches_the_compound_formula(vader, word):
    valence = SentimentIntensityAnalyzer().lexicon[word]
    expected = round(valence / math.sqrt(valence**2 + VADER_ALPHA), 4)
    assert vader([""], [word]) == [expected]
    assert math.copysign(1.0, expected) == math.copysign(1.0, valence)


def test_vader_checks_its_inputs(vader):
    assert vader([], []) == []
    with pytest.raises(ValueError, match="'vader': got 2 prompts and 1 completions"):
        vader(["a", "b"], ["c"])
    with pytest.raises(TypeError, match="'vader': completions must be a list of strings"):
        vader(["a"], "c")


def test_length_counts_characters():
    assert Length()(["p", "p", "p"], ["", "abc", "é" * 250]) == [0.0, 0.03, 2.5]
    assert Length(chars_per_unit=2)(["p"], ["abcde"]) == [2.5]
    with pytest.raises(ValueError, match="chars_per_unit must be > 0"):
        Length(chars_per_unit=0)
