"""Pure-python checks that configs run in ``__post_init__`` and that the code they configure runs
too: defined once here (torch-free) and imported by both, so ``tether train ALGO --print-config``
validates a config without importing torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

DEFAULT_MAX_ERROR = 0.2
"""The clip on :class:`tether.core.controllers.AdaptiveKL`'s proportional error (Ziegler et al.
2019; TRL)."""


def smallest_valid_horizon(n_steps: float, max_error: float = DEFAULT_MAX_ERROR) -> int:
    """The smallest integer :class:`AdaptiveKL` horizon for ``n_steps`` samples per update:
    ⌊m·n_steps⌋ + 1 with m = min(max_error, 1): the first integer above m·n_steps, the horizon at
    which the smallest factor the rule can apply, 1 − m·n_steps/horizon, reaches 0."""
    return math.floor(min(max_error, 1.0) * n_steps) + 1


def check_horizon(
    horizon: float,
    n_steps: float,
    max_error: float = DEFAULT_MAX_ERROR,
    *,
    name: str = "horizon",
    steps: str = "n_steps",
    note: str = "",
) -> None:
    """Raise a ``ValueError`` unless :class:`AdaptiveKL`'s factor 1 + e·n_steps/horizon stays > 0
    for every error e it can see: horizon > m·n_steps with m = min(max_error, 1) (KL ≥ 0 gives
    e ≥ −1). The message names the option ``name``, says what ``n_steps`` is made of (``steps``,
    explained by ``note``) and gives the smallest valid value."""
    m = min(max_error, 1.0)
    if not horizon > m * n_steps:
        raise ValueError(
            f"{name} must be > max_error·{steps} = {m:g}·{n_steps:g} = {m * n_steps:g}"
            f"{f' ({note})' if note else ''}, got "
            f"{horizon:g}: a KL below target would set β to ≤ 0 for good; the smallest valid "
            f"value is {smallest_valid_horizon(n_steps, m)}"
        )


def reward_names(specs: Sequence[str]) -> list[str]:
    """Short metric names of reward specs: a built-in's name, a function's name, a directory's
    base name; characters outside [A-Za-z0-9_.-] become '_'. Duplicates are an error."""
    names = []
    for spec in specs:
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"eval_rewards: each entry must be a non-empty string, got {spec!r}")
        if ":" in spec and not Path(spec).is_dir():
            short = spec.rsplit(":", 1)[1].rsplit(".", 1)[-1]
        else:
            short = Path(spec.rstrip("/")).name or spec
        names.append(re.sub(r"[^A-Za-z0-9_.\-]", "_", short))
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(
            f"eval_rewards {list(specs)} give the same metric name {dupes}: each eval reward "
            "needs a distinct name"
        )
    return names


def check_sharded_reference(sharding: str, reference: str) -> None:
    """``sharding=fsdp2`` cannot keep a ``synced`` (TR-DPO) reference: it mixes the whole policy
    into its own copy and saves that copy in every checkpoint."""
    if sharding == "fsdp2" and reference == "synced":
        raise ValueError(
            "reference must be copy or adapter under sharding=fsdp2, got reference=synced: it "
            "mixes the whole policy into its own copy every sync_tau steps and saves that copy "
            "in every checkpoint (use copy, sharded like the policy, or adapter with LoRA; or "
            "sharding=none)"
        )
