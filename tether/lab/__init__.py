"""The over-optimisation lab (issue 13): Gao et al.'s curve fits (:mod:`tether.lab.fits`) and the
one-pool best-of-n curve (:mod:`tether.lab.bon`), first."""

from tether.lab.bon import BoNPoint, bon_curve, pick_weights
from tether.lab.fits import GaoFit, fit_gao, gao_curve

__all__ = ["BoNPoint", "GaoFit", "bon_curve", "fit_gao", "gao_curve", "pick_weights"]
