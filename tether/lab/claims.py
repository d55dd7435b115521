"""Four published claims, tested on a lab's arms and answered in words from the numbers.

(a) Gao et al. 2022 §3.6: a KL penalty does not change the gold-vs-KL frontier, it only moves
    where along it RL stops ("like early stopping").
(b) Kirk et al. 2023 (arXiv:2310.06452): more KL penalty gives more output diversity (the lab
    asks the brief's question: does a higher penalty give *less* diversity?).
(c) Coste et al. 2023 (arXiv:2310.02743): proxy ensembles reduce over-optimisation at equal KL.
(d) Rafailov et al. 2023 (arXiv:2305.18290, Fig. 2): DPO's reward–KL frontier dominates PPO's.

"At equal KL" comparisons interpolate the comparison arm's gold linearly in d = √KL between its
evaluations (no extrapolation) at each evaluation of the arm tested, then average the differences;
the error bar is the standard error of those differences, with the evaluations' own standard
errors added in quadrature. A difference within two standard errors is reported as "no
difference detected". Each verdict names the arms and the numbers it rests on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

PENALTY_KEYS = ("kl_coef", "beta", "max_kl", "kl_target")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); nan with < 2 points or no spread."""
    from scipy.stats import spearmanr

    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    r = spearmanr(a, b).statistic
    return float(r) if np.isfinite(r) else math.nan


def gold_at(points: Sequence[dict[str, Any]], d: float) -> tuple[float, float]:
    """(gold, its standard error) at √KL = ``d`` by linear interpolation between ``points`` sorted
    by √KL; (nan, nan) outside their range."""
    pts = sorted(points, key=lambda p: p["sqrt_kl"])
    xs = [p["sqrt_kl"] for p in pts]
    if not pts or d < xs[0] or d > xs[-1]:
        return math.nan, math.nan
    for a, b in zip(pts, pts[1:], strict=False):
        if a["sqrt_kl"] <= d <= b["sqrt_kl"]:
            span = b["sqrt_kl"] - a["sqrt_kl"]
            t = 0.0 if span <= 0 else (d - a["sqrt_kl"]) / span
            se = _se(a) * (1 - t) + _se(b) * t
            return a["gold"] * (1 - t) + b["gold"] * t, se
    return float(pts[-1]["gold"]), _se(pts[-1])


def _se(p: dict[str, Any]) -> float:
    v = p.get("gold_se")
    return float(v) if v is not None and math.isfinite(v) else 0.0


def envelope(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The upper frontier of points: sorted by √KL, each point kept when its gold exceeds every
    point at lower or equal KL (the best gold reached at or below each KL)."""
    out: list[dict[str, Any]] = []
    best = -math.inf
    for p in sorted(points, key=lambda p: (p["sqrt_kl"], -p["gold"])):
        if p["gold"] > best:
            out.append(p)
            best = p["gold"]
    return out


def compare_at_equal_kl(
    tested: Sequence[dict[str, Any]], against: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Mean gold(tested) − gold(against) at the tested points' √KL (d > 0, inside ``against``'s
    range): {"diff", "se", "n"}; n = 0 when the KL ranges do not overlap."""
    diffs, ses = [], []
    for p in tested:
        if p["sqrt_kl"] <= 0:
            continue
        g, se = gold_at(against, p["sqrt_kl"])
        if math.isfinite(g):
            diffs.append(p["gold"] - g)
            ses.append(math.hypot(se, _se(p)))
    if not diffs:
        return {"diff": math.nan, "se": math.nan, "n": 0}
    d = np.asarray(diffs)
    spread = d.std(ddof=1) / math.sqrt(d.size) if d.size > 1 else 0.0
    noise = math.sqrt(sum(s * s for s in ses)) / d.size
    return {"diff": float(d.mean()), "se": float(math.hypot(spread, noise)), "n": int(d.size)}


def _differs(c: dict[str, Any]) -> int:
    """+1 / −1 when the difference is beyond two standard errors, 0 otherwise."""
    if c["n"] == 0 or not math.isfinite(c["diff"]):
        return 0
    if abs(c["diff"]) > 2 * max(c["se"], 1e-12):
        return 1 if c["diff"] > 0 else -1
    return 0


def _fmt(c: dict[str, Any]) -> str:
    return f"{c['diff']:+.3f} ± {c['se']:.3f} over {c['n']} evaluations"


def _penalty(arm: dict[str, Any]) -> float | None:
    """The arm's penalty strength: its fixed β (kl_coef / beta) when set, else None."""
    s = arm.get("settings", {})
    for key in ("kl_coef", "beta"):
        if key in s and isinstance(s[key], (int, float)):
            return float(s[key])
    return None


def _is_adaptive(arm: dict[str, Any]) -> bool:
    return arm.get("settings", {}).get("kl_controller") in ("adaptive", "pid")


def _group_points(arms: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for a in arms for p in a["points"]]


def _groups(arms: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Trained arms by name (their seeds together)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for a in arms:
        if a["kind"] == "trained":
            out.setdefault(a["name"], []).append(a)
    return out


def claim_a(results: dict[str, Any]) -> dict[str, Any]:
    q = "Does a KL penalty change the gold-vs-KL frontier, or only where along it RL stops?"
    groups = _groups(results["arms"])
    rows = []
    for name, runs in groups.items():
        a = runs[0]
        if a["method"] == "dpo" or _penalty(a) != 0.0:
            continue
        for other, oruns in groups.items():
            o = oruns[0]
            if other == name or o["method"] != a["method"] or o["proxy"] != a["proxy"]:
                continue
            if not (_is_adaptive(o) or (_penalty(o) or 0) > 0):
                continue
            c = compare_at_equal_kl(_group_points(oruns), _group_points(runs))
            stop = {
                "penalised_final_kl": float(np.mean([r["points"][-1]["kl"] for r in oruns])),
                "unpenalised_final_kl": float(np.mean([r["points"][-1]["kl"] for r in runs])),
                "penalised_final_gold": float(np.mean([r["points"][-1]["gold"] for r in oruns])),
                "unpenalised_final_gold": float(np.mean([r["points"][-1]["gold"] for r in runs])),
            }
            rows.append({"penalised": other, "unpenalised": name, **c, **stop})
    if not rows:
        return _untested(
            q, "needs a trained arm with β = 0 and one with β > 0 (same method, proxy)"
        )
    parts, changed = [], 0
    for r in rows:
        s = _differs(r)
        changed += s != 0
        where = (
            f"it stopped at KL {r['penalised_final_kl']:.2f} "
            f"(gold {r['penalised_final_gold']:+.3f})"
            f" where β = 0 went on to KL {r['unpenalised_final_kl']:.2f} (gold "
            f"{r['unpenalised_final_gold']:+.3f})"
        )
        if r["n"] == 0:
            parts.append(f"{r['penalised']}: no KL overlap with {r['unpenalised']}; {where}")
        else:
            verdict = ("above" if s > 0 else "below") if s else "on"
            parts.append(
                f"{r['penalised']} lies {verdict} {r['unpenalised']}'s gold-vs-√KL curve "
                f"(gold difference at equal KL {_fmt(r)}); {where}"
            )
    if changed == 0:
        head = (
            "Consistent with Gao et al.: at equal KL the penalised runs' gold matches the "
            "unpenalised run's within two standard errors, so the penalty acted like early "
            "stopping along the same frontier."
        )
    else:
        head = (
            f"Not what Gao et al. report: {changed} of {len(rows)} penalised runs sit off the "
            "unpenalised frontier by more than two standard errors."
        )
    return {
        "question": q,
        "tested": True,
        "verdict": head + " " + "; ".join(parts) + ".",
        "rows": rows,
    }


def diversity_difference(values: dict[float, Sequence[float]]) -> dict[str, float]:
    """Diversity at the highest β minus at the lowest, from the final evaluations of each β's
    seeds: {"diff", "se", "sd", "df"}. The standard error pools the seed-to-seed standard deviation
    over every β with two or more seeds (``sd``, ``df`` degrees of freedom) and scales it by
    √(1/n_hi + 1/n_lo); nan when no β has two seeds."""
    betas = sorted(values)
    lo, hi = np.asarray(values[betas[0]], float), np.asarray(values[betas[-1]], float)
    ss = sum(float(((np.asarray(v, float) - np.mean(v)) ** 2).sum()) for v in values.values())
    df = sum(len(v) - 1 for v in values.values())
    sd = math.sqrt(ss / df) if df > 0 else math.nan
    se = sd * math.sqrt(1 / hi.size + 1 / lo.size) if df > 0 else math.nan
    return {"diff": float(hi.mean() - lo.mean()), "se": se, "sd": sd, "df": float(df)}


def claim_b(results: dict[str, Any]) -> dict[str, Any]:
    q = "Does a higher KL penalty give less output diversity?"
    groups = _groups(results["arms"])
    by_family: dict[tuple[str, str], dict[float, list[float]]] = {}
    metric = None
    for runs in groups.values():
        beta = _penalty(runs[0])
        if beta is None:
            continue
        last = [r["points"][-1] for r in runs]
        for key in ("ead_2", "distinct_2"):
            if all(key in p for p in last):
                metric = metric or key
                break
        if metric is None or not all(metric in p for p in last):
            continue
        fam = by_family.setdefault((runs[0]["method"], runs[0]["proxy"]), {})
        fam.setdefault(beta, []).extend(float(p[metric]) for p in last)
    fams = {k: v for k, v in by_family.items() if len(v) >= 2}
    if not fams:
        return _untested(q, "needs trained arms at two or more fixed β (same method and proxy)")
    parts, rows, signs = [], [], []
    for (method, proxy), vals in fams.items():
        betas = sorted(vals)
        rho = spearman([b for b in betas for _ in vals[b]], [v for b in betas for v in vals[b]])
        c = diversity_difference(vals)
        c["n"] = 1
        sign = _differs(c) if math.isfinite(c["se"]) else 0
        signs.append((sign, rho, math.isfinite(c["se"])))
        listing = ", ".join(
            f"β={b:g}: {np.mean(vals[b]):.3f}"
            + (
                f" ± {np.std(vals[b], ddof=1) / math.sqrt(len(vals[b])):.3f}"
                if len(vals[b]) > 1
                else ""
            )
            + f" ({len(vals[b])} seed{'s' if len(vals[b]) > 1 else ''})"
            for b in betas
        )
        err = (
            f"β={betas[-1]:g} minus β={betas[0]:g}: {c['diff']:+.3f} ± {c['se']:.3f} "
            f"(seed-to-seed SD {c['sd']:.3f} pooled over {c['df']:.0f} df)"
            if math.isfinite(c["se"])
            else f"β={betas[-1]:g} minus β={betas[0]:g}: {c['diff']:+.3f} "
            "(one seed per β: no error bar)"
        )
        parts.append(
            f"{method} on {proxy}: final {metric} {listing}; {err}; Spearman ρ with β {rho:+.2f}"
        )
        rows.append(
            {"method": method, "proxy": proxy, "values": {str(b): vals[b] for b in betas}, **c}
        )
    detected = [s for s, _, has_se in signs if has_se and s != 0]
    any_se = any(has_se for _, _, has_se in signs)
    finite = [r for _, r, _ in signs if math.isfinite(r)]
    mean_rho = float(np.mean(finite)) if finite else math.nan
    if detected:
        if all(s < 0 for s in detected):
            head = "Yes: a higher penalty ended with less diversity, beyond two standard errors."
        elif all(s > 0 for s in detected):
            head = (
                "No: a higher penalty kept *more* diversity (Kirk et al.'s direction), beyond "
                "two standard errors."
            )
        else:
            head = "Mixed: the direction differs between method/proxy families."
    elif any_se:
        way = "more" if mean_rho > 0 else "less" if mean_rho < 0 else "the same"
        head = (
            f"No difference detected: the higher penalty's {metric} (ending with {way} "
            "diversity) is within two standard errors of the lowest β's."
        )
    elif mean_rho > 0:
        head = "No: a higher penalty kept *more* diversity (Kirk et al.'s direction)."
    elif mean_rho < 0:
        head = "Yes: a higher penalty ended with less diversity here."
    else:
        head = "No trend: diversity did not move with β."
    return {
        "question": q,
        "tested": True,
        "metric": metric,
        "verdict": head + " " + "; ".join(parts) + ".",
        "rows": rows,
    }


def claim_c(results: dict[str, Any]) -> dict[str, Any]:
    q = "Do proxy ensembles reduce over-optimisation at equal KL?"
    groups = _groups(results["arms"])
    rows = []
    for name, runs in groups.items():
        a = runs[0]
        if "-" not in a["proxy"]:
            continue
        single = a["proxy"].split("-")[0]
        for other, oruns in groups.items():
            o = oruns[0]
            if o["proxy"] != single or o["method"] != a["method"] or o["settings"] != a["settings"]:
                continue
            c = compare_at_equal_kl(_group_points(runs), _group_points(oruns))
            rows.append({"ensemble": name, "single": other, "proxy": a["proxy"], **c})
    if not rows:
        return _untested(
            q, "needs an arm on an ensemble proxy and the same arm on its single proxy"
        )
    parts, better = [], 0
    for r in rows:
        s = _differs(r)
        better += s > 0
        word = {1: "higher", -1: "lower", 0: "no different"}[s]
        parts.append(
            f"{r['ensemble']} ({r['proxy']}) vs {r['single']}: gold {word} at equal KL ({_fmt(r)})"
        )
    head = (
        f"Yes in {better} of {len(rows)} comparisons."
        if better
        else "Not detected: no ensemble arm had a higher gold than its single-proxy twin at "
        "equal KL."
    )
    return {
        "question": q,
        "tested": True,
        "verdict": head + " " + "; ".join(parts) + ".",
        "rows": rows,
    }


def claim_d(results: dict[str, Any]) -> dict[str, Any]:
    q = "Does DPO's reward–KL frontier dominate PPO's?"
    groups = _groups(results["arms"])
    dpo = [a for runs in groups.values() for a in runs if a["method"] == "dpo"]
    rl = [a for runs in groups.values() for a in runs if a["method"] != "dpo"]
    if not dpo or not rl:
        return _untested(q, "needs DPO arms and RL arms")
    rl_front = envelope(_group_points(rl))
    # DPO's own frontier over its trained points (KL > 0): with the shared start point in it, a
    # DPO run whose gold never beat its start would have a one-point frontier and no comparison
    dpo_front = envelope([p for p in _group_points(dpo) if p["sqrt_kl"] > 0])
    if not dpo_front:
        return _untested(q, "the DPO arms have no evaluation past their start")
    c = compare_at_equal_kl(dpo_front, rl_front)
    s = _differs(c)
    best = {
        "dpo_best_gold": max(p["gold"] for p in dpo_front),
        "rl_best_gold": max(p["gold"] for p in rl_front),
    }
    methods = sorted({a["method"] for a in rl})
    if c["n"] == 0:
        head = "Not comparable: the DPO and RL arms reached disjoint KL ranges."
    elif s > 0:
        head = f"Yes: DPO's frontier lies above the RL frontier ({', '.join(methods)})."
    elif s < 0:
        head = f"No: DPO's frontier lies below the RL frontier ({', '.join(methods)})."
    else:
        head = "No difference detected between the DPO and RL frontiers."
    verdict = (
        f"{head} Gold of DPO's frontier minus RL's at equal KL: {_fmt(c)}; best gold reached: "
        f"DPO {best['dpo_best_gold']:+.3f}, RL {best['rl_best_gold']:+.3f}."
    )
    return {"question": q, "tested": True, "verdict": verdict, **c, **best}


def _untested(question: str, why: str) -> dict[str, Any]:
    return {"question": question, "tested": False, "verdict": f"Not tested in this lab: {why}."}


def all_claims(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The four claims' verdicts from a lab's results (``results.json`` without ``claims``)."""
    return {
        "a": claim_a(results),
        "b": claim_b(results),
        "c": claim_c(results),
        "d": claim_d(results),
    }
