"""``results.json`` of a lab: its file name, schema version and the check of its layout (the
schema is documented in :mod:`tether.lab.overopt`)."""

from __future__ import annotations

from typing import Any

RESULTS_FILE = "results.json"
RESULTS_SCHEMA = 1


_ARM_KEYS = {
    "name": str,
    "kind": str,
    "method": str,
    "proxy": str,
    "settings": dict,
    "points": list,
}
_POINT_KEYS = ("x", "kl", "sqrt_kl", "proxy", "gold", "gold_se")
_PROXY_KEYS = ("pairs", "members", "combine", "heldout_accuracy", "spearman", "path")
_FIT_KEYS = ("form", "alpha", "beta", "r2", "n", "peak_kl", "peak_gain")


def validate_results(results: Any, source: str = RESULTS_FILE) -> None:
    """Check ``results`` against the documented schema (the module docstring); a ValueError
    names the first field that is missing or of the wrong type."""

    def fail(where: str, what: str) -> None:
        raise ValueError(f"{source}: {where}: {what}")

    if not isinstance(results, dict):
        fail("top level", "expected an object")
    if results.get("schema") != RESULTS_SCHEMA:
        fail("schema", f"expected {RESULTS_SCHEMA}, got {results.get('schema')!r}")
    for key, tp in (
        ("config", dict),
        ("gold", str),
        ("proxies", dict),
        ("arms", list),
        ("claims", dict),
        ("tether_version", str),
    ):
        if not isinstance(results.get(key), tp):
            fail(key, f"expected {tp.__name__}")
    for name, p in results["proxies"].items():
        missing = [k for k in _PROXY_KEYS if k not in p]
        if missing:
            fail(f"proxies.{name}", f"missing {missing}")
    for i, arm in enumerate(results["arms"]):
        for key, tp in _ARM_KEYS.items():
            if not isinstance(arm.get(key), tp):
                fail(f"arms[{i}].{key}", f"expected {tp.__name__}")
        if arm["kind"] not in ("bon", "trained"):
            fail(f"arms[{i}].kind", f"expected 'bon' or 'trained', got {arm['kind']!r}")
        if not arm["points"]:
            fail(f"arms[{i}].points", "expected at least one point")
        for j, point in enumerate(arm["points"]):
            missing = [k for k in _POINT_KEYS if k not in point]
            if missing:
                fail(f"arms[{i}].points[{j}]", f"missing {missing}")
        fit = arm.get("fit")
        if fit is not None and any(k not in fit for k in _FIT_KEYS):
            fail(f"arms[{i}].fit", f"expected the keys {list(_FIT_KEYS)}")
    for key in ("a", "b", "c", "d"):
        c = results["claims"].get(key)
        if not isinstance(c, dict) or not all(k in c for k in ("question", "verdict", "tested")):
            fail(f"claims.{key}", "expected question, verdict and tested")
