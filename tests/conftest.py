"""Shared fixtures: the tiny model saved as a checkpoint directory."""

import pytest

from tether.models import tiny_causal_lm


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The tiny random Llama (seed 0) and its tokenizer saved as a local checkpoint directory."""
    path = tmp_path_factory.mktemp("tiny")
    pol = tiny_causal_lm(seed=0)
    pol.model.save_pretrained(path)
    pol.tokenizer.save_pretrained(path)
    return path
