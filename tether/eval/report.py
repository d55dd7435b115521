"""A self-contained HTML report of one or more runs: SVG charts, and samples coloured by token KL.

``tether report RUN_DIR [RUN_DIR ...]`` writes one ``report.html`` that opens offline: no script,
no stylesheet, font or image from anywhere else. Charts are inline SVG drawn here in Python; hover
tooltips are SVG ``<title>`` elements and HTML ``title`` attributes, so no JavaScript is needed.

What a run directory holds (see :mod:`tether.runs.rundir`)::

    config.yaml                 the resolved config; its top-level scalars are shown
    metrics.jsonl               training and eval metrics; lines sharing a step merge per key
    samples/step-000040.jsonl   one JSON object per eval sample (see :func:`read_samples`)

Sections: summary; rewards over steps; proxy and gold rewards against √KL (the over-optimisation
picture of Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization", arXiv:2210.10760,
Fig. 1, where d = √KL); KL and β; diversity; capability; any other metric; samples whose tokens
are coloured by the exact per-position KL(π_θ‖π_ref). Several runs overlay in every chart, one
colour per run.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

import tether
from tether.errors import TetherError
from tether.runs.plot import metric_group
from tether.runs.rundir import CONFIG_FILE, RESERVED_METRIC_KEYS, read_metrics

REPORT_FILE = "report.html"
"""The report's name in the first run directory when no ``out`` is given."""
SAMPLES_DIR = "samples"
SAMPLE_FILE_PATTERN = re.compile(r"step-(\d+)\.jsonl")
"""A samples file's name; the group is its step (zero-padded to 6 digits by the trainers)."""
TOKEN_FIELDS = ("tokens", "logp", "ref_logp", "token_kl")
"""Per-token lists of a sample, all of one length; without them a sample shows as plain text."""
MAX_SAMPLES_PER_STEP = 8
"""Samples shown per run and step: the first sample of each prompt first."""
KL_SCALE_PERCENTILE = 99.0
"""The token-KL colour scale saturates at this percentile of token_kl over the shown samples."""
KL_LOW_RGB = (255, 255, 255)
KL_HIGH_RGB = (214, 39, 40)
"""Token background at KL 0 (white) and at or above the scale (saturated red)."""
KL_LIGHT_TEXT_FRACTION = 0.6
"""Above this fraction of the scale a token's text turns white to stay readable."""
KL_LEGEND_STOPS = 6
"""Swatches in the colour legend of the samples section."""
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#59a14f",
    "#b07aa1",
    "#76b7b2",
    "#edc948",
    "#9c755f",
    "#ff9da7",
    "#bab0ac",
)
"""Series colours (Tableau 10): one per run, or one per metric when there is one run."""
DASHES = ("", "7 4", "2 3", "10 3 2 3", "1 2", "14 5")
"""Dash patterns that tell metrics apart when the colour stands for the run."""
LEGEND_KEY_COLOUR = "#59636e"
"""Legend line colour of a metric's dash pattern when colours stand for runs."""
CHART_WIDTH, CHART_HEIGHT = 560, 300
"""Chart size in SVG units, legend excluded (the page scales it to its column)."""
SMALL_CHART_WIDTH, SMALL_CHART_HEIGHT = 420, 240
"""Size of the one-metric charts of the "other metrics" section."""
MAX_MARKERS = 150
"""Above this many points a series shows every k-th point as a hoverable marker."""
LEGEND_ROW_HEIGHT = 18
LEGEND_CHAR_WIDTH = 6.4
"""Estimated width of one legend character (11.5 px sans-serif), for wrapping legend rows."""
TICK_CHAR_WIDTH = 6.4
"""Estimated width of one tick-label character (11 px), for the left margin."""
SQRT_KL_LABEL = "√KL(π‖π_ref) (nats^½ per response)"

Points = list[tuple[float, float]]
LegendEntry = tuple[str, str, str]
"""(text, colour, SVG dash array) of one legend entry."""
Series = dict[str, list[tuple[int, float]]]
"""Metric name → [(step, value)], sorted by step, nulls and non-finite values left out."""


class ReportError(TetherError, ValueError):
    """A run directory's files cannot be reported: says which file, where and what was expected."""


# --------------------------------------------------------------------------------------------
# Reading a run directory
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunData:
    """What the report needs of one run directory."""

    path: Path
    name: str
    """Its label in legends and headings (the directory name, longer when names clash)."""
    config: dict[str, Any]
    metrics: Series
    sample_files: dict[int, Path]
    """Step → samples file, sorted by step."""

    @property
    def algorithm(self) -> str:
        value = self.config.get("algorithm")
        return str(value) if value is not None else self.path.resolve().name


def _natural_key(text: str) -> list[Any]:
    """Sort ``distinct_2`` before ``distinct_10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_series(records: Iterable[Mapping[str, Any]]) -> Series:
    """Merge metrics records by step per key: a training line and an eval line that share a step
    both contribute; a later value of a key at the same step replaces an earlier one. Nulls,
    non-numbers and non-finite values are left out."""
    by_key: dict[str, dict[int, float]] = {}
    for record in records:
        step = record["step"]
        for key, value in record.items():
            if key in RESERVED_METRIC_KEYS or not _is_number(value) or not math.isfinite(value):
                continue
            by_key.setdefault(key, {})[step] = float(value)
    return {key: sorted(by_key[key].items()) for key in sorted(by_key, key=_natural_key)}


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's config.yaml as a mapping ({} when the file is absent)."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ReportError(f"{path}: not valid YAML: {exc}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ReportError(
            f"{path}: expected a mapping at the top level, got {type(config).__name__}"
        )
    return config


def sample_files(run_dir: Path) -> dict[int, Path]:
    """Step → ``samples/step-NNNNNN.jsonl`` of the run, sorted by step."""
    folder = run_dir / SAMPLES_DIR
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        match = SAMPLE_FILE_PATTERN.fullmatch(path.name)
        if match and path.is_file():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def _check_sample(record: Any) -> str | None:
    """What is wrong with one samples record, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if not isinstance(record.get("completion"), str):
        return "field 'completion' must be a string"
    if not isinstance(record.get("prompt", ""), str):
        return "field 'prompt' must be a string"
    for name in ("rewards", "kl"):
        values = record.get(name, {})
        if not isinstance(values, dict) or not all(
            v is None or _is_number(v) for v in values.values()
        ):
            return f"field {name!r} must be an object of numbers"
    present = [f for f in TOKEN_FIELDS if f in record]
    if not present:
        return None
    missing = [f for f in TOKEN_FIELDS if f not in record]
    if missing:
        return f"has {present} but lacks {missing} (give all of {list(TOKEN_FIELDS)} or none)"
    if not all(isinstance(record[f], list) for f in TOKEN_FIELDS):
        return f"fields {list(TOKEN_FIELDS)} must be lists"
    lengths = {f: len(record[f]) for f in TOKEN_FIELDS}
    if len(set(lengths.values())) != 1:
        return f"token lists differ in length: {lengths}"
    if not all(isinstance(t, str) for t in record["tokens"]):
        return "field 'tokens' must be a list of strings"
    for name in TOKEN_FIELDS[1:]:
        if not all(v is None or _is_number(v) for v in record[name]):
            return f"field {name!r} must be a list of numbers"
    return None


def read_samples(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of one samples file. Each is ``{"step", "prompt_index", "sample_index",
    "prompt", "completion", "rewards": {name: float}, "kl": {"k1", "k3", "exact"}}`` and, when the
    trainer wrote them, the per-token lists ``tokens`` (decoded completion tokens), ``logp`` and
    ``ref_logp`` (their log-probs under π_θ and π_ref) and ``token_kl`` (exact KL(π_θ‖π_ref) over
    the vocabulary at that position), all of one length.

    Raises:
        ReportError: a line that is not such an object, naming the file and line number.
    """
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ReportError(f"{path}:{number}: malformed samples line: {exc}") from None
        problem = _check_sample(record)
        if problem:
            raise ReportError(f"{path}:{number}: malformed samples line: {problem}")
        records.append(record)
    return records


def _run_names(paths: Sequence[Path]) -> list[str]:
    """Directory names, or longer path tails where two runs share a name."""
    for depth in (1, 2, 3):
        names = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def load_run(run_dir: str | os.PathLike[str], name: str | None = None) -> RunData:
    """Read a run directory's config, metrics and sample file list.

    Raises:
        FileNotFoundError: no metrics.jsonl (the message names the directory).
        ValueError: a malformed metrics line or config.yaml.
    """
    path = Path(run_dir)
    metrics = metric_series(read_metrics(path))
    return RunData(
        path=path,
        name=name or path.resolve().name,
        config=read_config(path),
        metrics=metrics,
        sample_files=sample_files(path),
    )


# --------------------------------------------------------------------------------------------
# Which metrics go in which chart
# --------------------------------------------------------------------------------------------


def _is_eval(key: str) -> bool:
    return key.startswith("eval/")


DIAGNOSTIC_KEYS = frozenset({"kl/sampler_trainer", "num_skipped"})


def _is_diagnostic(key: str) -> bool:
    """Timings (``*_s``), spreads (``*_std``), differences (``*_minus_*``), KL(old‖new) and the
    sampler/trainer mismatch: left out of the reward and KL charts (they go to "Other")."""
    return (
        key in DIAGNOSTIC_KEYS
        or key.endswith(("_s", "_std"))
        or "_minus_" in key
        or key.startswith("kl_old_new")
    )


def training_reward_keys(keys: Iterable[str]) -> list[str]:
    """Training keys naming a reward or score, ``score`` first (diagnostics left out)."""
    found = [
        k
        for k in keys
        if not _is_eval(k)
        and not _is_diagnostic(k)
        and ("reward" in k.lower() or "score" in k.lower())
    ]
    return sorted(found, key=lambda k: (k != "score", _natural_key(k)))


def eval_reward_keys(keys: Iterable[str]) -> list[str]:
    """``eval/proxy`` then the ``eval/gold/*`` keys."""
    keys = list(keys)
    gold = sorted((k for k in keys if k.startswith("eval/gold/")), key=_natural_key)
    return (["eval/proxy"] if "eval/proxy" in keys else []) + gold


def _prefixed(prefix: str) -> Callable[[Iterable[str]], list[str]]:
    return lambda keys: sorted((k for k in keys if k.startswith(prefix)), key=_natural_key)


def _named(*names: str) -> Callable[[Iterable[str]], list[str]]:
    return lambda keys: [n for n in names if n in set(keys)]


def _training_group(group: str) -> Callable[[Iterable[str]], list[str]]:
    return lambda keys: sorted(
        (k for k in keys if not _is_eval(k) and not _is_diagnostic(k) and metric_group(k) == group),
        key=_natural_key,
    )


def _entropy_keys(keys: Iterable[str]) -> list[str]:
    keys = list(keys)
    training = [k for k in keys if not _is_eval(k) and "entropy" in k.lower()]
    return sorted(training, key=_natural_key) + (["eval/entropy"] if "eval/entropy" in keys else [])


@dataclass(frozen=True)
class ChartSpec:
    title: str
    ylabel: str
    keys: Callable[[Iterable[str]], list[str]]
    """The metrics of the chart, in legend order, among a run's keys."""


@dataclass(frozen=True)
class SectionSpec:
    anchor: str
    title: str
    blurb: str
    charts: tuple[ChartSpec, ...]


SECTIONS = (
    SectionSpec(
        "rewards",
        "Rewards over steps",
        "Training reward (score) on the training batches; eval/proxy is the same reward on "
        "held-out prompts, eval/gold/* are rewards that are measured but never optimised.",
        (ChartSpec("Rewards", "reward", lambda k: training_reward_keys(k) + eval_reward_keys(k)),),
    ),
    SectionSpec(
        "kl",
        "KL and β over time",
        "Training KL estimates (k1, k3, exact) and the held-out KL(π_θ‖π_ref) in nats per "
        "response; eval/kl/offtask is the exact KL on off-task prompts.",
        (
            ChartSpec("KL during training", "KL (nats)", _training_group("kl")),
            ChartSpec("KL on held-out prompts", "KL (nats per response)", _prefixed("eval/kl/")),
            ChartSpec("β (KL coefficient)", "β", _training_group("beta")),
        ),
    ),
    SectionSpec(
        "diversity",
        "Diversity over time",
        "Distinct-n and expectation-adjusted distinct-n (EAD) over the eval samples, Self-BLEU "
        "and semantic similarity between samples (lower is more diverse), and the entropy.",
        (
            ChartSpec("Distinct-n", "distinct n-grams / n-grams", _prefixed("eval/distinct_")),
            ChartSpec("Expectation-adjusted distinct-n", "EAD", _prefixed("eval/ead_")),
            ChartSpec(
                "Similarity between samples",
                "similarity",
                _named("eval/self_bleu", "eval/semantic_similarity"),
            ),
            ChartSpec("Entropy", "entropy (nats)", _entropy_keys),
        ),
    ),
    SectionSpec(
        "capability",
        "Capability",
        "Per-token negative log-likelihood of held-out general text under π_θ and π_ref; "
        "nll_tax = nll − ref_nll > 0 is capability lost to training.",
        (
            ChartSpec(
                "NLL of held-out text", "NLL (nats per token)", _named("eval/nll", "eval/ref_nll")
            ),
            ChartSpec("NLL tax (nll − ref_nll)", "nats per token", _named("eval/nll_tax")),
        ),
    ),
)
"""The step-axis sections after the √KL chart, in report order."""


def sqrt_kl_series(metrics: Series) -> dict[str, list[tuple[float, float, int]]]:
    """The over-optimisation picture: for eval/proxy and each eval/gold/* key, the points
    ``(√max(eval/kl/exact, 0), value, step)`` at the eval steps where both were logged, in step
    order (Gao et al. 2022, arXiv:2210.10760, plot rewards against d = √KL)."""
    kl = dict(metrics.get("eval/kl/exact", []))
    out = {}
    for key in eval_reward_keys(metrics):
        points = [(math.sqrt(max(kl[s], 0.0)), v, s) for s, v in metrics[key] if s in kl]
        if points:
            out[key] = points
    return out


# --------------------------------------------------------------------------------------------
# SVG charts
# --------------------------------------------------------------------------------------------


def nice_ticks(lo: float, hi: float, target: int = 5, integer: bool = False) -> list[float]:
    """Evenly spaced round ticks (steps of 1, 2, 2.5 or 5 × 10^k) covering [lo, hi]; the first
    and last tick are the axis limits. A degenerate range is widened, without crossing 0."""
    lo, hi = min(lo, hi), max(lo, hi)
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = (max(lo - pad, 0.0) if lo >= 0 else lo - pad), hi + pad
    raw = (hi - lo) / max(target, 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * magnitude >= raw * 0.999)
    if integer:
        step = max(1.0, round(step))
    start = math.floor(lo / step + 1e-9) * step
    count = max(1, math.ceil(hi / step - 1e-9) - math.floor(lo / step + 1e-9))
    return [
        0.0 if abs(start + i * step) < step * 1e-9 else start + i * step for i in range(count + 1)
    ]


def format_tick(value: float, step: float) -> str:
    """A tick label with as many decimals as the tick spacing needs."""
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(step) < 1e-4:
        return f"{value:.3g}"
    decimals = 0
    while decimals < 6 and abs(round(step, decimals) - step) > abs(step) * 1e-6:
        decimals += 1
    return f"{value:.{decimals}f}"


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.{digits}g}"


def _style(run_index: int, key_index: int, n_runs: int) -> tuple[str, str]:
    """(colour, dash): colour per metric for one run; colour per run, dash per metric for many."""
    if n_runs == 1:
        return PALETTE[key_index % len(PALETTE)], ""
    return PALETTE[run_index % len(PALETTE)], DASHES[key_index % len(DASHES)]


def _legend_layout(
    entries: Sequence[LegendEntry | None], width: float, left: float
) -> list[tuple[float, int]]:
    """(x, row) of each legend entry, wrapping rows at the chart width; None starts a new row."""
    places, x, row = [], left, 0
    for entry_or_break in entries:
        if entry_or_break is None:
            if x > left:
                x, row = left, row + 1
            places.append((x, row))
            continue
        entry = 26 + LEGEND_CHAR_WIDTH * len(entry_or_break[0]) + 16
        if x > left and x + entry > width - 8:
            x, row = left, row + 1
        places.append((x, row))
        x += entry
    return places


def svg_line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    *,
    styles: Mapping[str, tuple[str, str]] | None = None,
    point_labels: Mapping[str, Sequence[str]] | None = None,
    legend: Sequence[LegendEntry | None] | None = None,
    integer_x: bool = False,
    width: int = CHART_WIDTH,
    height: int = CHART_HEIGHT,
) -> str:
    """An inline SVG line chart: one line with hoverable point markers per series, ticks,
    gridlines, axis labels and a legend under the plot. Returns "" when no series has a finite
    point.

    Args:
        series: label → [(x, y)] in drawing order; non-finite points are left out.
        title, xlabel, ylabel: the texts of the chart.
        styles: label → (colour, SVG dash array); default a palette colour per series.
        point_labels: label → one tooltip per point (default: label, x and y).
        legend: (text, colour, dash) entries, None for a row break (default: one per series).
        integer_x: x ticks at whole numbers (steps).
        width, height: size in SVG units without the legend.
    """
    clean = {
        label: [(float(x), float(y)) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
        for label, pts in series.items()
    }
    kept = [label for label, pts in clean.items() if pts]
    if not kept:
        return ""
    xs = [x for label in kept for x, _ in clean[label]]
    ys = [y for label in kept for _, y in clean[label]]
    xticks = nice_ticks(min(xs), max(xs), 6, integer=integer_x)
    yticks = nice_ticks(min(ys), max(ys), 5)
    xstep, ystep = xticks[1] - xticks[0], yticks[1] - yticks[0]
    ytexts = [format_tick(v, ystep) for v in yticks]
    left = 34 + TICK_CHAR_WIDTH * max(len(t) for t in ytexts)
    right, top, bottom = 20, 38, 48
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - xticks[0]) / (xticks[-1] - xticks[0]) * plot_w

    def sy(y: float) -> float:
        return top + plot_h - (y - yticks[0]) / (yticks[-1] - yticks[0]) * plot_h

    colours = {
        label: (styles or {}).get(label) or (PALETTE[i % len(PALETTE)], "")
        for i, label in enumerate(kept)
    }
    if legend is None:
        legend = [(label, *colours[label]) for label in kept]
    places = _legend_layout(legend, width, left)
    total_h = height + (places[-1][1] + 1) * LEGEND_ROW_HEIGHT
    esc = html.escape
    out = [
        f'<svg class="chart" viewBox="0 0 {width} {total_h:.0f}" role="img" '
        f'aria-label="{esc(title)}">',
        f'<text class="title" x="{left:.1f}" y="22">{esc(title)}</text>',
    ]
    for value, text in zip(yticks, ytexts, strict=True):
        y = sy(value)
        out.append(
            f'<line class="grid" x1="{left:.1f}" x2="{left + plot_w:.1f}" y1="{y:.1f}" '
            f'y2="{y:.1f}"/>'
        )
        out.append(
            f'<text class="tick" x="{left - 7:.1f}" y="{y + 3.5:.1f}" '
            f'text-anchor="end">{esc(text)}</text>'
        )
    for value in xticks:
        x = sx(value)
        out.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}"/>')
        out.append(
            f'<text class="tick" x="{x:.1f}" y="{top + plot_h + 16}" '
            f'text-anchor="middle">{esc(format_tick(value, xstep))}</text>'
        )
    out.append(f'<path class="axis" d="M{left:.1f},{top}V{top + plot_h}H{left + plot_w:.1f}"/>')
    out.append(
        f'<text class="label" x="{left + plot_w / 2:.1f}" y="{top + plot_h + 38}" '
        f'text-anchor="middle">{esc(xlabel)}</text>'
    )
    out.append(
        f'<text class="label" text-anchor="middle" '
        f'transform="translate(14,{top + plot_h / 2:.1f}) rotate(-90)">{esc(ylabel)}</text>'
    )
    for label in kept:
        colour, dash = colours[label]
        pts = clean[label]
        tips = (point_labels or {}).get(label)
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<g class="series"><title>{esc(label)}</title>')
        if len(pts) > 1:
            d = "M" + "L".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            out.append(f'<path class="line" d="{d}" stroke="{colour}"{dash_attr}/>')
        stride = max(1, math.ceil(len(pts) / MAX_MARKERS))
        for i in range(0, len(pts), stride):
            x, y = pts[i]
            tip = (
                tips[i]
                if tips is not None and i < len(tips)
                else (f"{label}\n{xlabel} = {x:.6g}\n{ylabel} = {y:.6g}")
            )
            out.append(
                f'<circle class="pt" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" '
                f'fill="{colour}"><title>{esc(tip)}</title></circle>'
            )
        out.append("</g>")
    out.append('<g class="legend">')
    for (x, row), entry in zip(places, legend, strict=True):
        if entry is None:
            continue
        label, colour, dash = entry
        y = height + row * LEGEND_ROW_HEIGHT + 4
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(
            f'<line x1="{x:.1f}" x2="{x + 22:.1f}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="{colour}" stroke-width="2.5"{dash_attr}/>'
        )
        out.append(f'<text x="{x + 27:.1f}" y="{y + 4:.1f}">{esc(label)}</text>')
    out.append("</g></svg>")
    return "\n".join(out)


def _overlay(
    runs: Sequence[RunData],
    per_run: Sequence[Mapping[str, Sequence[tuple[float, float, str]]]],
    title: str,
    xlabel: str,
    ylabel: str,
    **chart_options: Any,
) -> str:
    """Overlay each run's series (key → [(x, y, tooltip detail)]) in one chart. One run: a colour
    per key. Several: a colour per run and a dash per key, and a legend of run names (then of
    keys, in grey, by dash) instead of every combination."""
    keys: list[str] = []
    for found in per_run:
        keys += [k for k in found if k not in keys]
    series: dict[str, Points] = {}
    styles: dict[str, tuple[str, str]] = {}
    tips: dict[str, list[str]] = {}
    for run_index, (run, found) in enumerate(zip(runs, per_run, strict=True)):
        for key_index, key in enumerate(keys):
            if found.get(key):
                label = key if len(runs) == 1 else f"{run.name} · {key}"
                series[label] = [(x, y) for x, y, _ in found[key]]
                styles[label] = _style(run_index, key_index, len(runs))
                tips[label] = [f"{label}\n{detail}" for _, _, detail in found[key]]
    if not series:
        return ""
    legend: list[LegendEntry | None] | None = None
    if len(runs) > 1:
        legend = [
            (run.name, _style(i, 0, len(runs))[0], "")
            for i, (run, found) in enumerate(zip(runs, per_run, strict=True))
            if any(found.values())
        ]
        if len(keys) > 1:
            legend.append(None)
            legend += [
                (key, LEGEND_KEY_COLOUR, _style(0, i, len(runs))[1]) for i, key in enumerate(keys)
            ]
    return svg_line_chart(
        series,
        title,
        xlabel,
        ylabel,
        styles=styles,
        point_labels=tips,
        legend=legend,
        **chart_options,
    )


def _step_points(run: RunData, keys: Iterable[str]) -> dict[str, list[tuple[float, float, str]]]:
    return {
        key: [(float(s), v, f"step {s}: {v:.6g}") for s, v in run.metrics[key]]
        for key in keys
        if key in run.metrics
    }


def overlay_chart(runs: Sequence[RunData], spec: ChartSpec, **chart_options: Any) -> str:
    """One chart of ``spec``'s metrics against step, every run overlaid ("" if none has them)."""
    per_run = [_step_points(run, spec.keys(run.metrics)) for run in runs]
    return _overlay(runs, per_run, spec.title, "step", spec.ylabel, integer_x=True, **chart_options)


def sqrt_kl_chart(runs: Sequence[RunData]) -> str:
    """Proxy and gold rewards against √KL at each eval, every run overlaid."""
    per_run = [
        {
            key: [
                (x, y, f"step {s}\n√KL = {x:.4g} (KL = {x * x:.4g} nats)\nreward = {y:.4g}")
                for x, y, s in points
            ]
            for key, points in sqrt_kl_series(run.metrics).items()
        }
        for run in runs
    ]
    return _overlay(runs, per_run, "Proxy and gold reward vs √KL", SQRT_KL_LABEL, "reward")


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------


def default_steps(available: Sequence[int]) -> list[int]:
    """First, middle and last of the available sample steps (fewer when they coincide)."""
    ordered = sorted(available)
    if not ordered:
        return []
    return sorted({ordered[0], ordered[len(ordered) // 2], ordered[-1]})


def select_samples(samples: Sequence[Mapping[str, Any]], limit: int = MAX_SAMPLES_PER_STEP) -> list:
    """Up to ``limit`` samples: the first sample of every prompt, then the second, and so on;
    prompts in the order they first appear."""
    prompt_order: dict[Any, int] = {}
    rank: dict[Any, int] = {}
    keyed = []
    for position, sample in enumerate(samples):
        prompt = sample.get("prompt_index", position)
        prompt_order.setdefault(prompt, len(prompt_order))
        rank[prompt] = rank.get(prompt, -1) + 1
        keyed.append(((rank[prompt], prompt_order[prompt], position), sample))
    return [sample for _, sample in sorted(keyed, key=lambda item: item[0])[:limit]]


def _has_tokens(sample: Mapping[str, Any]) -> bool:
    return all(f in sample for f in TOKEN_FIELDS)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def kl_scale(samples: Iterable[Mapping[str, Any]], q: float = KL_SCALE_PERCENTILE) -> float:
    """Token KL at which the colour saturates: the q-th percentile of token_kl over ``samples``
    (the largest value if that is 0; 1.0 without any positive token KL)."""
    values = [
        max(float(v), 0.0)
        for sample in samples
        if _has_tokens(sample)
        for v in sample["token_kl"]
        if v is not None and math.isfinite(v)
    ]
    if not values or max(values) <= 0:
        return 1.0
    scale = percentile(values, q)
    return scale if scale > 0 else max(values)


def kl_colour(value: float, scale: float) -> str:
    """Background colour of a token with KL ``value``: white at 0, rising linearly in RGB to
    saturated red at ``scale`` and above; negative or non-finite values are white."""
    if scale <= 0:
        raise ValueError(f"the KL colour scale must be > 0, got {scale}")
    fraction = min(max(value / scale, 0.0), 1.0) if math.isfinite(value) else 0.0
    rgb = (round(lo + (hi - lo) * fraction) for lo, hi in zip(KL_LOW_RGB, KL_HIGH_RGB, strict=True))
    return "#" + "".join(f"{c:02x}" for c in rgb)


def _visible(token: str) -> str:
    """A token's escaped text with newlines shown as ↵ (and kept as line breaks)."""
    if token == "":
        return '<span class="ws">∅</span>'
    text = html.escape(token).replace("\r\n", "\n").replace("\r", "\n")
    return text.replace("\n", '<span class="ws">↵</span>\n').replace(
        "\t", '<span class="ws">⇥</span>\t'
    )


def _f2(value: Any) -> str:
    return f"{value:.2f}" if _is_number(value) else "n/a"


def token_spans(sample: Mapping[str, Any], scale: float) -> str:
    """The completion as one ``<span>`` per token, coloured by its token_kl on ``scale`` and with
    the tooltip ``log π = -1.23, log π_ref = -2.34, KL = 0.56``; escaped plain text when the
    sample has no token fields."""
    if not _has_tokens(sample):
        return html.escape(str(sample.get("completion", "")))
    parts = []
    for token, logp, ref_logp, kl in zip(*(sample[f] for f in TOKEN_FIELDS), strict=True):
        value = float(kl) if _is_number(kl) else math.nan
        style = f"background:{kl_colour(value, scale)}"
        if math.isfinite(value) and value / scale > KL_LIGHT_TEXT_FRACTION:
            style += ";color:#fff"
        tip = f"log π = {_f2(logp)}, log π_ref = {_f2(ref_logp)}, KL = {_f2(kl)}"
        parts.append(
            f'<span class="tok" style="{style}" title="{html.escape(tip)}">{_visible(token)}</span>'
        )
    return "".join(parts)


def sample_card(sample: Mapping[str, Any], scale: float) -> str:
    """One sample as an HTML card: prompt, response tokens coloured by their KL (``scale`` = the
    KL of the darkest colour), and its rewards."""
    esc = html.escape
    chips = [
        f'<span class="chip">{esc(name)} <b>{_fmt(value)}</b></span>'
        for name, value in (sample.get("rewards") or {}).items()
    ]
    kl = sample.get("kl") or {}
    if kl:
        detail = ", ".join(f"{k} = {_fmt(v)}" for k, v in kl.items())
        shown = kl.get("exact", next(iter(kl.values())))
        name = "exact KL" if "exact" in kl else f"KL {next(iter(kl))}"
        chips.append(
            f'<span class="chip kl" title="{esc(detail)}">{name} <b>{_fmt(shown)}</b> nats</span>'
        )
    where = f"prompt {sample.get('prompt_index', '?')} · sample {sample.get('sample_index', '?')}"
    kind = "completion" if _has_tokens(sample) else "completion plain"
    return (
        '<div class="sample">'
        f'<div class="meta"><span class="where">{esc(where)}</span>{"".join(chips)}</div>'
        f'<div class="prompt">{esc(str(sample.get("prompt", "")))}</div>'
        f'<div class="{kind}">{token_spans(sample, scale)}</div>'
        "</div>"
    )


def kl_legend(scale: float) -> str:
    """The HTML legend of :func:`sample_card`'s per-token KL colours up to ``scale``."""
    swatches = []
    for i in range(KL_LEGEND_STOPS):
        value = scale * i / (KL_LEGEND_STOPS - 1)
        more = "≥ " if i == KL_LEGEND_STOPS - 1 else ""
        swatches.append(
            f'<span class="swatch" style="background:{kl_colour(value, scale)}"></span>'
            f'<span class="swatch-label">{more}{value:.3g}</span>'
        )
    return (
        '<div class="kl-legend"><span class="legend-title">token KL(π_θ‖π_ref), nats:</span>'
        + "".join(swatches)
        + f'<span class="note">scale = {KL_SCALE_PERCENTILE:g}th percentile of token KL over the '
        "shown samples; hover a token for its log-probs</span></div>"
    )


def _choose_steps(run: RunData, steps: Sequence[int] | None) -> list[int]:
    available = list(run.sample_files)
    if steps is None:
        return default_steps(available)
    missing = [s for s in steps if s not in run.sample_files]
    if missing:
        listed = ", ".join(map(str, available)) if available else "none"
        raise ReportError(
            f"no samples for step {', '.join(map(str, missing))} in {run.path / SAMPLES_DIR}; "
            f"available steps: {listed}"
        )
    return sorted(set(steps))


def _samples_section(runs: Sequence[RunData], shown: Sequence[dict[int, list]]) -> str:
    every = [s for per_run in shown for samples in per_run.values() for s in samples]
    scale = kl_scale(every)
    parts = [_section_open("samples", "Samples")]
    if not every:
        parts.append('<p class="note">No samples/step-*.jsonl files in these runs.</p>')
    if any(_has_tokens(s) for s in every):
        parts.append(kl_legend(scale))
    for run, per_run in zip(runs, shown, strict=True):
        if len(runs) > 1:
            parts.append(f'<h3 class="run-name">{html.escape(run.name)}</h3>')
        if not per_run:
            parts.append(f'<p class="note">No samples in {html.escape(str(run.path))}.</p>')
        for step, samples in per_run.items():
            parts.append(f'<h4>step {step} <span class="note">· {len(samples)} shown</span></h4>')
            parts.append('<div class="sample-grid">')
            parts.extend(sample_card(s, scale) for s in samples)
            parts.append("</div>")
    parts.append("</section>")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------


def _section_open(anchor: str, title: str, blurb: str = "") -> str:
    note = f'<p class="note">{html.escape(blurb)}</p>' if blurb else ""
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{note}'


def _charts_section(anchor: str, title: str, blurb: str, charts: Sequence[str]) -> str:
    drawn = [c for c in charts if c]
    body = (
        '<div class="charts">' + "".join(f'<div class="card">{c}</div>' for c in drawn) + "</div>"
        if drawn
        else '<p class="empty">None of these metrics were logged.</p>'
    )
    return f"{_section_open(anchor, title, blurb)}{body}</section>"


def _first_last(points: Sequence[tuple[int, float]] | None) -> str:
    if not points:
        return "—"
    (s0, v0), (s1, v1) = points[0], points[-1]
    tip = f"step {s0}: {v0:.6g} → step {s1}: {v1:.6g} (Δ {v1 - v0:+.4g})"
    return f'<span title="{html.escape(tip)}">{_fmt(v0)} → <b>{_fmt(v1)}</b></span>'


def _last(points: Sequence[tuple[int, float]] | None) -> str:
    if not points:
        return "—"
    step, value = points[-1]
    return f'<span title="step {step}">{_fmt(value)}</span>'


def _config_table(run: RunData) -> str:
    esc = html.escape
    scalars = {k: v for k, v in run.config.items() if v is None or isinstance(v, (str, int, float))}
    nested = [k for k in run.config if k not in scalars]
    rows = "".join(
        f"<tr><th>{esc(str(k))}</th><td>{esc(json.dumps(v, ensure_ascii=False))}</td></tr>"
        for k, v in scalars.items()
    )
    more = (
        f'<p class="note">Nested (not shown): {esc(", ".join(map(str, nested)))}</p>'
        if nested
        else ""
    )
    label = f"config of {run.name}" + ("" if run.config else " (no config.yaml)")
    return (
        f"<details><summary>{esc(label)} · {len(scalars)} top-level values</summary>"
        f'<table class="config">{rows}</table>{more}</details>'
    )


def _summary_section(runs: Sequence[RunData]) -> str:
    esc = html.escape
    golds: list[str] = []
    for run in runs:
        golds += [k for k in eval_reward_keys(run.metrics) if k != "eval/proxy" and k not in golds]
    head = ["run", "algorithm", "steps", "evals", "eval/proxy first → last"]
    head += [f"{k.removeprefix('eval/')} first → last" for k in golds]
    head += ["eval/kl/exact (last)", "eval/nll_tax (last)"]
    rows = []
    for run in runs:
        steps = sorted({s for points in run.metrics.values() for s, _ in points})
        evals = {s for k, pts in run.metrics.items() if _is_eval(k) for s, _ in pts}
        cells = [
            f'<td title="{esc(str(run.path.resolve()))}"><b>{esc(run.name)}</b></td>',
            f"<td>{esc(run.algorithm)}</td>",
            f'<td class="num">{f"{steps[0]}–{steps[-1]}" if steps else "—"}</td>',
            f'<td class="num">{len(evals)}</td>',
            f'<td class="num">{_first_last(run.metrics.get("eval/proxy"))}</td>',
        ]
        cells += [f'<td class="num">{_first_last(run.metrics.get(k))}</td>' for k in golds]
        cells += [
            f'<td class="num">{_last(run.metrics.get("eval/kl/exact"))}</td>',
            f'<td class="num">{_last(run.metrics.get("eval/nll_tax"))}</td>',
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    table = (
        '<div class="scroll"><table class="summary"><thead><tr>'
        + "".join(f"<th>{esc(h)}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></div>"
    )
    configs = "".join(_config_table(run) for run in runs)
    return f"{_section_open('summary', 'Summary')}{table}{configs}</section>"


def _other_section(runs: Sequence[RunData], used: set[str]) -> str:
    """A small chart per metric no other chart shows; constant metrics listed in one line."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.metrics if k not in used and k not in keys]
    charts, constants = [], []
    for key in sorted(keys, key=_natural_key):
        values = {v for run in runs for _, v in run.metrics.get(key, [])}
        if len(values) == 1:
            constants.append(f"{key} = {_fmt(next(iter(values)), 6)}")
            continue
        spec = ChartSpec(key, key.rsplit("/", 1)[-1], _named(key))
        charts.append(overlay_chart(runs, spec, width=SMALL_CHART_WIDTH, height=SMALL_CHART_HEIGHT))
    if not keys:
        return ""
    note = (
        f'<p class="note">Constant: {html.escape(" · ".join(constants))}</p>' if constants else ""
    )
    grid = "".join(f'<div class="card">{c}</div>' for c in charts if c)
    return (
        f"{_section_open('other', 'Other metrics', 'Metrics not shown above.')}"
        f'<div class="charts small">{grid}</div>{note}</section>'
    )


_FIGURE_CSS = """
svg { background: #fff; }
text { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  sans-serif; fill: #1f2328; }
.title { font-size: 14px; font-weight: 600; }
.tick { font-size: 11px; fill: #59636e; }
.label { font-size: 12px; fill: #59636e; }
.legend text { font-size: 11.5px; }
.grid { stroke: #eceff2; stroke-width: 1; }
.axis { stroke: #8c959f; stroke-width: 1; fill: none; }
.line { fill: none; stroke-width: 2; stroke-linejoin: round; stroke-linecap: round; }
.pt { stroke: #fff; stroke-width: 1; }
"""

_CHART_RE = re.compile(
    r'<svg class="chart" viewBox="0 0 ([0-9.]+) ([0-9.]+)"(.*?)>(.*?)</svg>', re.S
)


def _ascii_title(title: str) -> str:
    for a, b in (("√", "sqrt-"), ("β", "beta"), ("δ", "delta"), ("χ²", "chi2"), ("–", "-")):
        title = title.replace(a, b)
    return title.lower()


def chart_figures(page: str) -> list[tuple[str, str]]:
    """The charts of a rendered report page as standalone SVG files: [(file name, SVG text)],
    each with its own namespace, size and style sheet (the page's CSS does not travel with a
    chart), named after its title (``gold-vader-vs-kl.svg``; a repeated title gets ``-2``...)."""
    out: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for m in _CHART_RE.finditer(page):
        width, height, attrs, body = m.groups()
        label = re.search(r'aria-label="([^"]*)"', attrs)
        title = html.unescape(label.group(1)) if label else "chart"
        slug = re.sub(r"[^a-z0-9]+", "-", _ascii_title(title)).strip("-")[:60]
        seen[slug] = seen.get(slug, 0) + 1
        name = f"{slug or 'chart'}{'' if seen[slug] == 1 else '-' + str(seen[slug])}.svg"
        svg = (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}"{attrs}><style>{_FIGURE_CSS}</style>'
            f'<rect width="100%" height="100%" fill="#fff"/>{body}</svg>\n'
        )
        out.append((name, svg))
    return out


CSS = """
:root { --fg: #1f2328; --muted: #59636e; --border: #d1d9e0; --soft: #f6f8fa; --link: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
    sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 28px 32px 64px; }
h1 { font-size: 26px; margin: 0 0 2px; }
h2 { font-size: 19px; margin: 36px 0 6px; padding-bottom: 6px;
  border-bottom: 1px solid var(--border); }
h3.run-name { font-size: 16px; margin: 26px 0 4px; }
h4 { font-size: 14px; margin: 20px 0 6px; }
.sub, .note, .empty { color: var(--muted); font-size: 13px; margin: 2px 0 10px; }
.empty { font-style: italic; }
nav { margin: 12px 0 0; font-size: 13px; }
nav a { color: var(--link); text-decoration: none; margin-right: 16px; }
nav a:hover { text-decoration: underline; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
table.summary { margin: 8px 0 14px; }
table.summary th { font-size: 12px; color: var(--muted); font-weight: 600; text-align: left;
  border-bottom: 2px solid var(--border); padding: 6px 14px 6px 0; white-space: nowrap; }
table.summary td { padding: 7px 14px 7px 0; border-bottom: 1px solid var(--border);
  white-space: nowrap; }
td.num { text-align: right; }
details { margin: 6px 0; }
summary { cursor: pointer; color: var(--link); font-size: 13px; }
table.config { margin: 6px 0 6px 16px; font-size: 12.5px; }
table.config th { text-align: left; font-weight: 500; color: var(--muted);
  padding: 2px 18px 2px 0; }
table.config td { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  padding: 2px 0; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(500px, 1fr));
  gap: 16px; }
.charts.small { grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); }
.card { border: 1px solid var(--border); border-radius: 8px; padding: 6px 8px 4px;
  background: #fff; }
svg.chart { display: block; width: 100%; height: auto; overflow: visible; }
svg.chart text { font-family: inherit; fill: var(--fg); }
svg.chart .title { font-size: 14px; font-weight: 600; }
svg.chart .tick { font-size: 11px; fill: var(--muted); }
svg.chart .label { font-size: 12px; fill: var(--muted); }
svg.chart .legend text { font-size: 11.5px; }
svg.chart .grid { stroke: #eceff2; stroke-width: 1; }
svg.chart .axis { stroke: #8c959f; stroke-width: 1; fill: none; }
svg.chart .line { fill: none; stroke-width: 2; stroke-linejoin: round; stroke-linecap: round; }
svg.chart .pt { stroke: #fff; stroke-width: 1; }
svg.chart .pt:hover { r: 5.5; stroke: var(--fg); }
.kl-legend { display: flex; flex-wrap: wrap; align-items: center; gap: 4px 6px;
  margin: 8px 0 4px; font-size: 12.5px; }
.kl-legend .legend-title { font-weight: 600; margin-right: 4px; }
.kl-legend .note { margin: 0 0 0 10px; }
.swatch { display: inline-block; width: 26px; height: 14px; border: 1px solid var(--border);
  border-radius: 2px; vertical-align: middle; }
.swatch-label { margin-right: 6px; font-variant-numeric: tabular-nums; color: var(--muted); }
.sample-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr));
  gap: 10px; }
.sample { border: 1px solid var(--border); border-radius: 8px; padding: 10px 12px; min-width: 0; }
.meta { display: flex; flex-wrap: wrap; align-items: center; gap: 6px; margin-bottom: 6px;
  font-size: 12.5px; }
.where { color: var(--muted); margin-right: 6px; }
.chip { background: var(--soft); border: 1px solid var(--border); border-radius: 10px;
  padding: 0 8px; font-variant-numeric: tabular-nums; }
.chip.kl { border-color: #f1a9a9; background: #fdf1f1; }
.prompt, .completion { white-space: pre-wrap; overflow-wrap: anywhere;
  font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace; }
.prompt { color: var(--muted); background: var(--soft); font-size: 12.5px; padding: 6px 8px;
  border-radius: 6px; max-height: 12em; overflow: auto; }
.completion { font-size: 13px; line-height: 1.85; margin-top: 6px; }
.tok { border-radius: 2px; padding: 1px 0;
  box-shadow: inset -1px 0 0 rgba(255, 255, 255, 0.7); }
.tok:hover { outline: 1.5px solid var(--fg); }
.ws { opacity: 0.6; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"""


def render_report(
    runs: Sequence[RunData], shown: Sequence[dict[int, list]], generated: str = ""
) -> str:
    """The report's HTML for ``runs``; ``shown[i]`` maps step → samples shown for run i."""
    esc = html.escape
    names = ", ".join(run.name for run in runs)
    sections = [_summary_section(runs)]
    used: set[str] = set()
    charts_of: dict[str, list[str]] = {}
    for spec in SECTIONS:
        charts_of[spec.anchor] = [overlay_chart(runs, chart) for chart in spec.charts]
        for run in runs:
            for chart in spec.charts:
                used.update(chart.keys(run.metrics))
    rewards = SECTIONS[0]
    sections.append(
        _charts_section(rewards.anchor, rewards.title, rewards.blurb, charts_of["rewards"])
    )
    sections.append(
        _charts_section(
            "sqrt-kl",
            "Proxy vs gold against √KL",
            "Each point is one eval: x = √KL(π_θ‖π_ref) per response on held-out prompts, y the "
            "proxy (optimised) and gold (never optimised) rewards. A proxy that keeps rising while "
            "gold falls is reward over-optimisation (Gao et al. 2022, arXiv:2210.10760).",
            [sqrt_kl_chart(runs)],
        )
    )
    for spec in SECTIONS[1:]:
        sections.append(
            _charts_section(spec.anchor, spec.title, spec.blurb, charts_of[spec.anchor])
        )
    other = _other_section(runs, used | {"eval/kl/exact"})
    if other:
        sections.append(other)
    sections.append(_samples_section(runs, shown))
    anchors = [
        ("summary", "Summary"),
        ("rewards", "Rewards"),
        ("sqrt-kl", "Proxy vs gold"),
        ("kl", "KL and β"),
        ("diversity", "Diversity"),
        ("capability", "Capability"),
    ]
    anchors += [("other", "Other")] if other else []
    anchors += [("samples", "Samples")]
    nav = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in anchors)
    footer = f"tether {esc(tether.__version__)}" + (
        f" · generated {esc(generated)}" if generated else ""
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>tether report: {esc(names)}</title><style>{CSS}</style></head>\n"
        f"<body><main><header><h1>tether report</h1>"
        f'<p class="sub">{esc(names)}</p><nav>{nav}</nav></header>\n'
        + "\n".join(sections)
        + f"\n<footer>{footer}</footer></main></body></html>\n"
    )


def atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and ``os.replace``: readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_report(
    run_dirs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    steps: Sequence[int] | None = None,
) -> Path:
    """Write one self-contained HTML report of ``run_dirs`` and return its path.

    Args:
        run_dirs: run directories; their curves overlay in every chart, one colour per run.
        out: the HTML path (default ``<first run dir>/report.html``), written atomically.
        steps: the sample steps to show for every run (default: each run's first, middle and
            last samples step).

    Raises:
        FileNotFoundError: a directory without metrics.jsonl (the message names it).
        ValueError: a malformed metrics or samples line (file and line named), a config.yaml
            that is not a mapping, or a step in ``steps`` without a samples file (ReportError,
            listing the available steps).
    """
    if not run_dirs:
        raise ValueError("write_report needs at least one run directory")
    paths = [Path(d) for d in run_dirs]
    runs = [load_run(p, name) for p, name in zip(paths, _run_names(paths), strict=True)]
    chosen = [_choose_steps(run, steps) for run in runs]
    shown = [
        {step: select_samples(read_samples(run.sample_files[step])) for step in run_steps}
        for run, run_steps in zip(runs, chosen, strict=True)
    ]
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out_path = Path(out) if out is not None else paths[0] / REPORT_FILE
    atomic_write(out_path, render_report(runs, shown, generated))
    return out_path
