"""A pool of gymnasium environments stepped in one process, with same-step auto-reset.

Gymnasium 1.x's ``SyncVectorEnv`` resets a finished environment on the *next* call to ``step``
(the action passed then is ignored), so a fixed-length rollout would hold steps that are not
transitions. This pool resets in the same step, as Stable-Baselines3's ``DummyVecEnv`` does, and
returns the true last observation of every finished episode, so that a *truncated* episode (time
limit) can bootstrap from V(s_final) while a *terminated* one does not (Pardo et al. 2018).

Every finished episode is recorded as an :class:`Episode` (return, length, the pool's env-step
count and wall-clock time at its end): the training loop and ``benchmarks/control_vs_sb3.py``
read the same records.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np


def require_gymnasium() -> Any:
    try:
        import gymnasium
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "tether.control needs gymnasium: pip install 'tether[control]' (or gymnasium>=1.0)"
        ) from exc
    return gymnasium


@dataclass(frozen=True)
class Episode:
    """One finished episode."""

    ret: float
    """Undiscounted return (the environment's raw rewards, before any normalisation)."""
    length: int
    env_steps: int
    """The pool's total environment steps when it ended."""
    wall_s: float
    """Seconds since the pool was created (or :meth:`EnvPool.start_clock`) when it ended."""
    truncated: bool


@dataclass(frozen=True)
class SpaceSpec:
    """What a policy needs to know about an environment's spaces."""

    obs_dim: int
    discrete: bool
    action_dim: int
    """n actions (discrete) or the action vector's length (continuous)."""
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None

    @classmethod
    def of(cls, env: Any, env_id: str = "") -> SpaceSpec:
        gym = require_gymnasium()
        obs, act = env.observation_space, env.action_space
        if not isinstance(obs, gym.spaces.Box) or len(obs.shape) != 1:
            raise ValueError(
                f"env {env_id!r}: tether.control needs a flat Box observation space, got {obs}"
            )
        if isinstance(act, gym.spaces.Discrete):
            return cls(int(obs.shape[0]), True, int(act.n))
        if isinstance(act, gym.spaces.Box) and len(act.shape) == 1:
            return cls(
                int(obs.shape[0]),
                False,
                int(act.shape[0]),
                tuple(float(x) for x in act.low),
                tuple(float(x) for x in act.high),
            )
        raise ValueError(
            f"env {env_id!r}: tether.control supports Discrete or 1-D Box actions, got {act}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "obs_dim": self.obs_dim,
            "discrete": self.discrete,
            "action_dim": self.action_dim,
            "low": list(self.low) if self.low is not None else None,
            "high": list(self.high) if self.high is not None else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpaceSpec:
        low, high = d.get("low"), d.get("high")
        return cls(
            int(d["obs_dim"]),
            bool(d["discrete"]),
            int(d["action_dim"]),
            tuple(low) if low is not None else None,
            tuple(high) if high is not None else None,
        )


def make_env(env_id: str, env_kwargs: dict[str, Any] | None = None) -> Any:
    """``gymnasium.make(env_id, **env_kwargs)`` with an error that names the environment."""
    gym = require_gymnasium()
    try:
        return gym.make(env_id, **(env_kwargs or {}))
    except gym.error.Error as exc:
        raise ValueError(f"env={env_id!r}: gymnasium could not make it: {exc}") from None


class EnvPool:
    """``n`` copies of one environment stepped in turn; finished ones reset in the same step.

    Args:
        env_id: a registered gymnasium id (e.g. ``CartPole-v1``).
        n: number of environments.
        seed: environment i is reset with seed ``seed + i`` the first time.
        env_kwargs: passed to ``gymnasium.make``.
    """

    def __init__(
        self, env_id: str, n: int, seed: int, env_kwargs: dict[str, Any] | None = None
    ) -> None:
        if n < 1:
            raise ValueError(f"n_envs must be ≥ 1, got {n}")
        self.env_id = env_id
        self.envs = [make_env(env_id, env_kwargs) for _ in range(n)]
        self.spec = SpaceSpec.of(self.envs[0], env_id)
        self.n = n
        self.seed = seed
        self.env_steps = 0
        self.episodes: list[Episode] = []
        self._t0 = time.perf_counter()
        self._ret = np.zeros(n)
        self._len = np.zeros(n, dtype=np.int64)
        if not self.spec.discrete:
            self._low = np.asarray(self.spec.low, dtype=np.float32)
            self._high = np.asarray(self.spec.high, dtype=np.float32)

    def start_clock(self) -> None:
        """Episode wall-clock times count from now."""
        self._t0 = time.perf_counter()

    def reset(self) -> np.ndarray:
        """Reset every environment; returns observations (n, obs_dim) float32."""
        obs = [env.reset(seed=self.seed + i)[0] for i, env in enumerate(self.envs)]
        self._ret[:] = 0.0
        self._len[:] = 0
        return np.asarray(obs, dtype=np.float32)

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Step every environment.

        Continuous actions are clipped to the action bounds before the environment sees them (the
        policy's log-probabilities stay those of the unclipped sample, as in SB3).

        Returns:
            ``(obs, rewards, terminated, truncated, final_obs)``: next observations (n, obs_dim)
            (already reset where an episode ended), raw rewards (n,), flags (n,) bool, and the
            true last observations (n, obs_dim) (equal to ``obs`` where nothing ended).
        """
        if not self.spec.discrete:
            actions = np.clip(actions, self._low, self._high)
        obs = np.empty((self.n, self.spec.obs_dim), dtype=np.float32)
        final = np.empty_like(obs)
        rew = np.empty(self.n, dtype=np.float64)
        term = np.zeros(self.n, dtype=bool)
        trunc = np.zeros(self.n, dtype=bool)
        self.env_steps += self.n
        for i, env in enumerate(self.envs):
            a = int(actions[i]) if self.spec.discrete else actions[i]
            o, r, te, tr, _ = env.step(a)
            rew[i], term[i], trunc[i] = r, te, tr
            final[i] = o
            self._ret[i] += r
            self._len[i] += 1
            if te or tr:
                self.episodes.append(
                    Episode(
                        float(self._ret[i]),
                        int(self._len[i]),
                        self.env_steps,
                        time.perf_counter() - self._t0,
                        bool(tr and not te),
                    )
                )
                self._ret[i], self._len[i] = 0.0, 0
                o, _ = env.reset()
            obs[i] = o
        return obs, rew, term, trunc, final

    def close(self) -> None:
        for env in self.envs:
            env.close()
