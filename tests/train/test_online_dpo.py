"""Online DPO on the tiny model: on-policy pairs, a judge, β schedules, resume."""

import json

import pytest
import torch

from tether.core.controllers import AdaptiveKL, FixedKL
from tether.runs import read_metrics
from tether.train.online_dpo import OnlineDPOConfig, pair_batch, scheduled_beta, train


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Say {i}:"}) for i in range(32)))
    return path


def _cfg(tiny_dir, prompts, out, **kw):
    base = dict(
        model=str(tiny_dir),
        prompts=str(prompts),
        judge="tests.helpers.rewards:vowel_fraction",
        output_dir=str(out),
        max_new_tokens=12,
        learning_rate=5e-3,
        lr_scheduler="constant",
        batch_size=16,
        beta=0.1,
        max_steps=30,
        logging_steps=5,
        save_steps=15,
        seed=0,
        eval_steps=0,
    )
    base.update(kw)
    return OnlineDPOConfig(**base)


def test_pair_batch_orders_chosen_first_and_skips_ties():
    class R:  # a minimal rollout: 3 prompts × 2 samples, prompt length 2, response length 3
        prompt_length = 2
        input_ids = torch.arange(30).view(6, 5)
        attention_mask = torch.ones(6, 5, dtype=torch.bool)
        response_mask = torch.ones(6, 3, dtype=torch.bool)
        logprobs = torch.zeros(6, 3)

    batch, counts = pair_batch(R, [0.1, 0.9, 0.5, 0.5, 0.7, 0.2], gap=0.0)
    assert counts == {"pairs": 2.0, "ties": 1.0}
    assert batch["input_ids"][:, 0].tolist() == [5, 20, 0, 25]  # chosen rows 1, 4; rejected 0, 5
    assert batch["response_mask"][:, :2].sum() == 0 and batch["response_mask"][:, 2:].all()


def test_beta_schedules():
    lin = OnlineDPOConfig(beta=0.2, beta_end=0.1, beta_schedule="linear", max_steps=11)
    assert scheduled_beta(lin, FixedKL(0.2), 0) == pytest.approx(0.2)
    assert scheduled_beta(lin, FixedKL(0.2), 10) == pytest.approx(0.1)
    assert scheduled_beta(lin, FixedKL(0.2), 5) == pytest.approx(0.15)
    ada = OnlineDPOConfig(beta=0.2, beta_schedule="adaptive", kl_target=1.0, kl_horizon=10)
    ctrl = AdaptiveKL(0.2, 1.0, 10)
    ctrl.update(5.0, 10)
    assert scheduled_beta(ada, ctrl, 3) == pytest.approx(0.24)


def test_online_dpo_raises_the_judge_score(tiny_dir, prompts, tmp_path):
    final = train(_cfg(tiny_dir, prompts, tmp_path / "run"))
    rows = [r for r in read_metrics(tmp_path / "run") if "score" in r]
    assert rows[-1]["score"] > rows[0]["score"] + 0.05, [r["score"] for r in rows]
    assert rows[-1]["kl/k1"] > 0 and rows[-1]["kl/k3"] > 0  # it moved away from the reference
    assert final["pairs"] > 0


def test_adaptive_beta_rises_when_kl_exceeds_the_target(tiny_dir, prompts, tmp_path):
    cfg = _cfg(
        tiny_dir,
        prompts,
        tmp_path / "ada",
        beta_schedule="adaptive",
        kl_target=0.01,
        kl_horizon=100.0,
        max_steps=15,
    )
    train(cfg)
    betas = [r["beta"] for r in read_metrics(tmp_path / "ada") if "beta" in r]
    assert betas[-1] > betas[0]


def test_resume_equals_uninterrupted(tiny_dir, prompts, tmp_path):
    kw = dict(batch_size=4, save_steps=2)
    train(_cfg(tiny_dir, prompts, tmp_path / "full", max_steps=4, **kw))
    train(_cfg(tiny_dir, prompts, tmp_path / "half", max_steps=2, **kw))
    train(_cfg(tiny_dir, prompts, tmp_path / "half", max_steps=4, resume=True, **kw))
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "half" / "final" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
