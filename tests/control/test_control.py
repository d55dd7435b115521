"""tether.control: environment pool, normalisation, GAE boundaries, the trust region on a policy
MLP, the three algorithms solving CartPole, the β rule, the CLI, and a continuous-action run."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, kl_divergence

pytest.importorskip("gymnasium")

from tether.cli import main
from tether.control import (
    PPOControlConfig,
    PPOPenaltyControlConfig,
    TRPOControlConfig,
    train,
)
from tether.control.algorithms import collect_rollout, trpo_update
from tether.control.envs import EnvPool
from tether.control.normalize import ObsNormalizer, RewardScaler, RunningMeanStd
from tether.control.policy import ControlPolicy
from tether.core.trust_region import fisher_vector_product, flatten
from tether.runs import read_metrics


def _rows(out):
    return [r for r in read_metrics(out) if "episodes" in r]


# -- environments and normalisation -----------------------------------------------------------


def test_pool_resets_in_the_same_step_and_returns_the_final_observation():
    pool = EnvPool("CartPole-v1", 2, seed=0, env_kwargs={"max_episode_steps": 5})
    obs = pool.reset()
    for t in range(5):
        nxt, rew, term, trunc, final = pool.step(np.zeros(2, dtype=np.int64))
        if t < 4:
            assert not (term | trunc).any() and np.array_equal(nxt, final)
    # step 5: both hit the time limit (pushing left for 5 steps does not drop the pole)
    assert trunc.all() and not term.any()
    assert not np.allclose(nxt, final)  # nxt is a fresh episode's first observation
    assert np.abs(nxt).max() <= 0.05  # CartPole resets to U(−0.05, 0.05)
    assert [(e.length, e.truncated, e.ret) for e in pool.episodes] == [(5, True, 5.0)] * 2
    assert pool.env_steps == 10 and obs.dtype == np.float32


def test_running_mean_std_merges_batches_exactly():
    g = np.random.default_rng(0)
    parts = [g.normal(3.0, 2.0, size=(n, 3)) for n in (5, 17, 1, 40)]
    rms = RunningMeanStd((3,))
    for p in parts:
        rms.update(p)
    allx = np.concatenate(parts)
    np.testing.assert_allclose(rms.mean, allx.mean(0), rtol=1e-6)
    np.testing.assert_allclose(rms.var, allx.var(0), rtol=1e-6)


def test_obs_normaliser_and_reward_scaler():
    norm = ObsNormalizer(2, enabled=True, clip=3.0)
    norm.update(np.array([[0.0, 10.0], [2.0, 10.0]]))
    out = norm(np.array([[1.0, 100.0]], dtype=np.float32))
    assert out[0, 0] == pytest.approx(0.0, abs=1e-6) and out[0, 1] == 3.0  # clipped
    scaler = RewardScaler(1, gamma=0.5, enabled=True)
    r1 = scaler(np.array([2.0]), np.array([False]))
    # first update: G = 2, statistics over {2} merged with the ε-count prior: var ≈ 0
    assert np.isfinite(r1).all()
    scaler(np.array([2.0]), np.array([True]))  # G = 0.5·2 + 2 = 3, then reset
    assert scaler.returns[0] == 0.0
    assert scaler.rms.mean == pytest.approx(2.5, rel=1e-6)  # mean of the returns {2, 3}
    assert RewardScaler(1, 0.9, enabled=False)(np.array([7.0]), np.array([True]))[0] == 7.0


def test_gae_bootstraps_truncation_not_termination():
    """λ = 0 and V ≡ c: δ = r + γc − c where the episode goes on or is cut by the time limit,
    δ = r − c where it terminated."""
    torch.manual_seed(0)
    pool = EnvPool("CartPole-v1", 3, seed=1, env_kwargs={"max_episode_steps": 30})
    policy = ControlPolicy(pool.spec, [8])
    c, gamma = 2.0, 0.9
    with torch.no_grad():
        policy.vf[-1].weight.zero_()
        policy.vf[-1].bias.fill_(c)
    obs = pool.reset()
    norm = ObsNormalizer(4, False)
    batch, _ = collect_rollout(
        pool, policy, obs, norm, RewardScaler(3, gamma, False), 100, gamma, 0.0
    )
    adv = batch.advantages
    go_on, ended = 1.0 + gamma * c - c, 1.0 - c
    assert torch.all((adv - go_on).abs().lt(1e-5) | (adv - ended).abs().lt(1e-5))
    n_term = sum(not e.truncated for e in pool.episodes)
    n_trunc = sum(e.truncated for e in pool.episodes)
    assert n_term > 0 and n_trunc > 0  # both kinds of episode end occurred
    assert int((adv - ended).abs().lt(1e-5).sum()) == n_term
    torch.testing.assert_close(batch.returns, adv + c)


# -- the trust region on a real policy network ---------------------------------------------------


@pytest.mark.parametrize("env", ["CartPole-v1", "Pendulum-v1"])
def test_fisher_vector_product_is_the_hessian_of_the_kl(env):
    torch.manual_seed(0)
    pool = EnvPool(env, 1, seed=0)
    policy = ControlPolicy(pool.spec, [3]).double()
    with torch.no_grad():
        for p in policy.policy_parameters():
            p.add_(0.3 * torch.randn_like(p))
    obs = torch.randn(9, pool.spec.obs_dim, dtype=torch.float64)
    params = policy.policy_parameters()
    old = policy.dist(obs).detach()
    fvp = fisher_vector_product(old.kl(policy.dist(obs)).mean(), params, damping=0.0)
    theta0 = flatten([p.detach() for p in params])
    shapes = [p.shape for p in params]
    name_of = {id(p): n for n, p in policy.named_parameters()}
    names = [name_of[id(p)] for p in params]

    def mean_kl(theta):
        chunks, i = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            k = int(np.prod(shape))
            chunks[name] = theta[i : i + k].view(shape)
            i += k
        d = torch.func.functional_call(policy, chunks, (obs,), strict=False)
        return old.kl(d).mean()

    h = torch.autograd.functional.hessian(mean_kl, theta0)
    cols = torch.stack([fvp(e) for e in torch.eye(theta0.numel(), dtype=torch.float64)], 1)
    torch.testing.assert_close(cols, h, rtol=1e-8, atol=1e-10)


def test_trpo_accepted_steps_stay_in_the_trust_region_measured_independently():
    torch.manual_seed(0)
    pool = EnvPool("CartPole-v1", 2, seed=0)
    cfg = TRPOControlConfig(output_dir="unused", n_envs=2, n_steps=128, max_kl=0.01, vf_iters=1)
    policy = ControlPolicy(pool.spec, [16])
    vf_opt = torch.optim.Adam(policy.value_parameters(), lr=1e-3)
    norm, scaler = ObsNormalizer(4, False), RewardScaler(2, 0.99, False)
    obs = pool.reset()
    accepted = 0
    for _ in range(6):
        batch, obs = collect_rollout(pool, policy, obs, norm, scaler, 128, 0.99, 0.95)
        before = [p.detach().clone() for p in policy.policy_parameters()]
        m = trpo_update(policy, vf_opt, batch, cfg)
        with torch.no_grad():  # torch.distributions, not tether's KL
            kl = kl_divergence(
                Categorical(logits=batch.old.logits),
                Categorical(logits=policy.dist(batch.obs).logits),
            ).mean()
        if m["trpo/accepted"]:
            accepted += 1
            assert 0 < float(kl) <= cfg.max_kl * (1 + 1e-6)
            assert float(kl) == pytest.approx(m["trpo/line_search_kl"], rel=1e-5)
        else:
            for p, b in zip(policy.policy_parameters(), before, strict=True):
                assert torch.equal(p, b)  # a rejected step leaves θ_old exactly
    assert accepted >= 4


# -- the algorithms solve CartPole (fixed seeds; each well under a minute on 2 cores) ------------

SOLVE = [
    "target_return=195",
    "return_window=100",
    "eval_episodes=10",
    "seed=0",
    "total_timesteps=100000",
    "logging_steps=1",
]
RECIPES_DIR = Path(__file__).parents[2] / "recipes" / "control"


@pytest.mark.parametrize("algo", ["ppo", "ppo_penalty", "trpo"])
def test_cartpole_reaches_195(algo, tmp_path):
    """The shipped CartPole recipes, stopped once the last 100 episodes average ≥ 195."""
    from tether.control import ALGORITHMS
    from tether.runs.config import load_config

    recipe = RECIPES_DIR / f"{algo}-cartpole.yaml"
    cfg = load_config(ALGORITHMS[algo], recipe, [f"output_dir={tmp_path / 'run'}", *SOLVE])
    final = train(cfg)
    assert final["episode_return"] >= 195.0, final  # mean of the last 100 training episodes
    assert final["env_steps"] < 100_000  # reached before the budget ran out
    assert final["eval_return"] >= 195.0, final  # and so does the deterministic policy
    rows = _rows(tmp_path / "run")
    assert rows[0]["episode_return"] < 60  # it learned: a random policy lasts ≈ 20 steps


def test_ppo_penalty_beta_follows_the_rule(tmp_path):
    common = dict(
        env="CartPole-v1",
        n_envs=4,
        n_steps=32,
        batch_size=64,
        n_epochs=4,
        max_steps=4,
        learning_rate=1e-3,
        eval_episodes=0,
    )
    train(PPOPenaltyControlConfig(output_dir=str(tmp_path / "hi"), kl_target=1e-7, **common))
    betas = [r["penalty_beta"] for r in _rows(tmp_path / "hi")]
    assert betas == [1.0, 2.0, 4.0, 8.0]  # KL far above d_targ: doubled after every update
    train(PPOPenaltyControlConfig(output_dir=str(tmp_path / "lo"), kl_target=10.0, **common))
    rows = _rows(tmp_path / "lo")
    assert [r["penalty_beta"] for r in rows] == [1.0, 0.5, 0.25, 0.125]
    assert all(r["kl_old_new"] < 10.0 / 1.5 for r in rows)


def test_cli_trains_evaluates_resumes_and_names_bad_input(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "control",
        "ppo",
        "--env",
        "CartPole-v1",
        f"output_dir={out}",
        "n_envs=2",
        "n_steps=64",
        "batch_size=64",
        "n_epochs=2",
        "max_steps=2",
        "eval_episodes=2",
    ]
    assert main(args) == 0
    assert "env_steps=256" in capsys.readouterr().out
    assert json.loads((out / "control.json").read_text())["algorithm"] == "ppo"
    assert main(["control", "eval", str(out), "--episodes", "3"]) == 0
    assert "over 3 deterministic episodes" in capsys.readouterr().out
    assert main(["plot", str(out), "--keys", "episode_return,kl_old_new"]) == 0
    assert (out / "metrics.png").stat().st_size > 0
    # resume continues the step and env-step counts
    assert main([*args[:-2], "max_steps=4", "eval_episodes=0", "resume=true"]) == 0
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["env_steps"] == 4 * 128
    assert main(["control", "ppo", "--env", "NoSuchEnv-v0", f"output_dir={tmp_path / 'x'}"]) == 2
    assert "NoSuchEnv-v0" in capsys.readouterr().err
    assert main(["control", "ppo", "--env", "FrozenLake-v1", f"output_dir={tmp_path / 'y'}"]) == 2
    assert "flat Box observation space" in capsys.readouterr().err
    assert main(["control", "sac"]) == 2
    assert "ppo, ppo_penalty, trpo, eval" in capsys.readouterr().err
    assert main(["control", "ppo", "batch_size=4096", "n_envs=2", "n_steps=8"]) == 2
    assert "batch_size" in capsys.readouterr().err
    assert main(["control", "eval", str(tmp_path)]) == 2
    assert "not a tether control run" in capsys.readouterr().err


def test_continuous_actions_pendulum_learns_something(tmp_path):
    cfg = PPOControlConfig(
        output_dir=str(tmp_path / "run"),
        env="Pendulum-v1",
        n_envs=4,
        n_steps=256,
        batch_size=256,
        n_epochs=10,
        gamma=0.9,
        gae_lambda=0.95,
        learning_rate=1e-3,
        normalize_obs=True,
        normalize_reward=True,
        max_steps=12,
        eval_episodes=3,
        seed=0,
        log_std_init=-0.5,
    )
    final = train(cfg)
    rows = _rows(tmp_path / "run")
    assert all(np.isfinite(r["policy_loss"]) for r in rows)
    assert rows[-1]["entropy"] != rows[0]["entropy"]  # log σ is trained
    assert final["eval_return"] > -1600  # a random policy scores ≈ −1200 ± 300 on average


CONTROL_RECIPES = sorted((Path(__file__).parents[2] / "recipes" / "control").glob("*.yaml"))


@pytest.mark.parametrize("path", CONTROL_RECIPES, ids=lambda p: p.stem)
def test_control_recipe_loads_and_runs(path, tmp_path):
    from tether.control import ALGORITHMS
    from tether.runs.config import load_config

    algo = path.stem.split("-")[0]
    cfg = load_config(ALGORITHMS[algo], path)
    assert cfg.output_dir.startswith("runs/control/")
    out = tmp_path / "run"
    argv = ["control", algo, "-c", str(path), f"output_dir={out}", "total_timesteps=0"]
    assert main([*argv, "max_steps=1", "eval_episodes=1"]) == 0
    assert [r["step"] for r in _rows(out)] == [1]


def test_env_flag_names_the_run_directory(capsys):
    """`--env` alone puts each run in runs/control/ALGO-ENV (what the README's eval line reads);
    an output_dir from an override or the recipe wins."""
    from tether.cli import control_run_dir

    assert control_run_dir("ppo", "CartPole-v1") == "runs/control/ppo-cartpole"
    assert control_run_dir("trpo", "ALE/Pong-v5") == "runs/control/trpo-pong"
    assert control_run_dir("ppo", "Pendulum") == "runs/control/ppo-pendulum"

    def out_dir(argv):
        assert main(["control", *argv, "--print-config"]) == 0
        lines = capsys.readouterr().out.splitlines()
        return next(line for line in lines if line.startswith("output_dir:")).split(": ", 1)[1]

    assert out_dir(["ppo", "--env", "CartPole-v1"]) == "runs/control/ppo-cartpole"
    assert out_dir(["trpo", "--env", "Acrobot-v1"]) == "runs/control/trpo-acrobot"
    assert out_dir(["ppo", "--env", "CartPole-v1", "output_dir=mine"]) == "mine"
    recipe = str(Path(__file__).parents[2] / "recipes" / "control" / "trpo-pendulum.yaml")
    assert out_dir(["trpo", "--env", "Pendulum-v1", "-c", recipe]) == "runs/control/trpo-pendulum"
    assert out_dir(["ppo"]) == "runs/control"  # no --env: the config's default
