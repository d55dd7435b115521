"""Running observation normalisation and return-based reward scaling (as in SB3's VecNormalize).

* :class:`RunningMeanStd` — mean and variance of a stream, merged batch by batch with Chan et
  al.'s parallel formula (1979), in float64.
* :class:`ObsNormalizer` — o ↦ clip((o − μ) / √(σ² + ε), ±clip); statistics updated from each
  rollout's observations while training, frozen for evaluation.
* :class:`RewardScaler` — r ↦ clip(r / √(Var[G] + ε), ±clip) where G is the running discounted
  return G ← γG + r (reset at episode ends): the scale PPO implementations (baselines, SB3)
  divide rewards by; the mean is *not* subtracted (that would change the task).

All have ``state_dict``/``load_state_dict`` so a resumed run and ``tether control eval`` use the
statistics the policy was trained with.
"""

from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-8


class RunningMeanStd:
    """Streaming mean/variance over the leading axis of batches of shape (B, *shape)."""

    def __init__(self, shape: tuple[int, ...] = ()) -> None:
        self.mean = np.zeros(shape, dtype=np.float64)
        self.var = np.ones(shape, dtype=np.float64)
        self.count = EPS  # as SB3: avoids a division by zero before the first update

    def update(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch, dtype=np.float64)
        b_mean, b_var, b_n = batch.mean(0), batch.var(0), batch.shape[0]
        delta = b_mean - self.mean
        total = self.count + b_n
        self.mean = self.mean + delta * b_n / total
        m2 = self.var * self.count + b_var * b_n + delta**2 * self.count * b_n / total
        self.var = m2 / total
        self.count = total

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "var": self.var.tolist(), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = np.asarray(state["mean"], dtype=np.float64)
        self.var = np.asarray(state["var"], dtype=np.float64)
        self.count = float(state["count"])


class ObsNormalizer:
    """Observation normalisation; ``enabled=False`` passes observations through unchanged."""

    def __init__(self, obs_dim: int, enabled: bool, clip: float = 10.0) -> None:
        self.enabled = enabled
        self.clip = clip
        self.rms = RunningMeanStd((obs_dim,))

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        if not self.enabled:
            return obs
        z = (obs - self.rms.mean) / np.sqrt(self.rms.var + EPS)
        return np.clip(z, -self.clip, self.clip).astype(np.float32)

    def update(self, obs: np.ndarray) -> None:
        if self.enabled:
            self.rms.update(obs)

    def state_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "clip": self.clip, "rms": self.rms.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.enabled, self.clip = bool(state["enabled"]), float(state["clip"])
        self.rms.load_state_dict(state["rms"])


class RewardScaler:
    """Divide rewards by the running std of the discounted return; ``enabled=False``: identity."""

    def __init__(self, n_envs: int, gamma: float, enabled: bool, clip: float = 10.0) -> None:
        self.enabled = enabled
        self.gamma = gamma
        self.clip = clip
        self.rms = RunningMeanStd(())
        self.returns = np.zeros(n_envs, dtype=np.float64)

    def __call__(self, rewards: np.ndarray, done: np.ndarray) -> np.ndarray:
        """Scale one step's rewards (n,), updating the statistics; ``done`` (n,) ends returns."""
        if not self.enabled:
            return rewards
        self.returns = self.returns * self.gamma + rewards
        self.rms.update(self.returns)
        scaled = np.clip(rewards / np.sqrt(self.rms.var + EPS), -self.clip, self.clip)
        self.returns[done] = 0.0
        return scaled

    def state_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "rms": self.rms.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.enabled = bool(state["enabled"])
        self.rms.load_state_dict(state["rms"])
