"""The over-optimisation lab (``tether lab overopt``): Gao et al.'s experiment end to end.

:mod:`tether.lab.overopt` runs it (stages, cache, results.json); :mod:`tether.lab.config` is its
config; :mod:`tether.lab.pool` the base-policy pools and gold-labelled pairs; :mod:`tether.lab.arms`
the cached best-of-n arm; :mod:`tether.lab.bon` the one-pool best-of-n estimator;
:mod:`tether.lab.fits` Gao's curve fits; :mod:`tether.lab.claims` the four claims;
:mod:`tether.lab.report` its report.html; :mod:`tether.lab.results` the results.json check.
"""

from tether.lab.bon import BoNPoint, bon_curve, pick_weights
from tether.lab.fits import GaoFit, fit_gao, gao_curve

__all__ = ["BoNPoint", "GaoFit", "bon_curve", "fit_gao", "gao_curve", "pick_weights"]
