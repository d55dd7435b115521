"""The lab's ``report.html``: one self-contained page (inline SVG, no scripts, works offline)
drawn from ``results.json`` and the arms' samples, with the charts and sample cards of
:mod:`tether.eval.report`.

Sections: the verdict on each claim; proxies (held-out accuracy and Spearman with the gold); a
summary table per arm; gold and proxy vs √KL with Gao's fitted curves; the reward–KL frontier
per method; diversity and capability NLL vs KL; β and KL trajectories; samples of the most
over-optimised arm at low, peak-gold and final KL, tokens coloured by their KL to the reference.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import tether
from tether.eval.report import (
    CSS,
    PALETTE,
    SQRT_KL_LABEL,
    atomic_write,
    chart_figures,
    kl_legend,
    kl_scale,
    read_samples,
    sample_card,
    sample_files,
    select_samples,
    svg_line_chart,
)
from tether.lab.claims import envelope
from tether.lab.fits import gao_curve
from tether.lab.results import validate_results

REPORT_FILE = "report.html"
FIGURES_DIR = "figures"
FIT_POINTS = 40


def _f(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _label(arm: dict[str, Any]) -> str:
    seed = arm.get("seed")
    return arm["name"] + (f" s{seed}" if seed is not None else "")


def _styles(arms: Sequence[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    names = sorted({a["name"] for a in arms})
    colour = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    return {_label(a): (colour[a["name"]], "" if a["kind"] == "trained" else "7 4") for a in arms}


def _fit_series(arm: dict[str, Any]) -> list[tuple[float, float]]:
    fit = arm.get("fit")
    if not fit or not arm["points"]:
        return []
    base = arm["points"][0]["gold"]
    top = max(p["sqrt_kl"] for p in arm["points"])
    d = np.linspace(0.0, top, FIT_POINTS)
    r = gao_curve(fit["form"], d, fit["alpha"], fit["beta"])
    return [(float(x), float(y + base)) for x, y in zip(d, r, strict=True)]


def _xy(arm: dict[str, Any], key: str, x: str = "sqrt_kl") -> list[tuple[float, float]]:
    return [
        (float(p[x]), float(p[key]))
        for p in arm["points"]
        if p.get(key) is not None and p.get(x) is not None
    ]


def _chart(
    arms: Sequence[dict[str, Any]],
    key: str,
    title: str,
    ylabel: str,
    *,
    fits: bool = False,
    x: str = "sqrt_kl",
    xlabel: str = SQRT_KL_LABEL,
) -> str:
    series: dict[str, list[tuple[float, float]]] = {}
    styles = _styles(arms)
    all_styles: dict[str, tuple[str, str]] = {}
    for a in arms:
        pts = _xy(a, key, x)
        if pts:
            series[_label(a)] = pts
            all_styles[_label(a)] = styles[_label(a)]
        if fits:
            f = _fit_series(a)
            if f:
                name = f"{_label(a)} (Gao fit)"
                series[name] = f
                all_styles[name] = (styles[_label(a)][0], "2 3")
    return svg_line_chart(series, title, xlabel, ylabel, styles=all_styles)


def _frontier_chart(arms: Sequence[dict[str, Any]]) -> str:
    series: dict[str, list[tuple[float, float]]] = {}
    for method in sorted({a["method"] for a in arms}):
        pts = [p for a in arms if a["method"] == method for p in a["points"]]
        front = envelope(pts)
        if front:
            series[method] = [(p["sqrt_kl"], p["gold"]) for p in front]
    return svg_line_chart(
        series,
        "Reward–KL frontier per method",
        SQRT_KL_LABEL,
        "gold reward",
    )


def _bon_kl_chart(arms: Sequence[dict[str, Any]]) -> str:
    """Best-of-n's KL against n: the analytic bound log n − (n − 1)/n and the Monte-Carlo
    estimate from the same pool, per proxy."""
    series: dict[str, list[tuple[float, float]]] = {}
    bound = "bound log n − (n−1)/n"
    for a in arms:
        if a["kind"] != "bon":
            continue
        if bound not in series:
            series[bound] = [(float(p["x"]), float(p["kl"])) for p in a["points"]]
        mc = [(float(p["x"]), float(p["kl_mc"])) for p in a["points"] if p.get("kl_mc") is not None]
        if mc:
            series[f"Monte-Carlo, {a['proxy']}"] = mc
    if len(series) < 2:
        return ""
    return svg_line_chart(
        series, "Best-of-n KL: analytic bound vs Monte-Carlo estimate", "n", "KL(π_BoN‖π) (nats)"
    )


def _trajectory_chart(arms: Sequence[dict[str, Any]], key: str, title: str, ylabel: str) -> str:
    series = {}
    styles = _styles(arms)
    for a in arms:
        pts = [
            (float(t["step"]), float(t[key]))
            for t in a.get("trajectory") or []
            if t.get(key) is not None
        ]
        if pts:
            series[_label(a)] = pts
    return svg_line_chart(
        series, title, "step", ylabel, styles={k: styles[k] for k in series}, integer_x=True
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="summary"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _summary(arms: Sequence[dict[str, Any]]) -> str:
    rows = []
    for a in arms:
        last = a["points"][-1]
        peak = max(a["points"], key=lambda p: p["gold"])
        fit = a.get("fit") or {}
        div = last.get("ead_2", last.get("distinct_2"))
        rows.append(
            [
                html.escape(_label(a)),
                html.escape(a["method"]),
                html.escape(a["proxy"]),
                _f(last["kl"], 2),
                _f(last["proxy"]),
                _f(last["gold"]),
                f"{_f(peak['gold'])} @ {_f(peak['kl'], 2)}",
                _f(div),
                _f(last.get("nll_tax"), 4),
                _f(fit.get("alpha")),
                _f(fit.get("beta")),
                _f(fit.get("r2"), 2),
                _f(fit.get("peak_kl"), 2),
            ]
        )
    return _table(
        [
            "arm",
            "method",
            "proxy",
            "KL",
            "proxy",
            "gold",
            "peak gold @ KL",
            "EAD-2",
            "NLL tax",
            "fit α",
            "fit β",
            "R²",
            "fit peak KL",
        ],
        rows,
    )


def _proxies(proxies: dict[str, Any]) -> str:
    rows = [
        [
            html.escape(n),
            str(p["pairs"]),
            str(p["members"]),
            html.escape(p["combine"] or "–"),
            _f(p["heldout_accuracy"]),
            _f(p["spearman"]),
        ]
        for n, p in proxies.items()
    ]
    return _table(["proxy", "pairs", "members", "combine", "held-out accuracy", "Spearman"], rows)


def _samples(lab_dir: Path, arms: Sequence[dict[str, Any]]) -> str:
    trained = [a for a in arms if a["kind"] == "trained" and a["points"]]
    if not trained:
        return ""
    arm = max(trained, key=lambda a: a["points"][-1]["kl"])
    run_dir = lab_dir / "arms" / arm["name"] / f"seed{arm['seed']}"
    files = sample_files(run_dir)
    if not files:
        return ""
    peak = max(arm["points"], key=lambda p: p["gold"])["x"]
    chosen = [("low KL (start)", min(files)), ("peak gold", peak), ("final", max(files))]
    shown = []
    for what, step in chosen:
        if step in files and step not in [s for _, s, _ in shown]:
            shown.append((what, step, select_samples(read_samples(files[step]), 4)))
    scale = kl_scale(s for _, _, ss in shown for s in ss)
    blocks = [
        f"<h3>{html.escape(what)}: step {step}</h3>" + "".join(sample_card(s, scale) for s in ss)
        for what, step, ss in shown
    ]
    return (
        f"<p>Arm <b>{html.escape(_label(arm))}</b> (the highest final KL).</p>"
        + kl_legend(scale)
        + "".join(blocks)
    )


def render_lab_report(results: dict[str, Any], lab_dir: Path, generated: str = "") -> str:
    esc = html.escape
    arms = results["arms"]
    claims = results.get("claims", {})
    claim_html = "".join(
        f'<div class="claim"><h3>({esc(k)}) {esc(c["question"])}</h3>'
        f"<p>{esc(c['verdict'])}</p></div>"
        for k, c in claims.items()
    )
    charts = [
        _chart(
            arms,
            "gold",
            f"Gold ({results['gold']}) vs √KL, with Gao et al.'s fits",
            "gold reward",
            fits=True,
        ),
        _chart(arms, "proxy", "Proxy (optimised) vs √KL", "proxy reward"),
        _frontier_chart(arms),
        _chart(arms, "ead_2", "Diversity (EAD-2) vs √KL", "EAD-2"),
        _chart(
            arms,
            "nll_tax",
            "Capability: NLL tax on general text vs √KL",
            "NLL − reference NLL (nats/token)",
        ),
        _bon_kl_chart(arms),
        _trajectory_chart(arms, "beta", "β per step", "β"),
        _trajectory_chart(arms, "kl", "Training KL per step", "KL (nats/response)"),
    ]
    sections = [
        ("claims", "Four claims, answered from these numbers", claim_html),
        ("proxies", "Proxies", _proxies(results.get("proxies", {}))),
        ("arms", "Arms", _summary(arms)),
        ("charts", "Curves", "".join(c for c in charts if c)),
        ("samples", "Samples", _samples(lab_dir, arms)),
    ]
    body = "".join(
        f'<section id="{a}"><h2>{esc(t)}</h2>{content}</section>'
        for a, t, content in sections
        if content
    )
    nav = "".join(f'<a href="#{a}">{esc(t.split(",")[0])}</a>' for a, t, c in sections if c)
    footer = f"tether {esc(tether.__version__)}" + (
        f" · generated {esc(generated)}" if generated else ""
    )
    extra_css = ".claim h3{margin:.6em 0 .2em}.claim p{margin:0 0 .8em}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>tether lab: {esc(str(lab_dir))}</title><style>{CSS}{extra_css}</style></head>\n"
        f"<body><main><header><h1>tether over-optimisation lab</h1>"
        f'<p class="sub">gold: {esc(results["gold"])} · {len(arms)} arms</p><nav>{nav}</nav>'
        f"</header>\n{body}\n<footer>{footer}</footer></main></body></html>\n"
    )


def write_lab_report(
    lab_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None
) -> Path:
    """Write ``<lab_dir>/report.html`` (or ``out``) from ``<lab_dir>/results.json``, and each of
    its charts as a standalone SVG under ``figures/`` beside it (for papers and READMEs)."""
    lab_dir = Path(lab_dir)
    path = lab_dir / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `tether lab overopt` first")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    validate_results(results, str(path))
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    target = Path(out) if out else lab_dir / REPORT_FILE
    page = render_lab_report(results, lab_dir, generated)
    atomic_write(target, page)
    figures = target.parent / FIGURES_DIR
    figures.mkdir(exist_ok=True)
    for name, svg in chart_figures(page):
        atomic_write(figures / name, svg)
    return target
