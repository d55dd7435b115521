"""Reward-model ensembles: k proxies combined into one reward (Coste et al. 2023).

Coste, Anwar, Kirk & Krueger, "Reward Model Ensembles Help Mitigate Overoptimization"
(arXiv:2310.02743, §3.2) combine the k members' rewards R_1..R_k of a completion as

* ``mean``:  R = (1/k) Σ_i R_i                                  (eq. 2)
* ``worst``: R = min_i R_i                 (worst-case optimisation, WCO; eq. 3)
* ``uwo``:   R = (1/k) Σ_i R_i − λ·(1/k) Σ_i (R_i − R̄)²  (uncertainty-weighted, eq. 4)

The members are normalised reward models (each saved with its training mean and std), so their
scales agree before they are combined; UWO's penalty is the population variance across members.

An ensemble on disk is a directory with ``ensemble.json``::

    {"format": 1, "members": ["../n1000-s0/reward_model", ...], "combine": "uwo", "uwo_lambda": 0.5}

Members are paths relative to that directory (or absolute), each any reward spec that
:func:`tether.rewards.make_reward` accepts; ``make_reward(<the directory>)`` returns an
:class:`EnsembleReward`, so every trainer and ``tether bon`` takes an ensemble as its reward.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

import numpy as np

from tether.configs.literals import Combine
from tether.rewards.base import RewardFn, call_reward

COMBINE_MODES: tuple[str, ...] = get_args(Combine)
ENSEMBLE_FILE = "ensemble.json"
"""The file that marks a directory as a reward ensemble."""
ENSEMBLE_FORMAT = 1


def combine_rewards(rewards: np.ndarray, mode: Combine, uwo_lambda: float = 1.0) -> np.ndarray:
    """Combine member rewards (k, N) into (N,) by ``mode`` (Coste et al. 2023 eqs. 2–4)."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] < 1:
        raise ValueError(f"rewards must be (k ≥ 1, N), got shape {r.shape}")
    if mode == "mean":
        return r.mean(0)
    if mode == "worst":
        return r.min(0)
    if mode == "uwo":
        if uwo_lambda < 0:
            raise ValueError(f"uwo_lambda must be ≥ 0, got {uwo_lambda}")
        return r.mean(0) - uwo_lambda * r.var(0)
    raise ValueError(f"unknown combine mode {mode!r}; expected one of {', '.join(COMBINE_MODES)}")


class EnsembleReward:
    """k reward functions combined into one by :func:`combine_rewards`.

    Calling it scores every completion with every member (each validated) and combines them;
    :meth:`members_scores` returns the (k, N) member rewards for uncertainty analyses.
    """

    def __init__(
        self,
        members: Sequence[RewardFn],
        combine: Combine = "mean",
        uwo_lambda: float = 1.0,
        names: Sequence[str] | None = None,
    ) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if combine not in COMBINE_MODES:
            raise ValueError(
                f"unknown combine mode {combine!r}; expected one of {', '.join(COMBINE_MODES)}"
            )
        if uwo_lambda < 0:
            raise ValueError(f"uwo_lambda must be ≥ 0, got {uwo_lambda}")
        self.members = list(members)
        self.combine = combine
        self.uwo_lambda = float(uwo_lambda)
        self.names = (
            list(names) if names is not None else [f"member{i}" for i in range(len(members))]
        )

    def members_scores(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        """(k, N) float64 rewards of every member."""
        rows = []
        for fn, name in zip(self.members, self.names, strict=True):
            v = call_reward(fn, prompts, completions, name, stage="ensemble member")
            rows.append(np.asarray(v.values, dtype=np.float64))
        return np.stack(rows) if rows else np.zeros((0, len(completions)))

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        if not completions:
            return []
        scores = self.members_scores(prompts, completions)
        return combine_rewards(scores, self.combine, self.uwo_lambda).tolist()  # type: ignore[arg-type]


def save_ensemble(
    path: str | os.PathLike[str],
    members: Sequence[str | os.PathLike[str]],
    combine: Combine = "mean",
    uwo_lambda: float = 1.0,
) -> Path:
    """Write ``<path>/ensemble.json`` (atomically) naming ``members`` relative to ``path``."""
    if combine not in COMBINE_MODES:
        raise ValueError(
            f"unknown combine mode {combine!r}; expected one of {', '.join(COMBINE_MODES)}"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rel = [  # directories relative to the ensemble; built-ins and module:function as given
        os.path.relpath(Path(m).resolve(), path.resolve()) if Path(m).exists() else str(m)
        for m in members
    ]
    record = {
        "format": ENSEMBLE_FORMAT,
        "members": rel,
        "combine": combine,
        "uwo_lambda": uwo_lambda,
    }
    tmp = path / f".{ENSEMBLE_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(tmp, path / ENSEMBLE_FILE)
    return path


def is_ensemble_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def load_ensemble(path: str | os.PathLike[str]) -> EnsembleReward:
    """The :class:`EnsembleReward` that ``<path>/ensemble.json`` describes.

    Raises:
        FileNotFoundError: no ``ensemble.json`` in ``path``.
        ValueError: the file is not valid JSON or a field is missing or wrong (named).
    """
    from tether.rewards import make_reward  # the members are any reward spec

    path = Path(path)
    file = path / ENSEMBLE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a reward ensemble: it has no {ENSEMBLE_FILE}")
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(record, dict) or record.get("format") != ENSEMBLE_FORMAT:
        raise ValueError(f'{file}: expected an object with "format": {ENSEMBLE_FORMAT}')
    members = record.get("members")
    if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
        raise ValueError(f'{file}: "members" must be a non-empty list of reward specs')
    combine = record.get("combine", "mean")
    if combine not in COMBINE_MODES:
        raise ValueError(
            f'{file}: "combine" is {combine!r}; expected one of {", ".join(COMBINE_MODES)}'
        )
    lam = record.get("uwo_lambda", 1.0)
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or lam < 0:
        raise ValueError(f'{file}: "uwo_lambda" must be a number ≥ 0, got {lam!r}')
    specs = []
    for m in members:
        p = Path(m) if Path(m).is_absolute() else path / m
        specs.append(str(p) if p.exists() else m)  # else a built-in or module:function
    return EnsembleReward([make_reward(s) for s in specs], combine, float(lam), names=members)
