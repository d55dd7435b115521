"""Every config option is range-checked at config load, with a message that names the option as
the user writes it; every default config and recipe still loads; the KL controllers never switch
β off (β ≤ 0) or make it NaN/inf."""

from __future__ import annotations

import math

import pytest

from tether.control.config import (
    PPOControlConfig,
    PPOPenaltyControlConfig,
    TRPOControlConfig,
)
from tether.control.train import ALGORITHMS as CONTROL_ALGORITHMS
from tether.core.controllers import (
    BETA_CEILING,
    BETA_FLOOR,
    PIDKL,
    AdaptiveKL,
    PPOPenaltyKL,
    smallest_valid_horizon,
)
from tether.lab.config import LabConfig
from tether.runs.config import ConfigError, load_config
from tether.runs.registry import TRAINERS, get_trainer


def _cls(name: str) -> type:
    return get_trainer(name)[0]


# (config class or trainer name, overrides, the option the message must name)
BAD_OPTIONS = [
    # SFT
    ("sft", ["eval_fraction=1.0"], "eval_fraction"),
    ("sft", ["max_length=1"], "max_length"),
    ("sft", ["eval_steps=-1"], "eval_steps"),
    ("sft", ["learning_rate=0"], "learning_rate"),
    # DPO (preference data and the shared model/optimiser fields)
    ("dpo", ["beta=0"], "beta"),
    ("dpo", ["beta=.nan"], "beta"),
    ("dpo", ["label_smoothing=0.5"], "label_smoothing"),
    ("dpo", ["label_smoothing=-0.1"], "label_smoothing"),
    ("dpo", ["warmup_steps=-1"], "warmup_steps"),
    ("dpo", ["max_grad_norm=-1.0"], "max_grad_norm"),
    ("dpo", ["max_grad_norm=.inf"], "max_grad_norm"),
    ("dpo", ["weight_decay=-0.01"], "weight_decay"),
    ("dpo", ["adam_betas=[0.9, 1.0]"], "adam_betas[1]"),
    ("dpo", ["adam_betas=[-0.1, 0.999]"], "adam_betas[0]"),
    ("dpo", ["learning_rate=.inf"], "learning_rate"),
    ("dpo", ["learning_rate=.nan"], "learning_rate"),
    ("dpo", ["max_length=256"], "max_length"),
    ("dpo", ["max_prompt_length=0"], "max_prompt_length"),
    ("dpo", ["eval_fraction=1.0"], "eval_fraction"),
    ("dpo", ["eval_steps=0"], "eval_steps"),
    ("dpo", ["temperature=0"], "temperature"),
    ("dpo", ["max_new_tokens=0"], "max_new_tokens"),
    ("dpo", ["sync_tau=0"], "sync_tau"),
    ("dpo", ["sync_alpha=1.5"], "sync_alpha"),
    ("dpo", ["chi2_max_reward=0"], "chi2_max_reward"),
    ("dpo", ["save_steps=-1"], "save_steps"),
    ("dpo", ["batch_size=0"], "batch_size"),
    ("dpo", ["gradient_accumulation_steps=0"], "gradient_accumulation_steps"),
    ("dpo", ["max_bad_steps=0"], "max_bad_steps"),
    # GRPO / RLOO (sampling and the reference-KL options)
    ("grpo", ["num_generations=1"], "num_generations"),
    ("rloo", ["num_generations=1"], "num_generations"),
    ("grpo", ["temperature=.nan"], "temperature"),
    ("grpo", ["temperature=-1"], "temperature"),
    ("grpo", ["top_p=0"], "top_p"),
    ("grpo", ["top_p=1.5"], "top_p"),
    ("grpo", ["top_k=-1"], "top_k"),
    ("grpo", ["kl_coef=-0.1"], "kl_coef"),
    ("grpo", ["kl_coef=.inf"], "kl_coef"),
    ("grpo", ["kl_target=0"], "kl_target"),
    ("grpo", ["kl_horizon=-5"], "kl_horizon"),
    ("grpo", ["clip_eps=0"], "clip_eps"),
    ("grpo", ["clip_eps_high=-0.1"], "clip_eps_high"),
    ("grpo", ["ppo_epochs=0"], "ppo_epochs"),
    ("grpo", ["num_mini_batches=0"], "num_mini_batches"),
    ("grpo", ["max_new_tokens=0"], "max_new_tokens"),
    ("grpo", ["max_prompt_length=0"], "max_prompt_length"),
    ("grpo", ["eval_steps=-1"], "eval_steps"),
    # A horizon too small for one process's rollout (8 prompts × 8 generations = 64 samples).
    ("grpo", ["kl_controller=adaptive", "kl_horizon=12.8"], "kl_horizon"),
    # PPO / PPO-penalty
    ("ppo", ["clip_eps=-0.2"], "clip_eps"),
    ("ppo", ["value_clip=0"], "value_clip"),
    ("ppo", ["vf_coef=-1"], "vf_coef"),
    ("ppo", ["lam=1.5"], "lam"),
    ("ppo", ["gamma=.nan"], "gamma"),
    ("ppo", ["target_kl=0"], "target_kl"),
    ("ppo", ["entropy_coef=.nan"], "entropy_coef"),
    ("ppo", ["pid_kp=-1"], "pid_kp"),
    ("ppo", ["pid_ki=.inf"], "pid_ki"),
    ("ppo", ["tis_cap=0"], "tis_cap"),
    ("ppo", ["exact_kl_samples=-1"], "exact_kl_samples"),
    ("ppo", ["kl_max=0"], "kl_max"),
    ("ppo", ["kl_warn_factor=.nan"], "kl_warn_factor"),
    ("ppo", ["kl_warn_iterations=0"], "kl_warn_iterations"),
    ("ppo", ["kl_controller=adaptive", "kl_coef=0"], "kl_coef"),
    ("ppo", ["kl_controller=adaptive", "kl_horizon=1"], "kl_horizon"),
    ("ppo_penalty", ["penalty_target=0"], "penalty_target"),
    ("ppo_penalty", ["penalty_beta=.nan"], "penalty_beta"),
    # TRPO
    ("trpo", ["max_kl=0"], "max_kl"),
    ("trpo", ["max_kl=.inf"], "max_kl"),
    ("trpo", ["cg_damping=-0.1"], "cg_damping"),
    ("trpo", ["backtrack_ratio=1.0"], "backtrack_ratio"),
    ("trpo", ["cg_iters=0"], "cg_iters"),
    ("trpo", ["max_backtracks=0"], "max_backtracks"),
    ("trpo", ["lam=-0.1"], "lam"),
    ("trpo", ["advantage=grpo"], "num_generations"),
    # Online DPO
    ("online_dpo", ["beta=0"], "beta"),
    ("online_dpo", ["beta_end=-1"], "beta_end"),
    ("online_dpo", ["kl_target=0"], "kl_target"),
    ("online_dpo", ["kl_horizon=.nan"], "kl_horizon"),
    ("online_dpo", ["label_smoothing=0.5"], "label_smoothing"),
    ("online_dpo", ["min_score_gap=-1"], "min_score_gap"),
    ("online_dpo", ["top_p=0"], "top_p"),
    # 8 prompts × 2 samples = 16 samples per update: the horizon must exceed 0.2·16 = 3.2.
    ("online_dpo", ["beta_schedule=adaptive", "kl_horizon=3"], "kl_horizon"),
    # Reward model
    ("reward", ["margin=-1"], "margin"),
    ("reward", ["margin=.nan"], "margin"),
    ("reward", ["center_rewards_coefficient=-1"], "center_rewards_coefficient"),
    ("reward", ["eval_fraction=-0.1"], "eval_fraction"),
    ("reward", ["max_length=10"], "max_length"),
    ("reward", ["normalization_samples=-1"], "normalization_samples"),
    ("reward", ["learning_rate=0"], "learning_rate"),
    ("reward", ["warmup_steps=-3"], "warmup_steps"),
    # Sharding: combinations that need whole weights (an unknown value: below)
    ("trpo", ["sharding=fsdp2"], "sharding=fsdp2"),
    ("dpo", ["sharding=fsdp2", "reference=synced"], "reference=synced"),
    ("online_dpo", ["sharding=fsdp2", "reference=synced"], "reference=synced"),
    ("grpo", ["sharding=fsdp2", "rollout_dtype=bf16"], "rollout_dtype=bf16"),
    ("ppo", ["sharding=fsdp2", "rollout_dtype=fp16"], "rollout_dtype=fp16"),
    # Control
    (PPOControlConfig, ["clip_range=0"], "clip_range"),
    (PPOControlConfig, ["max_grad_norm=-0.5"], "max_grad_norm"),
    (PPOControlConfig, ["learning_rate=.nan"], "learning_rate"),
    (PPOControlConfig, ["gamma=1.5"], "gamma"),
    (PPOControlConfig, ["gae_lambda=-0.1"], "gae_lambda"),
    (PPOControlConfig, ["n_epochs=0"], "n_epochs"),
    (PPOControlConfig, ["vf_coef=-1"], "vf_coef"),
    (PPOControlConfig, ["clip_range_vf=0"], "clip_range_vf"),
    (PPOControlConfig, ["target_kl=0"], "target_kl"),
    (PPOControlConfig, ["log_std_init=.nan"], "log_std_init"),
    (PPOControlConfig, ["eval_episodes=-1"], "eval_episodes"),
    (PPOPenaltyControlConfig, ["kl_factor=1.0"], "kl_factor"),
    (PPOPenaltyControlConfig, ["kl_tolerance=0.5"], "kl_tolerance"),
    (PPOPenaltyControlConfig, ["kl_coef=0"], "kl_coef"),
    (TRPOControlConfig, ["cg_damping=-1"], "cg_damping"),
    (TRPOControlConfig, ["max_kl=.inf"], "max_kl"),
    (TRPOControlConfig, ["vf_batch_size=0"], "vf_batch_size"),
    # The over-optimisation lab
    (LabConfig, ["proxy.epochs=0"], "epochs"),
    (LabConfig, ["proxy.learning_rate=.nan"], "learning_rate"),
    (LabConfig, ["proxy.heldout_pairs=0"], "heldout_pairs"),
    (LabConfig, ["proxy.min_gap=-1"], "min_gap"),
    (LabConfig, ["proxy.uwo_lambda=-1"], "uwo_lambda"),
    (LabConfig, ["proxy.prompts=0"], "prompts"),
    (LabConfig, ["proxy.max_length=1"], "max_length"),
    (LabConfig, ["bon.pool=0"], "pool"),
    (LabConfig, ["temperature=0"], "temperature"),
    (LabConfig, ["max_new_tokens=0"], "max_new_tokens"),
    (LabConfig, ["batch_size=0"], "batch_size"),
]


def _case_id(case: tuple) -> str:
    target, overrides, _ = case
    name = target if isinstance(target, str) else target.__name__
    return f"{name}:{'|'.join(overrides)}"


@pytest.mark.parametrize("case", BAD_OPTIONS, ids=[_case_id(c) for c in BAD_OPTIONS])
def test_bad_option_is_a_config_error_naming_it(case):
    target, overrides, option = case
    cls = _cls(target) if isinstance(target, str) else target
    with pytest.raises(ConfigError) as info:
        load_config(cls, None, overrides)
    message = str(info.value)
    # The message repeats the overrides; the option must be named in what comes after them.
    explanation = message.split(overrides[-1], 1)[-1]
    assert option in explanation, message
    assert "must be" in explanation, message


@pytest.mark.parametrize("trainer", ["dpo", "sft", "grpo", "reward"])
def test_an_unknown_sharding_is_a_config_error_naming_the_values(trainer):
    with pytest.raises(ConfigError) as info:
        load_config(_cls(trainer), None, ["sharding=zero3"])
    assert "'sharding'" in str(info.value) and "'none', 'fsdp2'" in str(info.value)


def test_there_are_enough_cases_per_trainer():
    names = {c[0] if isinstance(c[0], str) else c[0].__name__ for c in BAD_OPTIONS}
    assert set(TRAINERS) <= names
    assert len(BAD_OPTIONS) >= 25


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_every_trainer_default_config_loads(name):
    cfg = load_config(_cls(name))
    assert cfg.learning_rate > 0


@pytest.mark.parametrize("name", sorted(CONTROL_ALGORITHMS))
def test_every_control_default_config_loads(name):
    load_config(CONTROL_ALGORITHMS[name])


def test_lab_default_config_loads():
    load_config(LabConfig)


LEGITIMATE = [
    ("grpo", ["max_grad_norm=null"]),
    ("grpo", ["top_k=0", "top_p=1.0"]),
    ("grpo", ["warmup_steps=0", "weight_decay=0.0", "adam_betas=[0.0, 0.0]"]),
    ("grpo", ["kl_coef=0.0"]),  # β = 0: a legitimate no-penalty baseline
    ("grpo", ["eval_steps=0"]),  # held-out evaluation off
    ("grpo", ["kl_controller=adaptive", "kl_horizon=13"]),  # > 0.2 × 64 samples
    ("ppo", ["entropy_coef=-0.01", "tis_cap=0.5", "value_clip=null", "gamma=0", "lam=1"]),
    ("dpo", ["label_smoothing=0.49", "sync_alpha=0", "max_length=257"]),
    ("reward", ["margin=0", "eval_fraction=0", "normalization_samples=0"]),
    ("online_dpo", ["min_score_gap=0", "label_smoothing=0"]),
    ("trpo", ["cg_damping=0", "advantage=rloo", "num_generations=2"]),
]


@pytest.mark.parametrize(
    "name, overrides", LEGITIMATE, ids=lambda x: "|".join(x) if isinstance(x, list) else x
)
def test_legitimate_edge_values_load(name, overrides):
    load_config(_cls(name), None, overrides)


# --------------------------------------------------------------------------------------------
# Controllers: β never reaches ≤ 0, NaN or inf
# --------------------------------------------------------------------------------------------

H = 10.0  # horizon
MAX_ERROR = 0.2  # 1/max_error = 5: n_steps/horizon = 5 is the boundary


def test_adaptive_just_below_the_boundary_keeps_beta_positive():
    c = AdaptiveKL(init_beta=0.05, target=6.0, horizon=H)
    beta = c.update(0.0, 49)  # n/h = 4.9 < 1/max_error: factor 1 − 0.98 = 0.02
    assert beta == 0.05 * (1.0 + -MAX_ERROR * 49 / H) and beta > 0


@pytest.mark.parametrize("n_steps", [50, 51, 1000])
def test_adaptive_at_or_above_the_boundary_names_the_horizon(n_steps):
    c = AdaptiveKL(init_beta=0.05, target=6.0, horizon=H)
    with pytest.raises(ValueError) as info:
        c.update(0.0, n_steps)
    message = str(info.value)
    assert "horizon" in message and "kl_horizon" in message and "n_steps" in message
    smallest = smallest_valid_horizon(n_steps)
    assert f"smallest valid value is {smallest}" in message
    assert smallest > MAX_ERROR * n_steps >= smallest - 1
    assert c.beta == 0.05  # a refused update changes nothing
    ok = AdaptiveKL(init_beta=0.05, target=6.0, horizon=smallest)
    assert ok.update(0.0, n_steps) > 0


def test_adaptive_refuses_whatever_the_kl():
    """The factor could reach ≤ 0 on the next KL below target: refuse the horizon outright, also
    when this update's KL is above target."""
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKL(init_beta=0.05, target=6.0, horizon=H).update(100.0, 50)


def test_adaptive_many_shrinking_updates_stop_at_the_floor_and_recover():
    c = AdaptiveKL(init_beta=0.05, target=6.0, horizon=H)
    for _ in range(500):  # × 0.02 each: 0.05·0.02^500 underflows to 0 without the floor
        c.update(0.0, 49)
        assert c.beta > 0
    assert c.beta == BETA_FLOOR
    assert c.update(100.0, 49) > BETA_FLOOR  # a KL above target moves it up again


def test_adaptive_growth_stays_finite():
    c = AdaptiveKL(init_beta=1e300, target=1.0, horizon=1.0)
    for _ in range(100):
        c.update(100.0, 4)  # × 1.8 each: overflows to inf without the ceiling
    assert c.beta == BETA_CEILING and math.isfinite(c.beta)


def test_adaptive_normal_regime_is_the_formula_bit_for_bit():
    import random

    rng = random.Random(0)
    c = AdaptiveKL(init_beta=0.05, target=6.0, horizon=10_000.0)
    beta = 0.05
    for _ in range(500):
        kl, n = rng.uniform(0.0, 20.0), rng.choice([64, 256, 512, 2048])
        error = min(max(kl / 6.0 - 1.0, -0.2), 0.2)
        beta = min(max(beta * (1.0 + error * n / 10_000.0), 0.0), math.inf)
        assert c.update(kl, n) == beta  # exact equality: the rule is unchanged


def test_rl_config_horizon_is_checked_per_process_and_the_controller_globally():
    """A horizon valid for one process's rollout (8 × 8 = 64 samples: > 12.8) can still be too
    small for the global rollout of N processes; the controller refuses it at the first update."""
    from tether.train.rl import make_kl_controller

    cfg = load_config(_cls("grpo"), None, ["kl_controller=adaptive", "kl_horizon=20"])
    ctl = make_kl_controller(cfg)
    assert ctl.update(0.0, n_steps=cfg.rollout_size) > 0  # one process
    with pytest.raises(ValueError, match="kl_horizon"):
        ctl.update(0.0, n_steps=cfg.rollout_size * 2)  # two processes: 0.2·128 = 25.6 > 20


def test_online_dpo_adaptive_horizon_message_names_the_options():
    with pytest.raises(ConfigError) as info:
        load_config(_cls("online_dpo"), None, ["beta_schedule=adaptive", "kl_horizon=3"])
    message = str(info.value).split("kl_horizon=3", 1)[1]
    assert "kl_horizon" in message and "batch_size" in message
    load_config(_cls("online_dpo"), None, ["beta_schedule=adaptive", "kl_horizon=4"])


def test_ppo_penalty_halving_never_reaches_zero_nor_doubling_inf():
    c = PPOPenaltyKL(init_beta=0.05, target=1.0)
    for _ in range(2000):  # 2^-2000 underflows to 0 without the floor
        c.update(0.0)
    assert c.beta == BETA_FLOOR > 0
    assert c.update(10.0) == 2 * BETA_FLOOR  # and doubling brings it back
    for _ in range(3000):  # from 2^-1021: overflows to inf without the ceiling
        c.update(10.0)
    assert c.beta == BETA_CEILING and math.isfinite(c.beta)


def test_ppo_penalty_normal_regime_unchanged():
    c = PPOPenaltyKL(init_beta=1.0, target=0.01)
    assert [c.update(k) for k in (0.02, 0.012, 0.0066, 0.0)] == [2.0, 2.0, 1.0, 0.5]


def test_pid_huge_kl_with_zero_gains_is_not_nan():
    """(KL − target)/target overflows to inf for a huge finite KL over a tiny target; with a
    zero gain 0·inf would be NaN."""
    c = PIDKL(target=1e-300, kp=0.0, ki=0.0, kd=0.0, init_beta=0.1)
    assert c.update(1e10) == 0.1
    assert c.update(1e300) == 0.1
    d = PIDKL(target=1e-300, kp=1.0, ki=1.0, kd=1.0, init_beta=0.1, beta_max=5.0)
    assert d.update(1e10) == 5.0
    assert d.update(1e308) == 5.0 and d.update(0.0) >= 0.0


def test_pid_may_reach_zero_by_design():
    c = PIDKL(target=1.0, kp=1.0, ki=0.0, init_beta=0.5)
    assert c.update(0.0) == 0.0  # the constraint is slack: the multiplier is 0, not an error


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf")])
def test_multiplicative_controllers_refuse_a_restored_beta_they_cannot_leave(bad):
    for make in (
        lambda: AdaptiveKL(init_beta=0.05, target=1.0, horizon=100.0),
        lambda: PPOPenaltyKL(init_beta=0.05, target=1.0),
    ):
        c = make()
        state = dict(c.state_dict(), beta=bad)
        with pytest.raises(ValueError, match="beta"):
            c.load_state_dict(state)
        assert c.beta == 0.05


def test_pid_restores_a_zero_beta():
    c = PIDKL(target=1.0)
    state = dict(c.state_dict(), beta=0.0)
    c.load_state_dict(state)
    assert c.beta == 0.0
    with pytest.raises(ValueError, match="beta"):
        c.load_state_dict(dict(state, beta=float("nan")))
