"""tether.core: the pure tensor math of KL-regularised RL (torch only, no I/O, no modules).

* :mod:`tether.core.masked` — masked sum/mean/var/whiten and loss aggregation modes.
* :mod:`tether.core.kl` — k1/k2/k3/abs estimators, the KL loss term, exact full-vocabulary KL,
  the best-of-n KL.
* :mod:`tether.core.controllers` — β controllers: fixed, adaptive, PPO-penalty, PID-Lagrangian.
"""

from tether.core import controllers, kl, masked
from tether.core.controllers import (
    CONTROLLERS,
    PIDKL,
    AdaptiveKL,
    FixedKL,
    KLController,
    PPOPenaltyKL,
    make_controller,
)
from tether.core.kl import ESTIMATORS, best_of_n_kl, estimate, exact_from_logits, loss_term
from tether.core.masked import (
    AGGREGATIONS,
    aggregate,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

__all__ = [
    "AGGREGATIONS",
    "CONTROLLERS",
    "ESTIMATORS",
    "PIDKL",
    "AdaptiveKL",
    "FixedKL",
    "KLController",
    "PPOPenaltyKL",
    "aggregate",
    "best_of_n_kl",
    "controllers",
    "estimate",
    "exact_from_logits",
    "kl",
    "loss_term",
    "make_controller",
    "masked",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
]
