"""Actor-critic MLPs for gymnasium tasks: a categorical or diagonal-Gaussian policy and a critic.

The architecture and initialisation follow the PPO/TRPO baselines (and SB3's ``MlpPolicy``, so
benchmark comparisons are like for like): separate policy and value networks, two hidden layers
of 64 with tanh, orthogonal weights (gain √2 in hidden layers, 0.01 for the policy output, 1 for
the value output), zero biases, and for continuous actions a state-independent log σ vector
initialised to ``log_std_init``. The distribution math lives in :mod:`tether.core.distributions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tether.control.envs import SpaceSpec
from tether.core.distributions import (
    categorical_entropy,
    categorical_kl,
    categorical_log_prob,
    gaussian_entropy,
    gaussian_kl,
    gaussian_log_prob,
)

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def mlp(sizes: list[int], activation: str, out_gain: float, ortho: bool) -> nn.Sequential:
    """Linear layers ``sizes[0] → … → sizes[-1]`` with ``activation`` between them."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        lin = nn.Linear(sizes[i], sizes[i + 1])
        if ortho:
            last = i == len(sizes) - 2
            nn.init.orthogonal_(lin.weight, gain=out_gain if last else math.sqrt(2.0))
            nn.init.zeros_(lin.bias)
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


@dataclass
class DistParams:
    """A batch of action distributions: ``logits`` (B, n), or ``mean`` (B, d) with ``log_std``
    (d,)."""

    logits: Tensor | None = None
    mean: Tensor | None = None
    log_std: Tensor | None = None

    def detach(self) -> DistParams:
        return DistParams(*(None if t is None else t.detach() for t in self._tensors()))

    def _tensors(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        return self.logits, self.mean, self.log_std

    def log_prob(self, actions: Tensor) -> Tensor:
        """(B,) log π(a | s)."""
        if self.logits is not None:
            return categorical_log_prob(self.logits, actions)
        assert self.mean is not None and self.log_std is not None
        return gaussian_log_prob(self.mean, self.log_std, actions)

    def entropy(self) -> Tensor:
        """(B,) entropy of each distribution."""
        if self.logits is not None:
            return categorical_entropy(self.logits)
        assert self.mean is not None and self.log_std is not None
        return gaussian_entropy(self.log_std, (self.mean.shape[0],))

    def kl(self, other: DistParams) -> Tensor:
        """(B,) exact KL(self ‖ other)."""
        if self.logits is not None:
            assert other.logits is not None
            return categorical_kl(self.logits, other.logits)
        assert self.mean is not None and self.log_std is not None
        assert other.mean is not None and other.log_std is not None
        return gaussian_kl(self.mean, self.log_std, other.mean, other.log_std)

    def sample(self, deterministic: bool = False) -> Tensor:
        """(B,) action ids or (B, d) actions; ``deterministic``: the mode."""
        if self.logits is not None:
            if deterministic:
                return self.logits.argmax(-1)
            probs = torch.softmax(self.logits.float(), -1)
            return torch.multinomial(probs, 1).squeeze(-1)
        assert self.mean is not None and self.log_std is not None
        if deterministic:
            return self.mean
        return self.mean + torch.randn_like(self.mean) * self.log_std.exp()


class ControlPolicy(nn.Module):
    """Policy network π(a | s) and value network V(s) for one environment's spaces."""

    def __init__(
        self,
        spec: SpaceSpec,
        hidden: list[int] | tuple[int, ...] = (64, 64),
        activation: str = "tanh",
        ortho_init: bool = True,
        log_std_init: float = 0.0,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.spec = spec
        sizes = [spec.obs_dim, *hidden]
        self.pi = mlp([*sizes, spec.action_dim], activation, 0.01, ortho_init)
        self.vf = mlp([*sizes, 1], activation, 1.0, ortho_init)
        self.log_std = (
            None
            if spec.discrete
            else nn.Parameter(torch.full((spec.action_dim,), float(log_std_init)))
        )

    def dist(self, obs: Tensor) -> DistParams:
        """The action distributions at observations (B, obs_dim)."""
        out = self.pi(obs)
        if self.spec.discrete:
            return DistParams(logits=out)
        return DistParams(mean=out, log_std=self.log_std)

    def forward(self, obs: Tensor) -> DistParams:
        """Same as :meth:`dist` (so ``torch.func.functional_call`` works on the policy)."""
        return self.dist(obs)

    def value(self, obs: Tensor) -> Tensor:
        """(B,) V(s)."""
        return self.vf(obs).squeeze(-1)

    def policy_parameters(self) -> list[nn.Parameter]:
        """θ of π (the natural-gradient space of TRPO): the policy network and log σ."""
        params = list(self.pi.parameters())
        if self.log_std is not None:
            params.append(self.log_std)
        return params

    def value_parameters(self) -> list[nn.Parameter]:
        return list(self.vf.parameters())
