"""Reward-model training on the tiny model: it learns a toy preference, resumes exactly, and the
saved model works as a reward function."""

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from tether.cli import main
from tether.rewards.model import load_reward_model
from tether.runs import read_metrics
from tether.runs.config import load_config
from tether.train.reward_model import (
    RewardConfig,
    centering_penalty,
    reward_step_loss,
    train,
)

RECIPE = Path(__file__).parents[2] / "recipes" / "reward.yaml"
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj"]}
WORDS = ["film", "plot", "cast", "story", "scene", "music", "actor", "ending", "script", "score"]


def _response(rng, word):
    words = [rng.choice(WORDS) for _ in range(4)]
    words.insert(rng.randrange(len(words) + 1), word)
    return " " + " ".join(words)


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    """64 pairs: chosen responses have 'good' at a random place among random words, rejected ones
    'bad'. Each pair's other words differ too, so an untrained model ranks pairs at chance."""
    rng = random.Random(0)
    rows = [
        {
            "prompt": f"Review {i}: the {rng.choice(WORDS)} was",
            "chosen": _response(rng, "good"),
            "rejected": _response(rng, "bad"),
        }
        for i in range(64)
    ]
    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _cfg(tiny_dir, prefs, out, **kw):
    base = dict(
        model=str(tiny_dir),
        train_data=str(prefs),
        output_dir=str(out),
        learning_rate=2e-3,
        lr_scheduler="constant",
        batch_size=8,
        gradient_accumulation_steps=2,
        max_steps=20,
        logging_steps=5,
        eval_steps=10,
        save_steps=10,
        eval_fraction=0.25,
        max_length=64,
        max_prompt_length=32,
        normalization_samples=32,
        seed=1,
    )
    base.update(kw)
    return RewardConfig(**base)


@pytest.fixture(scope="module")
def trained(tiny_dir, prefs, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "rm"
    final = train(_cfg(tiny_dir, prefs, out))
    return out, final


class _FixedRewards(nn.Module):
    def __init__(self, rewards):
        super().__init__()
        self.rewards = nn.Parameter(torch.tensor(rewards))

    def forward(self, input_ids, attention_mask):
        return self.rewards


def test_step_loss_is_bradley_terry_with_margin_and_centering():
    rewards = [2.0, -1.0, 0.5, 0.0, 1.0, 1.5]  # chosen (3), rejected (3)
    batch = {"input_ids": torch.zeros(6, 2), "attention_mask": torch.ones(6, 2)}
    cfg = RewardConfig(margin=0.25, center_rewards_coefficient=0.1)
    loss, stats = reward_step_loss(_FixedRewards(rewards), batch, cfg)
    rw, rl = torch.tensor(rewards[:3]), torch.tensor(rewards[3:])
    bt = -F.logsigmoid(rw - rl - 0.25).mean()
    center = ((rw + rl) ** 2).mean()
    assert center.item() == pytest.approx((2.0**2 + 0.0**2 + 2.0**2) / 3)
    assert centering_penalty(rw, rl).item() == pytest.approx(center.item())
    assert loss.item() == pytest.approx((bt + 0.1 * center).item(), rel=1e-6)
    assert stats["accuracy"].tolist() == [1.0, 0.0, 0.0]
    assert stats["margin"].tolist() == [2.0, -2.0, -1.0]
    assert stats["loss"].mean().item() == pytest.approx(loss.item(), rel=1e-6)
    assert stats["bt_loss"].mean().item() == pytest.approx(bt.item(), rel=1e-6)


def test_learns_the_preference(trained):
    out, final = trained
    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in eval_rows] == [0, 10, 20]
    assert train_rows[-1]["loss"] < 0.5 * train_rows[0]["loss"]
    assert eval_rows[0]["eval/accuracy"] < 0.8  # the untrained baseline
    assert eval_rows[-1]["eval/accuracy"] >= 0.9
    assert eval_rows[-1]["eval/loss"] < eval_rows[0]["eval/loss"]
    for key in (
        "accuracy",
        "margin",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/mean",
        "rewards/std",
        "lr",
        "grad_norm",
        "examples_per_s",
    ):
        assert key in train_rows[-1], key
    assert final["eval/accuracy"] == eval_rows[-1]["eval/accuracy"]


def test_trained_model_is_a_reward_function(trained, prefs):
    out, _ = trained
    rm = load_reward_model(out / "reward_model")
    assert rm.normalization is not None and rm.max_length == 64
    rows = [json.loads(line) for line in prefs.read_text().splitlines()]
    prompts = [r["prompt"] for r in rows]
    chosen_texts = [r["chosen"] for r in rows]
    chosen = rm(prompts, chosen_texts)
    rejected = rm(prompts, [r["rejected"] for r in rows])
    accuracy = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(rows)
    assert accuracy >= 0.9
    # normalised with the training-data statistics: mean ≈ 0, std ≈ 1 there
    scores = torch.tensor(chosen + rejected)
    assert abs(scores.mean().item()) < 0.5 and 0.5 < scores.std().item() < 2.0
    raw = load_reward_model(out / "reward_model", normalize=False)(prompts, chosen_texts)
    norm = rm.normalization
    assert chosen == pytest.approx([(r - norm.mean) / norm.std for r in raw], rel=1e-9)


@pytest.mark.parametrize("peft", [None, LORA], ids=["full", "lora"])
def test_resume_equals_uninterrupted(tiny_dir, prefs, tmp_path, peft):
    kw = dict(max_steps=8, save_steps=4, eval_steps=100, logging_steps=1, peft=peft)
    train(_cfg(tiny_dir, prefs, tmp_path / "full", **kw))
    train(_cfg(tiny_dir, prefs, tmp_path / "half", **{**kw, "max_steps": 4}))
    train(_cfg(tiny_dir, prefs, tmp_path / "half", **kw, resume=True))

    ckpt = Path("checkpoints") / "step-000008"
    a = load_file(str(tmp_path / "full" / ckpt / "reward_model.safetensors"))
    b = load_file(str(tmp_path / "half" / ckpt / "reward_model.safetensors"))
    assert a.keys() == b.keys() and "head.weight" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    states = [
        json.loads((tmp_path / r / ckpt / "states.json").read_text()) for r in ("full", "half")
    ]
    assert states[0]["cursor"] == states[1]["cursor"] == {"epoch": 1, "position": 16}
    for name in ("model.safetensors", "reward_head.safetensors"):
        fa = load_file(str(tmp_path / "full" / "reward_model" / name))
        fb = load_file(str(tmp_path / "half" / "reward_model" / name))
        assert all(torch.equal(fa[k], fb[k]) for k in fa), name
    la = [r["loss"] for r in read_metrics(tmp_path / "full") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(tmp_path / "half") if "loss" in r]
    assert len(la) == 8 and la == lb


def test_lora_training(tiny_dir, prefs, tmp_path):
    cfg = _cfg(
        tiny_dir,
        prefs,
        tmp_path / "lora",
        peft=LORA,
        learning_rate=1e-2,
        max_steps=20,
        eval_steps=20,
    )
    final = train(cfg)
    rows = [r for r in read_metrics(tmp_path / "lora") if "loss" in r]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert final["eval/accuracy"] >= 0.9
    rm = load_reward_model(tmp_path / "lora" / "reward_model")
    assert not rm.is_peft  # saved merged


def test_cli_with_the_recipe(tiny_dir, prefs, tmp_path):
    argv = [
        "train",
        "reward",
        "-c",
        str(RECIPE),
        f"model={tiny_dir}",
        f"train_data={prefs}",
        f"output_dir={tmp_path / 'cli'}",
        "max_steps=3",
        "warmup_steps=0",
        "batch_size=8",
        "max_length=96",
        "max_prompt_length=64",
        "logging_steps=1",
    ]
    assert main(argv) == 0
    assert (tmp_path / "cli" / "reward_model" / "reward_model.json").is_file()
    assert [r["step"] for r in read_metrics(tmp_path / "cli") if "loss" in r] == [1, 2, 3]
    assert main(["train", "reward", "--help-config"]) == 0


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="max_prompt_length"):
        RewardConfig(max_length=32, max_prompt_length=32)
    with pytest.raises(ValueError, match="margin"):
        RewardConfig(margin=-1.0)
    y = tmp_path / "r.yaml"
    y.write_text("center_rewards_coeficient: 0.1\n")
    with pytest.raises(ValueError, match="center_rewards_coeficient"):
        load_config(RewardConfig, y)
    with pytest.raises(ValueError, match="train_data is required"):
        train(RewardConfig(output_dir=str(tmp_path / "x"), model=str(tmp_path)))
