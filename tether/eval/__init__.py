"""Held-out evaluation: diversity, capability retention, gold-vs-proxy rewards (issue 12).

Pure metric functions live here, free of trainers; the trainers call them.
"""

from tether.eval.diversity import distinct_n, expectation_adjusted_distinct, ngrams

__all__ = ["distinct_n", "expectation_adjusted_distinct", "ngrams"]
