"""Plot a run's metrics.jsonl: one panel per metric group, steps on the x-axis.

Groups (see :func:`metric_group`): reward/score-like keys, KL keys, β, losses, then one panel per
remaining prefix (``eval/...``) or bare key. Drawn with matplotlib's object API (no pyplot, so no
global backend is changed; PNG goes through Agg).
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

from tether.runs.rundir import RESERVED_METRIC_KEYS, read_metrics

REWARD_TOKENS = frozenset({"reward", "rewards", "score", "scores", "return", "returns"})
"""Name tokens that put a metric in the reward panel."""
GROUP_ORDER = ("reward", "kl", "beta", "loss")
"""Panels that come first, in this order; the other groups follow alphabetically."""
GROUP_TITLES = {
    "reward": "reward / score",
    "kl": "KL",
    "beta": "β (KL coefficient)",
    "loss": "loss",
}
PANEL_WIDTH, PANEL_HEIGHT = 7.0, 2.6
"""Size of one panel, in inches."""
MAX_SINGLE_COLUMN_PANELS = 3
"""Above this many panels, they are laid out in two columns."""

Series = tuple[list[int], list[float]]


def metric_group(key: str) -> str:
    """The panel a metric goes in. The key is split into tokens at ``/ _ . -``; the first rule
    that matches wins: a ``beta`` or ``coef*`` token → ``"beta"``; a reward/score/return token →
    ``"reward"``; a ``kl*`` token → ``"kl"``; a ``loss`` token → ``"loss"``; otherwise the prefix
    before the first ``/``, or the key itself."""
    tokens = [t for t in re.split(r"[/_.\-\s]+", key.lower()) if t]
    if "beta" in tokens or any(t.startswith("coef") for t in tokens):
        return "beta"
    if REWARD_TOKENS.intersection(tokens):
        return "reward"
    if any(t.startswith("kl") for t in tokens):
        return "kl"
    if "loss" in tokens:
        return "loss"
    return key.split("/", 1)[0] if "/" in key else key


def _numeric_series(run_dir: Path) -> dict[str, Series]:
    """Every metric whose values are all numbers or null (null → NaN, a gap in the line)."""
    series: dict[str, Series] = {}
    non_numeric: set[str] = set()
    for record in read_metrics(run_dir):
        step = record["step"]
        for key, value in record.items():
            if key in RESERVED_METRIC_KEYS or key in non_numeric:
                continue
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if value is not None and not numeric:
                non_numeric.add(key)
                series.pop(key, None)
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(step)
            values.append(math.nan if value is None else float(value))
    return {k: s for k, s in series.items() if any(math.isfinite(v) for v in s[1])}


def _choose_keys(series: dict[str, Series], keys: Sequence[str] | None, run_dir: Path) -> list[str]:
    if keys is not None:
        for key in keys:
            if key not in series:
                close = difflib.get_close_matches(key, list(series), n=3)
                hint = f"did you mean {', '.join(map(repr, close))}?" if close else "available:"
                raise ValueError(
                    f"no numeric metric {key!r} in {run_dir / 'metrics.jsonl'}; {hint} "
                    + ("" if close else ", ".join(sorted(series)))
                )
        return list(keys)
    varying = [k for k, (_, v) in series.items() if len({x for x in v if math.isfinite(x)}) > 1]
    return varying or list(series)


def plot_run(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    keys: Sequence[str] | None = None,
) -> Path:
    """Draw the run's metrics to a PNG and return its path.

    Args:
        run_dir: a run directory holding metrics.jsonl.
        out: the image path (default ``<run_dir>/metrics.png``).
        keys: the metrics to draw (default: every numeric metric whose value varies, or every
            numeric metric if none varies).

    Raises:
        FileNotFoundError: the run has no metrics.jsonl.
        ValueError: no numeric metrics, or a requested key is not among them.
    """
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    series = _numeric_series(run_dir)
    if not series:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no numeric metrics to plot")
    chosen = _choose_keys(series, keys, run_dir)
    groups: dict[str, list[str]] = {}
    for key in chosen:
        groups.setdefault(metric_group(key), []).append(key)
    first = [g for g in GROUP_ORDER if g in groups]
    order = first + sorted(g for g in groups if g not in GROUP_ORDER)

    ncols = 1 if len(order) <= MAX_SINGLE_COLUMN_PANELS else 2
    nrows = math.ceil(len(order) / ncols)
    fig = Figure(figsize=(PANEL_WIDTH * ncols, PANEL_HEIGHT * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, group in zip(axes, order, strict=False):
        for key in groups[group]:
            steps, values = series[key]
            ax.plot(steps, values, label=key, linewidth=1.2, marker="o" if len(steps) == 1 else "")
        ax.set_title(GROUP_TITLES.get(group, group), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(order) :]:
        ax.set_visible(False)
    for ax in axes[len(order) - ncols : len(order)]:
        ax.set_xlabel("step")
    fig.suptitle(run_dir.resolve().name)
    out_path = Path(out) if out is not None else run_dir / "metrics.png"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    return out_path
