"""RewardModel: the last-real-token read, saving and loading, and use as a reward function."""

import json

import pytest
import torch
from transformers import BertConfig, BertModel

from tether.data import load_preference_dataset, pad_sequences
from tether.models import tiny_causal_lm, tiny_tokenizer
from tether.rewards import model as reward_model_module
from tether.rewards.model import (
    METADATA_FILE,
    RewardModel,
    RewardNormalization,
    last_token_index,
    load_reward_model,
)

ATOL = 1e-5
"""Rewards are O(1) in float32; padding changes only the order of masked-out additions."""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    pol = tiny_causal_lm(seed=0)
    pol.model.save_pretrained(path)
    pol.tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def rm(tiny_dir):
    torch.manual_seed(0)
    return RewardModel.from_pretrained_backbone(tiny_dir, dtype="float32", max_length=48)


def _ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def test_last_token_index():
    mask = torch.tensor(
        [
            [1, 1, 1, 0, 0],  # right padding
            [0, 0, 1, 1, 1],  # left padding
            [1, 1, 1, 1, 1],  # none
            [1, 0, 0, 0, 0],  # one token
        ],
        dtype=torch.bool,
    )
    assert last_token_index(mask).tolist() == [2, 4, 4, 0]


def test_reward_read_at_last_real_token_when_pad_is_eos(rm):
    """SmolLM2 pads with its EOS and every response ends with EOS: pad ids cannot locate the
    end of a row, the explicit mask must."""
    tok = rm.tokenizer
    tok.pad_token = tok.eos_token
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos
    long = _ids(tok, "Review: the film was good, really good") + [eos]
    short = _ids(tok, "Bad") + [eos]
    alone = torch.cat(
        [rm(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.bool)) for s in (long, short)]
    )  # (2,) no padding at all
    for side in ("right", "left"):
        ids, mask = pad_sequences([long, short], pad_value=eos, side=side)  # (2, T)
        rewards = rm(ids, mask)
        assert rewards.dtype == torch.float32 and rewards.shape == (2,)
        torch.testing.assert_close(rewards, alone, rtol=0, atol=ATOL)

    # the trap: "last token before the first pad id" reads the short row one token too early
    ids, mask = pad_sequences([long, short], pad_value=eos, side="right")
    first_pad = int((ids[1] == tok.pad_token_id).nonzero()[0])
    assert first_pad == len(short) - 1  # the response's own EOS
    hidden = rm.backbone(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    naive = rm.head(hidden[1, first_pad - 1]).squeeze(-1)
    assert (naive - alone[1]).abs() > 1e-3


def test_forward_rejects_bad_inputs(rm):
    with pytest.raises(ValueError, match="no real token"):
        rm(torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 0], [0, 0, 0]]).bool())
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        rm(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool))


def test_save_then_load_gives_identical_rewards(rm, tmp_path):
    prompts = ["Review 1: the plot was", "Review 2: the cast was"]
    completions = [" good, very good", " bad"]
    ids, mask = pad_sequences(rm.encode(prompts, completions), rm.tokenizer.pad_token_id)
    rm.normalization = RewardNormalization(mean=0.5, std=2.0)
    rm.save(tmp_path / "rm")
    loaded = load_reward_model(tmp_path / "rm")
    assert not loaded.training
    assert type(loaded.backbone).__name__ == "LlamaModel"
    assert loaded.max_length == 48 and loaded.causal
    assert loaded.normalization == RewardNormalization(mean=0.5, std=2.0)
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask), rm(ids, mask))
    raw = load_reward_model(tmp_path / "rm", normalize=False)(prompts, completions)
    assert raw == rm.forward(ids, mask).double().tolist()
    normalised = loaded(prompts, completions)
    assert normalised == pytest.approx([(r - 0.5) / 2.0 for r in raw], rel=1e-12)
    meta = json.loads((tmp_path / "rm" / METADATA_FILE).read_text())
    assert meta["normalization"] == {"mean": 0.5, "std": 2.0} and meta["dtype"] == "float32"


def test_save_is_atomic(rm, tmp_path, monkeypatch):
    target = tmp_path / "rm"
    rm.save(target)
    rm.save(target)  # replacing works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]
    before = sorted(p.name for p in target.iterdir())

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(reward_model_module, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        rm.save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]  # no half-written directory
    assert sorted(p.name for p in target.iterdir()) == before


def test_callable_matches_preference_tokenisation(rm):
    """Scoring (prompt, completion) texts tokenises exactly as the training data was."""
    rm.max_length = 64
    rows = [
        {"prompt": "Review: the film was", "chosen": " good", "rejected": " bad, very bad " * 6},
        {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"},
    ]
    for as_chat in (False, True):
        ds = load_preference_dataset(rows, rm.tokenizer, max_length=64, as_chat=as_chat)
        assert ds.num_truncated == 1
        prompts = [ex.prompt for ex in ds]
        for field in ("chosen", "rejected"):
            expected = [ex.prompt_ids + getattr(ex, f"{field}_ids") for ex in ds]
            assert rm.encode(prompts, [r[field] for r in rows]) == expected
    # a completion decoded with its special tokens ends with EOS already: not added twice
    assert rm.encode(["Q:"], [" 4<|im_end|>\n"]) == rm.encode(["Q:"], [" 4"])


def test_reward_function_interface(rm):
    scores = rm(["a prompt", "another"], [" one", " two"])
    assert isinstance(scores, list) and all(isinstance(s, float) for s in scores)
    assert rm.training  # score() restores the mode it found
    assert rm([], []) == []
    with pytest.raises(ValueError, match="one completion per prompt"):
        rm(["a", "b"], ["c"])
    with pytest.raises(TypeError, match="lists of strings"):
        rm("a", "b")
    with pytest.raises(ValueError, match="max_length=48"):
        rm(["x" * 60], [" y"])


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a tether reward model"):
        load_reward_model(tmp_path)
    (tmp_path / METADATA_FILE).write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="format 99"):
        load_reward_model(tmp_path)
    with pytest.raises(ValueError, match="std > 0"):
        RewardNormalization(mean=0.0, std=0.0)


def test_lora_backbone_is_saved_merged(tiny_dir, tmp_path):
    rm = RewardModel.from_pretrained_backbone(
        tiny_dir, dtype="float32", peft={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    )
    assert rm.is_peft
    with torch.no_grad():  # LoRA B starts at 0: make the adapter change the model
        for name, p in rm.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    prompts, completions = ["the plot was", "the cast was"], [" good", " bad"]
    rm.save(tmp_path / "rm")
    loaded = load_reward_model(tmp_path / "rm")
    assert not loaded.is_peft and rm.is_peft  # the trained model keeps its adapters
    expected = rm.score(prompts, completions)
    assert loaded(prompts, completions) == pytest.approx(expected, abs=ATOL)


def test_encoder_backbone(tmp_path):
    """A non-causal AutoModel backbone (BERT) works the same way."""
    tok = tiny_tokenizer()
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    rm = RewardModel.from_pretrained_backbone(tmp_path / "bert", dtype="float32")
    assert not rm.causal and type(rm.backbone).__name__ == "BertModel"
    prompts, completions = ["the plot was", "the cast was"], [" good", " bad, bad"]
    rm.save(tmp_path / "rm")
    assert load_reward_model(tmp_path / "rm")(prompts, completions) == rm(prompts, completions)
