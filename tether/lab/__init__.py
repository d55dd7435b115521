"""The over-optimisation lab (issue 13): Gao et al.'s curve fits first (:mod:`tether.lab.fits`)."""

from tether.lab.fits import GaoFit, fit_gao, gao_curve

__all__ = ["GaoFit", "fit_gao", "gao_curve"]
