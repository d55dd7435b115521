"""Held-out evaluation: diversity, capability retention, gold-vs-proxy rewards (issue 12).

Pure metric functions live here, free of trainers; the trainers call them.
"""

from tether.eval.capability import NLL, corpus_nll
from tether.eval.diversity import distinct_n, expectation_adjusted_distinct, ngrams
from tether.eval.selfbleu import self_bleu
from tether.eval.semantic import (
    SentenceEncoder,
    load_sentence_encoder,
    mean_pairwise_similarity,
    minilm_path,
    semantic_similarity,
)

__all__ = [
    "NLL",
    "SentenceEncoder",
    "corpus_nll",
    "distinct_n",
    "expectation_adjusted_distinct",
    "load_sentence_encoder",
    "mean_pairwise_similarity",
    "minilm_path",
    "ngrams",
    "self_bleu",
    "semantic_similarity",
]
