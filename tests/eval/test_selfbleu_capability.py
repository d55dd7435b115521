"""Self-BLEU against sacrebleu's own corpus score; corpus NLL against a direct log-softmax sum."""

import pytest
import sacrebleu
import torch

from tether.eval import corpus_nll, self_bleu
from tether.models import tiny_causal_lm


def test_self_bleu_is_sacrebleus_score_of_each_text_against_the_others():
    a, b = "the film was good and the cast was great", "the film was bad but the music was great"
    # one hypothesis, one reference: the corpus score of a one-line corpus is that sentence's BLEU
    ab = sacrebleu.corpus_bleu([a], [[b]]).score
    ba = sacrebleu.corpus_bleu([b], [[a]]).score
    assert self_bleu([a, b]) == pytest.approx((ab + ba) / 200.0, rel=1e-9)
    assert self_bleu([a, a, a]) == pytest.approx(1.0)
    assert self_bleu(["alpha beta gamma delta", "one two three four"]) < 0.05
    with pytest.raises(ValueError, match="at least 2"):
        self_bleu([a])


def test_corpus_nll_is_the_token_weighted_direct_sum():
    pol = tiny_causal_lm(seed=4)
    tok = pol.tokenizer
    texts = [
        "Hello there, general text.",
        "Short one",
        "A third passage, a little longer than that.",
    ]
    out = corpus_nll(pol.model, tok, texts, batch_size=2)
    total, count = 0.0, 0
    for t in texts:  # one text at a time, no padding, full log-softmax in float64
        ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = pol.model(input_ids=ids).logits.double()[0, :-1]
        lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        total += float(-lp.sum())
        count += lp.numel()
    assert out.tokens == count
    assert out.mean == pytest.approx(total / count, rel=1e-5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        corpus_nll(pol.model, tok, ["a"])
