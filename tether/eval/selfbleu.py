"""Self-BLEU of a set of completions (Zhu et al. 2018, Texygen, arXiv:1802.01886 §3.2).

Each completion is scored by BLEU (sacrebleu's sentence BLEU, its default tokenizer and
exponential smoothing) against all the *other* completions as references; self-BLEU is the mean.
High self-BLEU = the completions repeat each other (low diversity). In [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu


def self_bleu(texts: Sequence[str]) -> float:
    """Mean over i of sentence-BLEU(texts[i], texts[j≠i]) / 100; needs ≥ 2 texts."""
    if len(texts) < 2:
        raise ValueError(f"self-BLEU needs at least 2 texts, got {len(texts)}")
    scores = [
        sacrebleu.sentence_bleu(texts[i], [t for j, t in enumerate(texts) if j != i]).score
        for i in range(len(texts))
    ]
    return sum(scores) / len(scores) / 100.0
