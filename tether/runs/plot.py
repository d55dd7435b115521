"""Plot a run's metrics.jsonl: one panel per kind of quantity, steps on the x-axis.

Each metric goes in the panel of its unit or kind (:func:`metric_panel`), the panels in a fixed
order (:data:`PANELS`): reward, fractions, diversity, KL to the reference, KL between successive
policies, β, loss, entropy/NLL, log-probs, learning rate, norms, time, throughput, counts,
cumulative progress, other. Held-out series (``eval/...``, :func:`is_heldout`) share the panel of
their unit with the training series, drawn dashed with square markers in the colour of their
training counterpart (``kl/k1`` and ``eval/kl/k1``), so train and held-out values of one quantity
are read on one axis. Metrics that never change are listed under the figure instead of drawn.

Drawn with matplotlib's object API (no pyplot, so no global backend is changed; PNG goes
through Agg). :func:`build_figure` returns the :class:`~matplotlib.figure.Figure`,
:func:`plot_run` writes it.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tether.errors import TetherError
from tether.runs.rundir import RESERVED_METRIC_KEYS, read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class PlotError(TetherError, ValueError):
    """A plot request that the run cannot satisfy: no numeric metrics, an unknown ``--keys``
    metric or ``--panels`` panel (named, with the close matches)."""


@dataclass(frozen=True)
class Panel:
    """One kind of quantity: a panel of the figure."""

    name: str
    """Its name for ``--panels``."""
    title: str
    ylabel: str


PANELS: tuple[Panel, ...] = (
    Panel("reward", "reward / score / return", "reward"),
    Panel("fraction", "accuracy / rate / fraction", "fraction"),
    Panel("diversity", "diversity (distinct-n, EAD, self-BLEU, similarity)", "fraction"),
    Panel("kl", "KL to the reference", "nats"),
    Panel("kl_update", "KL between policies (old → new, sampler → trainer)", "nats"),
    Panel("beta", "β / coefficients", "coefficient"),
    Panel("loss", "loss", "loss"),
    Panel("entropy", "entropy / NLL", "nats / token"),
    Panel("logp", "sequence log-prob", "nats"),
    Panel("lr", "learning rate", "lr"),
    Panel("norm", "gradient / step norm", "L2 norm"),
    Panel("time", "time", "seconds"),
    Panel("throughput", "throughput", "per second"),
    Panel("count", "counts / lengths", "count"),
    Panel("progress", "progress (cumulative)", "count"),
    Panel("other", "other", "value"),
)
"""Every panel, in the order they are drawn."""
PANEL_NAMES = tuple(p.name for p in PANELS)

HELDOUT_PREFIXES = frozenset({"eval", "heldout", "val", "valid", "validation", "test"})
"""A first name token that marks a held-out series (``eval/proxy``, ``eval_return``)."""
REWARD_TOKENS = frozenset(
    {"reward", "rewards", "score", "scores", "return", "returns", "proxy", "gold", "margin", "gap"}
)
FRACTION_TOKENS = frozenset(
    {"accuracy", "acc", "frac", "fraction", "clipfrac", "rate", "accepted", "rolled", "early"}
)
"""Shares in [0, 1], and 0/1 flags whose logged mean is one (``trpo/accepted``)."""
DIVERSITY_TOKENS = frozenset({"distinct", "ead", "bleu", "similarity", "diversity"})
KL_UPDATE_TOKENS = frozenset({"old", "sampler", "approx", "trpo", "search"})
"""With a ``kl`` token: the KL between successive policies or sampler and trainer, not the KL
to the reference."""
TIME_TOKENS = frozenset({"s", "sec", "secs", "seconds", "time", "duration"})
THROUGHPUT_TOKENS = frozenset({"fps", "throughput"})
ENTROPY_TOKENS = frozenset({"entropy", "nll", "perplexity", "ppl"})
COUNT_TOKENS = frozenset(
    {
        "num", "n", "count", "length", "len", "tokens", "skipped", "bad", "steps", "epochs",
        "pairs", "ties", "backtracks", "updates", "samples",
    }
)  # fmt: skip
PROGRESS_KEYS = frozenset({"env_steps", "episodes", "total_steps", "global_step"})
"""Cumulative counters: they grow with the step, so they get a panel of their own scale."""

MAX_LINES_PER_PANEL = 8
"""A panel with more series is split into several (titles ``… (1/2)``)."""
FEW_POINTS = 12
"""A series with at most this many points is drawn with markers too."""
PANEL_WIDTH, PANEL_HEIGHT = 6.4, 2.5
"""Size of one panel, in inches."""
MAX_SINGLE_COLUMN_PANELS = 3
"""Above this many panels, they are laid out in two columns."""
DPI = 100
TITLE_PATH_PARTS = 3
"""Path components of the run directory in the figure's title."""

Series = tuple[list[int], list[float]]


def _tokens(key: str) -> list[str]:
    return [t for t in re.split(r"[/_.\-\s]+", key.lower()) if t]


def is_heldout(key: str) -> bool:
    """Whether ``key`` is a held-out series: its first name token is ``eval`` (``eval/…``,
    ``eval_…``) or another held-out prefix (:data:`HELDOUT_PREFIXES`)."""
    tokens = _tokens(key)
    return len(tokens) > 1 and tokens[0] in HELDOUT_PREFIXES


def base_name(key: str) -> str:
    """``key`` without its held-out prefix (``eval/kl/k1`` → ``kl/k1``): the training series a
    held-out one is compared with (they share a colour)."""
    return re.sub(r"^[a-z]+[/_.\-]", "", key, count=1) if is_heldout(key) else key


def metric_panel(key: str) -> str:
    """The panel (a :data:`PANELS` name) a metric goes in, by the tokens of its name (split at
    ``/ _ . -``, a held-out prefix dropped); the first rule that matches wins:

    ``lr`` / learning rate → ``lr``; ``…_per_s``, ``fps`` → ``throughput``; ``…_s``, ``seconds``,
    ``s_per_step`` → ``time``; ``…norm`` → ``norm``; ``beta``, ``coef…``, ``clip_range`` →
    ``beta``; accuracy/rate/fraction tokens and 0/1 flags → ``fraction``; distinct-n, EAD,
    self-BLEU, similarity → ``diversity``; ``kl…`` → ``kl_update`` with old/sampler/approx/trpo
    tokens, else ``kl``; ``loss``, ``penalty`` → ``loss``; entropy, NLL → ``entropy``;
    ``logp…`` → ``logp``; reward/score/return/proxy/gold/margin/gap → ``reward``; cumulative
    counters (``env_steps``) → ``progress``; counts and lengths → ``count``; else ``other``.
    """
    name = base_name(key)
    tokens = _tokens(name)
    tset = set(tokens)
    if "lr" in tset or {"learning", "rate"} <= tset:
        return "lr"
    if THROUGHPUT_TOKENS & tset or _per_second(tokens):
        return "throughput"
    if TIME_TOKENS & tset:
        return "time"
    if any(t.endswith("norm") for t in tokens):
        return "norm"
    if "beta" in tset or any(t.startswith("coef") for t in tokens) or name.endswith("clip_range"):
        return "beta"
    if FRACTION_TOKENS & tset:
        return "fraction"
    if DIVERSITY_TOKENS & tset:
        return "diversity"
    if any(t.startswith("kl") for t in tokens):
        return "kl_update" if KL_UPDATE_TOKENS & tset else "kl"
    if "loss" in tset or "penalty" in tset:
        return "loss"
    if ENTROPY_TOKENS & tset:
        return "entropy"
    if any(t.startswith("logp") for t in tokens):
        return "logp"
    if REWARD_TOKENS & tset:
        return "reward"
    if name in PROGRESS_KEYS:
        return "progress"
    if COUNT_TOKENS & tset:
        return "count"
    return "other"


def _per_second(tokens: list[str]) -> bool:
    """``…_per_s`` / ``…_per_second``: a rate per second (``s_per_step`` is a time)."""
    return len(tokens) >= 2 and tokens[-2] == "per" and tokens[-1] in {"s", "sec", "second"}


def metric_group(key: str) -> str:
    """The coarse group of a training metric used by the HTML report's charts
    (:mod:`tether.eval.report`): ``beta``, ``reward``, ``kl`` or ``loss``, else the prefix before
    the first ``/`` or the key itself. The plot's panels are :func:`metric_panel`'s."""
    tokens = _tokens(key)
    if "beta" in tokens or any(t.startswith("coef") for t in tokens):
        return "beta"
    if {"reward", "rewards", "score", "scores", "return", "returns"}.intersection(tokens):
        return "reward"
    if any(t.startswith("kl") for t in tokens):
        return "kl"
    if "loss" in tokens:
        return "loss"
    return key.split("/", 1)[0] if "/" in key else key


# --------------------------------------------------------------------------------------------
# Which series, in which panel
# --------------------------------------------------------------------------------------------


def _numeric_series(run_dir: Path) -> dict[str, Series]:
    """Every metric whose values are all numbers or null (null → NaN, a gap in the line), with
    at least one finite value."""
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


def constant_value(values: Sequence[float]) -> float | None:
    """The value of a series logged at least twice that never changes (NaNs aside), else None.
    A series logged once is not constant: it is drawn (a single marker)."""
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) >= 2 and all(v == finite[0] for v in finite):
        return finite[0]
    return None


def _close_error(what: str, name: str, known: Sequence[str], where: str) -> PlotError:
    close = difflib.get_close_matches(name, list(known), n=3)
    hint = f"did you mean {', '.join(map(repr, close))}?" if close else "available:"
    tail = "" if close else ", ".join(sorted(known))
    return PlotError(f"no {what} {name!r} {where}; {hint} {tail}".rstrip())


def _natural_key(key: str) -> list[object]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


@dataclass(frozen=True)
class PanelPlan:
    """One panel to draw: its kind, title, and the series in it (duplicates merged)."""

    panel: Panel
    title: str
    lines: tuple[tuple[str, ...], ...]
    """Each line's keys: one, or several whose series are identical (drawn once)."""


def plan_panels(
    series: dict[str, Series],
    keys: Sequence[str] | None = None,
    panels: Sequence[str] | None = None,
    where: str = "in the run",
) -> tuple[list[PanelPlan], dict[str, float]]:
    """Which panels to draw and the lines in each, plus the constant metrics left out of them.

    Args:
        series: numeric series by key (see :func:`_numeric_series`).
        keys: draw only these metrics (constant ones included); default every metric, the
            constant ones listed instead of drawn (unless nothing varies).
        panels: draw only these panels (:data:`PANEL_NAMES`).
        where: how errors name the run (e.g. the metrics.jsonl path).

    Raises:
        PlotError: an unknown key or panel, or no metric left to draw.
    """
    if not series:
        raise PlotError(f"{where} holds no numeric metrics to plot")
    for key in keys or ():
        if key not in series:
            raise _close_error("numeric metric", key, list(series), where)
    for name in panels or ():
        if name not in PANEL_NAMES:
            raise _close_error("panel", name, PANEL_NAMES, "(--panels)")
    constants: dict[str, float] = {}
    if keys is not None:
        chosen = list(dict.fromkeys(keys))
    else:
        for key, (_, values) in series.items():
            value = constant_value(values)
            if value is not None:
                constants[key] = value
        chosen = [k for k in series if k not in constants] or list(series)
        constants = {k: v for k, v in constants.items() if k not in chosen}
    if panels is not None:
        chosen = [k for k in chosen if metric_panel(k) in panels]
        constants = {k: v for k, v in constants.items() if metric_panel(k) in panels}
        if not chosen and constants:  # the panels asked for hold only constants: draw them
            chosen, constants = list(constants), {}
        if not chosen:
            found = sorted({metric_panel(k) for k in series}, key=PANEL_NAMES.index)
            raise PlotError(
                f"no metric {where} goes in the panels {', '.join(panels)}; its panels are "
                + ", ".join(found)
            )
    plans: list[PanelPlan] = []
    for panel in PANELS:
        mine = [k for k in chosen if metric_panel(k) == panel.name]
        if not mine:
            continue
        # training series first, then held-out ones; natural order within each
        mine.sort(key=lambda k: (is_heldout(k), _natural_key(k)))
        lines = _merge_identical(mine, series)
        chunks = [
            lines[i : i + MAX_LINES_PER_PANEL] for i in range(0, len(lines), MAX_LINES_PER_PANEL)
        ]
        for i, chunk in enumerate(chunks):
            title = panel.title + (f" ({i + 1}/{len(chunks)})" if len(chunks) > 1 else "")
            plans.append(PanelPlan(panel, title, tuple(chunk)))
    return plans, constants


def _merge_identical(keys: list[str], series: dict[str, Series]) -> list[tuple[str, ...]]:
    """``keys`` grouped so that series with identical steps and values make one line (e.g.
    ``eval/proxy_gold_gap`` and ``eval/proxy_gold_gap/vader`` with one gold reward). Only series
    that take at least two different values are merged: equal single points or constants (all
    KLs 0 at step 0) are a coincidence, not a duplicate."""

    def fingerprint(key: str) -> object:
        steps, values = series[key]
        if len({v for v in values if math.isfinite(v)}) < 2:
            return key
        return tuple(steps), tuple(None if math.isnan(v) else v for v in values)

    groups: dict[object, list[str]] = {}
    for key in keys:
        groups.setdefault((is_heldout(key), fingerprint(key)), []).append(key)
    return [tuple(g) for g in groups.values()]


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _has_isolated_point(values: Sequence[float]) -> bool:
    """A finite value with no finite neighbour: a line through it draws nothing."""
    n = len(values)
    for i, v in enumerate(values):
        if not math.isfinite(v):
            continue
        left = i > 0 and math.isfinite(values[i - 1])
        right = i < n - 1 and math.isfinite(values[i + 1])
        if not (left or right):
            return True
    return False


def line_label(keys: Sequence[str]) -> str:
    """The legend label of a line drawn for ``keys`` (one, or several identical series):
    ``eval/gap (= …/vader)`` for ``eval/gap`` and ``eval/gap/vader``."""
    first, rest = keys[0], keys[1:]
    others = [f"…{k[len(first) :]}" if k.startswith(first) else k for k in rest]
    return first + (f" (= {', '.join(others)})" if others else "")


def _format_value(value: float) -> str:
    return f"{value:.4g}"


def run_title(run_dir: Path, parts: int = TITLE_PATH_PARTS) -> str:
    """The figure's title: the last ``parts`` components of the run directory's path
    (``arms/ppo/seed0`` rather than a bare ``seed0``)."""
    return "/".join(run_dir.resolve().parts[-parts:])


def build_figure(
    run_dir: str | os.PathLike[str],
    keys: Sequence[str] | None = None,
    panels: Sequence[str] | None = None,
) -> Figure:
    """The run's metrics as a matplotlib Figure (see the module docstring for the layout).

    Args:
        run_dir: a run directory holding metrics.jsonl.
        keys: the metrics to draw (default: all; the constant ones listed under the figure).
        panels: the panels to draw, by :data:`PANEL_NAMES` name (default: all).

    Raises:
        FileNotFoundError: the run has no metrics.jsonl.
        PlotError: no numeric metrics, or a requested key or panel is unknown.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    series = _numeric_series(run_dir)
    plans, constants = plan_panels(series, keys, panels, where=f"in {run_dir / 'metrics.jsonl'}")
    drawn_steps = [s for plan in plans for keys_ in plan.lines for s in series[keys_[0]][0]]
    lo, hi = min(drawn_steps), max(drawn_steps)
    pad = max(0.5, 0.02 * (hi - lo))

    ncols = 1 if len(plans) <= MAX_SINGLE_COLUMN_PANELS else 2
    nrows = math.ceil(len(plans) / ncols)
    fig = Figure(figsize=(PANEL_WIDTH * ncols, PANEL_HEIGHT * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    palette = [f"C{i}" for i in range(10)]
    for ax, plan in zip(axes, plans, strict=False):
        colours: dict[str, str] = {}
        for line_keys in plan.lines:
            key = line_keys[0]
            steps, values = series[key]
            colour = colours.setdefault(base_name(key), palette[len(colours) % len(palette)])
            heldout = is_heldout(key)
            few = len(steps) <= FEW_POINTS or _has_isolated_point(values)
            ax.plot(
                steps,
                values,
                label=line_label(line_keys),
                color=colour,
                linestyle="--" if heldout else "-",
                linewidth=1.3,
                marker="s" if heldout else ("o" if few else None),
                markersize=4 if heldout else 3,
            )
        ax.set_xlim(lo - pad, hi + pad)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(plan.panel.ylabel, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useMathText=True)
        ax.grid(alpha=0.3)
        if len(plan.lines) > 1:
            ax.set_title(plan.title, fontsize=10)
            ax.legend(fontsize=7, ncol=2 if len(plan.lines) > 4 else 1, framealpha=0.7)
        else:
            ax.set_title(f"{plan.title}: {line_label(plan.lines[0])}", fontsize=10)
    for ax in axes[len(plans) :]:
        ax.set_visible(False)
    for ax in axes[max(len(plans) - ncols, 0) : len(plans)]:
        ax.set_xlabel("step", fontsize=9)
    heldout_drawn = any(is_heldout(k[0]) for plan in plans for k in plan.lines)
    legend_note = (
        "\nsolid: training   dashed + squares: held-out evaluation" if heldout_drawn else ""
    )
    fig.suptitle(run_title(run_dir) + legend_note, fontsize=11)
    if constants:
        listed = ", ".join(f"{k} = {_format_value(v)}" for k, v in sorted(constants.items()))
        width = int(PANEL_WIDTH * ncols * 15)  # characters of an 8-pt line across the figure
        fig.supxlabel(
            textwrap.fill(f"constant (not drawn): {listed}", width), fontsize=8, color="0.35"
        )
    return fig


def plot_run(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    keys: Sequence[str] | None = None,
    panels: Sequence[str] | None = None,
) -> Path:
    """Draw the run's metrics to a PNG (:func:`build_figure`) and return its path.

    Args:
        run_dir: a run directory holding metrics.jsonl.
        out: the image path (default ``<run_dir>/metrics.png``).
        keys: the metrics to draw (default: all; the constant ones listed under the figure).
        panels: the panels to draw, by :data:`PANEL_NAMES` name (default: all).

    Raises:
        FileNotFoundError: the run has no metrics.jsonl.
        PlotError: no numeric metrics, or a requested key or panel is unknown.
    """
    fig = build_figure(run_dir, keys=keys, panels=panels)
    out_path = Path(out) if out is not None else Path(run_dir) / "metrics.png"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=DPI)
    return out_path
