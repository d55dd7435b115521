"""Two more sentiment lexicons, as *gold* rewards beside VADER: measured, never optimised.

Held-out evaluation (:mod:`tether.eval.heldout`) needs a second opinion on what the proxy (VADER)
rewards. These two score sentiment with other lexicons and, above all, another aggregation:

* ``textblob``: TextBlob's pattern-lexicon polarity (Loria, ``textblob``; the lexicon of De Smedt &
  Daelemans 2012, "Pattern for Python", JMLR 13), the *mean* polarity of the sentiment phrases
  found, with negation and intensifiers, in [−1, 1]. Piling up positive words does not raise a
  mean the way it raises VADER's squashed *sum*.
* ``afinn``: the AFINN-165 valences (Nielsen 2011, arXiv:1103.2903; integers −5..5 per word),
  summed over the completion and divided by 5 × the number of words, so in [−1, 1]: valence per
  word, which falls when a text pads a few positive words with anything else.

Both are tether dependencies, imported on first use.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from tether.rewards.base import check_texts

AFINN_MAX_VALENCE = 5.0
"""The largest |valence| of an AFINN word: the per-word normaliser."""
_WORD = re.compile(r"[A-Za-z']+")


def _require(module: str, package: str, name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"reward {name!r} needs the {package!r} package: pip install {package}"
        ) from e


class TextBlobSentiment:
    """Reward = TextBlob polarity of the completion, in [−1, 1]; the prompt is ignored."""

    name = "textblob"

    def __init__(self) -> None:
        self._blob = _require("textblob", "textblob", self.name).TextBlob

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        check_texts(prompts, completions, self.name)
        return [float(self._blob(c).sentiment.polarity) for c in completions]


class AfinnSentiment:
    """Reward = AFINN-165 valence per word / 5, in [−1, 1] (0 for a text without words)."""

    name = "afinn"

    def __init__(self) -> None:
        self._afinn = _require("afinn", "afinn", self.name).Afinn(language="en")

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        check_texts(prompts, completions, self.name)
        out = []
        for c in completions:
            words = len(_WORD.findall(c))
            out.append(float(self._afinn.score(c)) / (AFINN_MAX_VALENCE * words) if words else 0.0)
        return out
