"""The shared on-policy machinery (rollout, scoring, KL placement) and PPO / PPO-penalty /
GRPO / RLOO / TRPO smoke runs on the tiny model with a learnable reward (the share of 'e')."""

import json
from types import SimpleNamespace

import pytest
import torch

from tether.models import load_policy
from tether.reference import CopyReference
from tether.runs import read_metrics
from tether.train.distributed import Dist
from tether.train.grpo import GRPOConfig, RLOOConfig, group_advantages
from tether.train.grpo import train as train_group
from tether.train.ppo import PPOConfig, PPOPenaltyConfig
from tether.train.ppo import train as train_ppo
from tether.train.rl import (
    Experience,
    collect,
    full_logprob_mask,
    sequence_rewards,
    shaped_token_rewards,
)
from tether.train.trpo import TRPOConfig, _mean_kl, _policy_outputs, trpo_policy_step
from tether.train.trpo import train as train_trpo

REWARD = "tests.helpers.rewards:vowel_fraction"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Say {i}:"}) for i in range(32)))
    return path


def _base(tiny_dir, prompts, out, **kw):
    base = dict(
        model=str(tiny_dir),
        prompts=str(prompts),
        reward=REWARD,
        output_dir=str(out),
        max_new_tokens=10,
        learning_rate=3e-3,
        lr_scheduler="constant",
        batch_size=16,
        max_steps=20,
        logging_steps=1,
        save_steps=0,
        seed=0,
        mixed_precision="no",
        exact_kl_samples=2,
        eval_steps=0,  # held-out evaluation has its own tests (tests/eval/test_heldout.py)
    )
    base.update(kw)
    return base


def _rows(out):
    return [r for r in read_metrics(out) if "score" in r]


def _mean(rows, key, last=5):
    vals = [r[key] for r in rows[-last:]]
    return sum(vals) / len(vals)


# -- pieces ---------------------------------------------------------------------------------------


def _exp(kl, scores, mask):
    return Experience(
        input_ids=torch.zeros(mask.shape[0], 3 + mask.shape[1], dtype=torch.long),
        attention_mask=torch.ones(mask.shape[0], 3 + mask.shape[1], dtype=torch.bool),
        prompt_length=3,
        response_mask=mask,
        old_logprobs=torch.zeros_like(kl),
        ref_logprobs=torch.zeros_like(kl),
        kl=kl,
        scores=scores,
        valid=torch.ones(mask.shape[0], dtype=torch.bool),
        prompts=[""] * mask.shape[0],
        completions=[""] * mask.shape[0],
        finished=torch.ones(mask.shape[0], dtype=torch.bool),
    )


def test_shaped_rewards_put_the_score_on_the_last_token():
    kl = torch.tensor([[0.5, 1.0, 2.0], [0.1, 0.2, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    exp = _exp(kl, torch.tensor([3.0, -1.0]), mask)
    r = shaped_token_rewards(exp, beta=0.1, kl_in="reward")
    torch.testing.assert_close(r, torch.tensor([[-0.05, -0.1, 2.8], [-0.01, -1.02, 0.0]]))
    torch.testing.assert_close(
        shaped_token_rewards(exp, 0.1, "loss"), torch.tensor([[0.0, 0.0, 3.0], [0.0, -1.0, 0.0]])
    )
    torch.testing.assert_close(sequence_rewards(exp, 0.1, "reward"), torch.tensor([2.65, -1.03]))
    torch.testing.assert_close(sequence_rewards(exp, 0.1, "none"), torch.tensor([3.0, -1.0]))


def test_group_advantages_rloo_and_grpo(tmp_path):
    mask = torch.ones(4, 2, dtype=torch.bool)
    exp = _exp(torch.zeros(4, 2), torch.tensor([1.0, 3.0, 0.0, 0.0]), mask)
    rloo = RLOOConfig(num_generations=2, batch_size=2, kl_coef=0.1)
    torch.testing.assert_close(
        group_advantages(exp, 0.1, rloo)[:, 0], torch.tensor([-2.0, 2, 0, 0])
    )
    grpo = GRPOConfig(num_generations=2, batch_size=2)
    adv = group_advantages(exp, 0.04, grpo)
    assert adv[0, 0] < 0 < adv[1, 0] and adv[2].abs().max() == 0
    exp.valid = torch.tensor([True, False, True, True])  # a dropped sample: no advantage, no pull
    adv = group_advantages(exp, 0.1, rloo)
    assert adv[1].abs().max() == 0 and adv[0].abs().max() == 0


def test_config_errors_name_the_option():
    with pytest.raises(ValueError, match="kl_in=loss needs kl_estimator k1 or k3"):
        PPOConfig(kl_in="loss", kl_estimator="k2")
    with pytest.raises(ValueError, match="num_mini_batches"):
        PPOConfig(batch_size=6, num_mini_batches=4)
    with pytest.raises(ValueError, match="num_generations ≥ 2"):
        GRPOConfig(num_generations=1)
    with pytest.raises(ValueError, match="kl_in=reward"):
        TRPOConfig(kl_in="loss")


def test_collect_behaviour_logprobs_are_the_policy_and_kl_is_zero_at_start(tiny_dir, prompts):
    from tether.data import load_prompt_dataset
    from tether.rewards import make_reward

    pol = load_policy(str(tiny_dir))
    cfg = PPOConfig(**_base(tiny_dir, prompts, "unused", num_generations=2, batch_size=3))
    data = list(load_prompt_dataset(str(prompts), pol.tokenizer))[:3]
    ref = CopyReference(pol.model)
    exp = collect(pol.model, pol.tokenizer, ref, make_reward(REWARD), data, cfg)
    assert exp.size == 6 and exp.old_logprobs.shape == exp.response_mask.shape
    assert exp.kl.abs().max() < 1e-5  # policy = reference at the start
    assert exp.stats["score"] == pytest.approx(float(exp.scores.mean()))
    assert exp.prompts[0] == exp.prompts[1]  # G samples of one prompt are consecutive
    # the behaviour log-probs are what a fresh training forward gives
    from tether.models import forward_logprobs

    p = exp.prompt_length
    out = forward_logprobs(
        pol.model,
        exp.input_ids,
        exp.attention_mask,
        mask=full_logprob_mask(exp.response_mask, p),
    )
    torch.testing.assert_close(
        out.logprobs[:, p - 1 :][exp.response_mask],
        exp.old_logprobs[exp.response_mask],
        atol=1e-5,
        rtol=0,
    )


def test_collect_samples_from_the_synced_copy_and_scores_with_the_model(tiny_dir, prompts):
    from tether.data import load_prompt_dataset
    from tether.models import forward_logprobs
    from tether.models.rollout import RolloutWeights
    from tether.rewards import make_reward

    pol = load_policy(str(tiny_dir))
    cfg = PPOConfig(**_base(tiny_dir, prompts, "unused", num_generations=2, batch_size=3))
    data = list(load_prompt_dataset(str(prompts), pol.tokenizer))[:3]
    ref = CopyReference(pol.model)
    copy = RolloutWeights(pol.model, torch.bfloat16)
    with torch.no_grad():  # the policy moves after the copy was made (an optimizer step)
        for p in pol.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    exp = collect(
        pol.model, pol.tokenizer, ref, make_reward(REWARD), data, cfg, sampler_weights=copy
    )
    for p, q in zip(pol.model.parameters(), copy.model.parameters(), strict=True):
        assert torch.equal(q, p.detach().to(torch.bfloat16))  # collect synced it first
    p = exp.prompt_length
    out = forward_logprobs(
        pol.model, exp.input_ids, exp.attention_mask, mask=full_logprob_mask(exp.response_mask, p)
    )
    m = exp.response_mask
    torch.testing.assert_close(out.logprobs[:, p - 1 :][m], exp.old_logprobs[m], atol=1e-5, rtol=0)


# -- trainers -------------------------------------------------------------------------------------


def test_ppo_raises_the_score_and_beta_bounds_the_kl(tiny_dir, prompts, tmp_path):
    """β = 0 maximises the score and runs away from the reference; a small β still learns with
    a fraction of the KL; a large β stays closest."""
    runs = {}
    for beta in (0.0, 0.01, 0.1):
        out = tmp_path / f"b{beta}"
        train_ppo(PPOConfig(**_base(tiny_dir, prompts, out, kl_coef=beta, max_steps=30)))
        runs[beta] = _rows(out)
    first = _mean(runs[0.01][:5], "score")
    assert _mean(runs[0.01], "score") > first + 0.05, [r["score"] for r in runs[0.01]]
    assert _mean(runs[0.0], "score") > _mean(runs[0.01], "score")
    kl = {b: _mean(rows, "kl/exact") for b, rows in runs.items()}
    assert kl[0.1] < kl[0.01] < 0.5 * kl[0.0], kl
    rows = runs[0.01]
    assert all(r["kl/exact"] >= 0 for r in rows)
    assert {"clip_fraction", "loss/value", "kl_old_new", "entropy", "ratio"} <= rows[-1].keys()


@pytest.mark.parametrize("kind", ["adaptive", "pid"])
def test_controllers_move_beta_towards_the_kl_target(tiny_dir, prompts, tmp_path, kind):
    """After each iteration β rises if the measured KL was above the target, falls if below."""
    out = tmp_path / kind
    cfg = PPOConfig(
        **_base(
            tiny_dir,
            prompts,
            out,
            kl_controller=kind,
            kl_target=1.0,
            kl_horizon=100.0,
            kl_coef=0.01,
            pid_kp=0.0,
            pid_ki=0.002,
            max_steps=12,
            exact_kl_samples=0,
        )
    )
    train_ppo(cfg)
    rows = _rows(out)
    signs = set()
    for now, nxt in zip(rows, rows[1:], strict=False):
        above = now["kl/k1"] > cfg.kl_target
        signs.add(above)
        if nxt["beta"] > 0:  # (not clamped at 0)
            assert (nxt["beta"] > now["beta"]) == above, (now, nxt)
    assert signs == {True, False}  # both directions were exercised


def test_ppo_penalty_adapts_its_beta(tiny_dir, prompts, tmp_path):
    out = tmp_path / "pen"
    cfg = PPOPenaltyConfig(
        **_base(tiny_dir, prompts, out, penalty_beta=1.0, penalty_target=1e-4, max_steps=6)
    )
    train_ppo(cfg)
    rows = _rows(out)
    pb = [r["penalty_beta"] for r in rows]
    # KL(old‖new) after an update at lr 3e-3 is far above d_targ = 1e-4: β doubles each time
    assert pb == [2.0**i for i in range(len(pb))], pb
    assert all(r["clip_fraction"] == 0 for r in rows)


@pytest.mark.parametrize("cls", [GRPOConfig, RLOOConfig])
def test_group_methods_raise_the_score(tiny_dir, prompts, tmp_path, cls):
    out = tmp_path / cls.__name__
    # RLOO's KL sits in the reward, where β·KL must not swamp a score of ~0.01 per sample
    beta = {"kl_coef": 0.01} if cls is RLOOConfig else {}
    cfg = cls(
        **_base(tiny_dir, prompts, out, batch_size=4, num_generations=4, max_steps=25, **beta)
    )
    train_group(cfg)
    rows = _rows(out)
    assert _mean(rows, "score") > _mean(rows[:5], "score") + 0.05, [r["score"] for r in rows]
    assert _mean(rows, "kl/k3") > 0


def test_trpo_raises_the_score_within_the_trust_region(tiny_dir, prompts, tmp_path):
    out = tmp_path / "trpo"
    cfg = TRPOConfig(
        **_base(
            tiny_dir,
            prompts,
            out,
            reward="tests.helpers.rewards:lowercase_fraction",
            max_kl=0.05,
            cg_damping=0.01,
            max_steps=30,
            kl_coef=0.01,
        )
    )
    train_trpo(cfg)
    rows = _rows(out)
    assert _mean(rows, "score") > _mean(rows[:5], "score") + 0.1, [r["score"] for r in rows]
    accepted = [r for r in rows if r["trpo/accepted"] == 1.0]
    assert len(accepted) >= len(rows) // 2
    assert all(0 < r["trpo/kl"] <= cfg.max_kl for r in accepted)
    assert all(r["trpo/improvement"] > 0 for r in accepted)
    assert rows[-1]["loss/value"] < 0.05  # the critic fits the returns


def test_trpo_step_respects_delta_measured_independently(tiny_dir, prompts):
    from tether.data import load_prompt_dataset
    from tether.rewards import make_reward

    pol = load_policy(str(tiny_dir))
    cfg = TRPOConfig(**_base(tiny_dir, prompts, "unused", advantage="rloo", num_generations=4))
    data = list(load_prompt_dataset(str(prompts), pol.tokenizer))[:4]
    exp = collect(
        pol.model, pol.tokenizer, CopyReference(pol.model), make_reward(REWARD), data, cfg
    )
    adv = torch.where(exp.response_mask, torch.randn(exp.response_mask.shape), 0.0)
    with torch.no_grad():
        _, before = _policy_outputs(pol.model, exp, 1.0)
    for delta in (1e-3, 1e-2):
        cfg.max_kl = delta
        theta = [p.detach().clone() for p in pol.model.parameters()]
        stats = trpo_policy_step(SimpleNamespace(model=pol.model, dist=Dist()), exp, adv, cfg)
        with torch.no_grad():
            _, after = _policy_outputs(pol.model, exp, 1.0)
        kl = float(_mean_kl(before, after, exp.response_mask))
        if stats["trpo/accepted"]:
            assert kl <= delta * (1 + 1e-4) and kl == pytest.approx(stats["trpo/kl"], rel=1e-3)
            assert stats["trpo/improvement"] > 0
        else:
            assert kl == 0.0
        with torch.no_grad():
            for p, t in zip(pol.model.parameters(), theta, strict=True):
                p.copy_(t)


@pytest.mark.parametrize("algo", ["ppo", "grpo", "grpo-bf16-rollout"])
def test_resume_equals_uninterrupted(tiny_dir, prompts, tmp_path, algo):
    from safetensors.torch import load_file

    cls, fn = (PPOConfig, train_ppo) if algo == "ppo" else (GRPOConfig, train_group)
    kw = dict(batch_size=4, num_generations=2, save_steps=2, exact_kl_samples=0)
    if algo == "ppo":
        kw.update(kl_controller="adaptive", kl_target=0.5)
    if algo == "grpo-bf16-rollout":  # the sampling copy is rebuilt on resume and synced
        kw.update(rollout_dtype="bf16")
    fn(cls(**_base(tiny_dir, prompts, tmp_path / "full", max_steps=4, **kw)))
    fn(cls(**_base(tiny_dir, prompts, tmp_path / "half", max_steps=2, **kw)))
    fn(cls(**_base(tiny_dir, prompts, tmp_path / "half", max_steps=4, resume=True, **kw)))
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "half" / "final" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = _rows(tmp_path / "full"), _rows(tmp_path / "half")
    assert [r["beta"] for r in ra] == [r["beta"] for r in rb]


def test_grpo_without_the_behaviour_forward_equals_with_it(
    tiny_dir, prompts, tmp_path, monkeypatch
):
    """μ = 1: the first training forward supplies π_old; same update as the extra forward gives."""
    from safetensors.torch import load_file

    kw = dict(batch_size=4, num_generations=4, max_steps=2, exact_kl_samples=0)
    cfg = GRPOConfig(**_base(tiny_dir, prompts, tmp_path / "skip", **kw))
    assert not cfg.needs_behaviour_forward
    train_group(cfg)
    monkeypatch.setattr(GRPOConfig, "needs_behaviour_forward", property(lambda self: True))
    train_group(GRPOConfig(**_base(tiny_dir, prompts, tmp_path / "full", **kw)))
    a = load_file(str(tmp_path / "skip" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    ra, rb = _rows(tmp_path / "skip"), _rows(tmp_path / "full")
    for x, y in zip(ra, rb, strict=True):
        assert x["kl/k3"] == pytest.approx(y["kl/k3"], abs=1e-4)
        assert x["score"] == y["score"]
    assert RLOOConfig().needs_behaviour_forward  # its KL is in the reward: needed before update


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_each_step_logs_where_its_time_went(tiny_dir, prompts, tmp_path, precision):
    """Per step: sampling, reward, reference forward, the fp32 KL forward (only under mixed
    precision with kl_precision=fp32), exact KL and the update, each ≥ 0 and together within the
    step's wall-clock."""
    out = tmp_path / precision
    kw = dict(max_steps=2, batch_size=4, num_generations=2, mixed_precision=precision)
    train_group(GRPOConfig(**_base(tiny_dir, prompts, out, **kw)))
    parts = ("gen_s", "reward_s", "ref_s", "kl_fp32_s", "exact_kl_s", "update_s")
    for r in _rows(out):
        assert all(r[k] >= 0 for k in parts), r
        assert r["kl_s"] == pytest.approx(r["ref_s"] + r["kl_fp32_s"], abs=1e-9)
        assert sum(r[k] for k in parts) <= r["s_per_step"] + 1e-6, r
        if precision == "no":  # fp32 training: no separate fp32 forward
            assert r["kl_fp32_s"] == pytest.approx(0.0, abs=1e-3)
        else:
            assert r["kl_fp32_s"] > 0
