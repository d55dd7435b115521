"""VADER sentiment as a reward: a cheap, real, rule-based reward for sentiment experiments.

VADER (Hutto & Gilbert 2014, "VADER: A Parsimonious Rule-based Model for Sentiment Analysis of
Social Media Text", ICWSM) scores a text with a hand-built valence lexicon plus rules for negation,
intensifiers ("very"), "but", capitals and punctuation. Its *compound* score sums the valences and
squashes the sum s into [−1, 1] as s/√(s² + 15), rounded to 4 decimals.

Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences", arXiv:1909.08593)
tune GPT-2 to continue BookCorpus text with positive sentiment, and in their "mock sentiment"
variant the reward is a sentiment classifier's log-odds instead of a model of human labels; TRL's
IMDb example does the same with a DistilBERT classifier. VADER is the cheap stand-in for that
classifier used here: it needs no model, no GPU and no download, is deterministic, and scores
thousands of texts a second, so sentiment RLHF, DPO and best-of-N experiments run on a laptop
against a *real* reward rather than a synthetic one. It is also easy to over-optimise ("great
great great!"), which makes it a good subject for KL experiments.

Texts without any lexicon word score exactly 0 (and scores are rounded), so VADER rewards are
heavily tied, at 0 above all; see
:mod:`tether.bon` for what ties do to the KL of best-of-N.
"""

from __future__ import annotations

from collections.abc import Sequence

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from tether.rewards.base import check_texts


class VaderSentiment:
    """Reward = VADER compound score of the completion, in [−1, 1]; the prompt is ignored.

    One analyzer (it holds the lexicon) is built per instance and reused for every call.
    """

    name = "vader"

    def __init__(self) -> None:
        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """Compound sentiment of each completion (``prompts`` only fixes the expected length)."""
        check_texts(prompts, completions, self.name)
        return [float(self._analyzer.polarity_scores(c)["compound"]) for c in completions]
