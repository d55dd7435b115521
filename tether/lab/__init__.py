"""The over-optimisation lab (``tether lab overopt``): Gao et al.'s experiment end to end.

:mod:`tether.lab.overopt` runs it (stages, cache, results.json); :mod:`tether.lab.config` is its
config; :mod:`tether.lab.pool` the base-policy pools and gold-labelled pairs; :mod:`tether.lab.arms`
the cached best-of-n arm; :mod:`tether.lab.bon` the one-pool best-of-n estimator;
:mod:`tether.lab.fits` Gao's curve fits; :mod:`tether.lab.claims` the four claims;
:mod:`tether.lab.report` its report.html; :mod:`tether.lab.results` the results.json check.
"""

from typing import Any

_LAZY = {
    "BoNPoint": "tether.lab.bon",
    "bon_curve": "tether.lab.bon",
    "pick_weights": "tether.lab.bon",
    "GaoFit": "tether.lab.fits",
    "fit_gao": "tether.lab.fits",
    "gao_curve": "tether.lab.fits",
}
"""Names imported on first use (PEP 562), so ``tether lab overopt --help-config`` and the lab's
config never import torch."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tether.lab' has no attribute {name!r}")


__all__ = ["BoNPoint", "GaoFit", "bon_curve", "fit_gao", "gao_curve", "pick_weights"]
