"""The ``tether control`` loop: rollout → update → metrics/checkpoints, and evaluation.

Run directory as for the language-model trainers (``config.yaml``, ``metrics.jsonl``,
``checkpoints/step-NNNNNN`` written atomically, ``tether plot``), plus ``control.json`` naming the
algorithm and the environment's spaces so ``tether control eval RUN_DIR`` can rebuild the policy.
A checkpoint holds the networks, the optimizer, the observation/reward statistics, β of
PPO-penalty and the RNG states; gymnasium environments cannot be checkpointed, so a resumed run
starts fresh episodes (seeded by the iteration) rather than continuing the interrupted ones.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tether.control.algorithms import (
    collect_rollout,
    explained_variance,
    ppo_penalty_update,
    ppo_update,
    trpo_update,
)
from tether.control.config import (
    CONFIGS,
    ControlConfig,
    PPOControlConfig,
    PPOPenaltyControlConfig,
    TRPOControlConfig,
)
from tether.control.envs import EnvPool, Episode, SpaceSpec, make_env
from tether.control.normalize import ObsNormalizer, RewardScaler
from tether.control.policy import ControlPolicy
from tether.core.controllers import PPOPenaltyKL
from tether.runs import RunDir
from tether.runs.checkpoint import latest_checkpoint, load_checkpoint
from tether.train.guards import StepGuard

CONTROL_FILE = "control.json"
ALGORITHMS = CONFIGS
"""Algorithm name → its config class (defined in the torch-free :mod:`tether.control.config`)."""


def algorithm_of(cfg: ControlConfig) -> str:
    for name, cls in ALGORITHMS.items():
        if type(cfg) is cls:
            return name
    raise TypeError(f"not a control config: {type(cfg).__name__}")


def build_policy(spec: SpaceSpec, cfg: ControlConfig) -> ControlPolicy:
    return ControlPolicy(spec, cfg.hidden, cfg.activation, cfg.ortho_init, cfg.log_std_init)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _adam(params: Any, lr: float) -> torch.optim.Optimizer:
    """Adam with ε = 1e-5 (baselines/SB3), fused: for small MLPs on a CPU the per-parameter loop
    of the default implementation costs 3× the fused kernel."""
    return torch.optim.Adam(params, lr=lr, eps=1e-5, fused=True)


def _schedule(kind: str, value: float, progress: float) -> float:
    """``value`` (constant) or ``value·(1 − progress)`` (linear), progress ∈ [0, 1)."""
    return value if kind == "constant" else value * (1.0 - progress)


@dataclass
class ControlRun:
    """What :func:`fit` leaves: the last metrics, the trained policy, its observation statistics
    and every finished training episode."""

    metrics: dict[str, float]
    policy: ControlPolicy
    obs_norm: ObsNormalizer
    episodes: list[Episode]
    train_s: float
    """Seconds of the training loop (rollouts and updates, no setup or final evaluation)."""


def train(cfg: ControlConfig) -> dict[str, float]:
    """Train ``cfg``'s algorithm on ``cfg.env``; returns the last iteration's metrics (with
    ``eval_return`` when ``eval_episodes`` > 0)."""
    return fit(cfg).metrics


def fit(cfg: ControlConfig) -> ControlRun:
    """:func:`train`, returning the policy and the episode records too."""
    algo = algorithm_of(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.torch_threads)
    try:
        return _train(cfg, algo)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: ControlConfig, algo: str) -> ControlRun:
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    pool = EnvPool(cfg.env, cfg.n_envs, cfg.seed, cfg.env_kwargs)
    spec = pool.spec
    policy = build_policy(spec, cfg)
    obs_norm = ObsNormalizer(spec.obs_dim, cfg.normalize_obs)
    reward_scaler = RewardScaler(cfg.n_envs, cfg.gamma, cfg.normalize_reward)
    if isinstance(cfg, TRPOControlConfig):
        optimizer = _adam(policy.value_parameters(), cfg.learning_rate)
    else:
        optimizer = _adam(policy.parameters(), cfg.learning_rate)
    controller = None
    if isinstance(cfg, PPOPenaltyControlConfig):
        controller = PPOPenaltyKL(cfg.kl_coef, cfg.kl_target, cfg.kl_tolerance, cfg.kl_factor)
    run = RunDir.from_config(cfg)
    _write_json(
        run.path / CONTROL_FILE, {"algorithm": algo, "env": cfg.env, "spec": spec.to_dict()}
    )
    step, states = run.restore(models={"policy": policy}, optimizer=optimizer)
    guard = StepGuard(cfg.max_bad_steps, run.path)
    if states:
        guard.load_state_dict(states.get("guard", guard.state_dict()))
        obs_norm.load_state_dict(states["obs_norm"])
        reward_scaler.load_state_dict(states["reward_scaler"])
        if controller is not None:
            controller.load_state_dict(states["kl_controller"])
        pool.env_steps = int(states["env_steps"])
        pool.seed = cfg.seed + 1_000_003 * step  # fresh episodes after a resume
    obs = pool.reset()
    obs_norm.update(obs)
    final: dict[str, float] = {}
    pool.start_clock()  # episode times count from here, after setup (as SB3's from learn())
    t_start = time.perf_counter()
    steps_at_start = pool.env_steps
    reached = False
    while step < cfg.max_steps and not reached:
        progress = step / cfg.max_steps
        lr = _schedule(cfg.lr_schedule, cfg.learning_rate, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        batch, obs = collect_rollout(
            pool,
            policy,
            obs,
            obs_norm,
            reward_scaler,
            cfg.n_steps,
            cfg.gamma,
            cfg.gae_lambda,
        )
        t1 = time.perf_counter()
        metrics: dict[str, float]
        if isinstance(cfg, PPOControlConfig):
            clip = _schedule(cfg.clip_schedule, cfg.clip_range, progress)
            metrics = ppo_update(policy, optimizer, batch, cfg, clip)
        elif isinstance(cfg, PPOPenaltyControlConfig):
            assert controller is not None
            beta = controller.beta
            metrics = ppo_penalty_update(policy, optimizer, batch, cfg, beta)
            if math.isfinite(metrics["kl_old_new"]):
                controller.update(metrics["kl_old_new"])
            metrics["penalty_beta"] = beta
            metrics["penalty_beta_next"] = controller.beta
        else:
            assert isinstance(cfg, TRPOControlConfig)
            metrics = trpo_update(policy, optimizer, batch, cfg)
        step += 1
        guard.step = step
        if metrics.get("skipped_updates", 0.0) > 0:
            guard.skip(
                f"{int(metrics['skipped_updates'])} updates with a non-finite loss or gradient"
            )
        else:
            guard.good()
        metrics.update(guard.metrics())
        t2 = time.perf_counter()
        recent = pool.episodes[-cfg.return_window :]
        if recent:
            metrics["episode_return"] = statistics.fmean(e.ret for e in recent)
            metrics["episode_length"] = statistics.fmean(e.length for e in recent)
        metrics["episodes"] = float(len(pool.episodes))
        metrics["env_steps"] = float(pool.env_steps)
        metrics["lr"] = lr
        metrics["explained_variance"] = explained_variance(batch.values, batch.returns)
        metrics["rollout_s"] = t1 - t0
        metrics["update_s"] = t2 - t1
        metrics["fps"] = (pool.env_steps - steps_at_start) / (t2 - t_start)
        reached = (
            cfg.target_return is not None
            and len(recent) >= cfg.return_window
            and metrics["episode_return"] >= cfg.target_return
        )
        final = metrics
        if step % cfg.logging_steps == 0 or step == cfg.max_steps or reached:
            run.log(step, metrics)
        if (cfg.save_steps and step % cfg.save_steps == 0) or step == cfg.max_steps or reached:
            _save(run, step, policy, optimizer, obs_norm, reward_scaler, controller, pool, guard)
    pool.close()
    train_s = time.perf_counter() - t_start
    if cfg.eval_episodes:
        returns = evaluate_policy(
            policy, obs_norm, cfg.env, cfg.eval_episodes, cfg.seed + 10_000, cfg.env_kwargs
        )
        final = {
            **final,
            "eval_return": statistics.fmean(returns),
            "eval_return_std": statistics.pstdev(returns),
        }
        run.log(step, {k: final[k] for k in ("eval_return", "eval_return_std")})
    run.close()
    return ControlRun(final, policy, obs_norm, list(pool.episodes), train_s)


def _save(
    run: RunDir,
    step: int,
    policy: ControlPolicy,
    optimizer: torch.optim.Optimizer,
    obs_norm: ObsNormalizer,
    reward_scaler: RewardScaler,
    controller: PPOPenaltyKL | None,
    pool: EnvPool,
    guard: StepGuard,
) -> None:
    states: dict[str, Any] = {
        "obs_norm": obs_norm.state_dict(),
        "reward_scaler": reward_scaler.state_dict(),
        "env_steps": pool.env_steps,
        "guard": guard.state_dict(),
    }
    if controller is not None:
        states["kl_controller"] = controller.state_dict()
    run.save(step, models={"policy": policy}, optimizer=optimizer, states=states)


@torch.no_grad()
def evaluate_policy(
    policy: ControlPolicy,
    obs_norm: ObsNormalizer,
    env_id: str,
    episodes: int,
    seed: int,
    env_kwargs: dict[str, Any] | None = None,
    deterministic: bool = True,
) -> list[float]:
    """Returns of ``episodes`` episodes of the policy (its mode when ``deterministic``), with the
    observation statistics frozen; episode i is reset with seed ``seed + i``."""
    env = make_env(env_id, env_kwargs)
    spec = policy.spec
    returns = []
    try:
        for i in range(episodes):
            obs, _ = env.reset(seed=seed + i)
            total, done = 0.0, False
            while not done:
                o = torch.from_numpy(obs_norm(np.asarray(obs, dtype=np.float32)[None]))
                a = policy.dist(o).sample(deterministic)[0].numpy()
                if spec.discrete:
                    action: Any = int(a)
                else:
                    action = np.clip(a, np.asarray(spec.low), np.asarray(spec.high))
                obs, r, term, trunc, _ = env.step(action)
                total += float(r)
                done = term or trunc
            returns.append(total)
    finally:
        env.close()
    return returns


def load_run(run_dir: str | os.PathLike[str]) -> tuple[ControlConfig, ControlPolicy, ObsNormalizer]:
    """The config, policy (latest checkpoint) and observation statistics of a control run."""
    from tether.runs.config import load_config

    path = Path(run_dir)
    meta_path = path / CONTROL_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{path} is not a tether control run (no {CONTROL_FILE})")
    meta = json.loads(meta_path.read_text())
    cfg = load_config(ALGORITHMS[meta["algorithm"]], path / "config.yaml")
    if latest_checkpoint(path) is None:
        raise FileNotFoundError(f"{path} has no checkpoint yet")
    spec = SpaceSpec.from_dict(meta["spec"])
    policy = build_policy(spec, cfg)
    _, states = load_checkpoint(path, models={"policy": policy})
    obs_norm = ObsNormalizer(spec.obs_dim, cfg.normalize_obs)
    obs_norm.load_state_dict(states["obs_norm"])
    policy.eval()
    return cfg, policy, obs_norm
