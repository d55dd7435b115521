"""The run skeleton every trainer uses: configs, run directories, metrics, checkpoints, plots.

* :mod:`tether.runs.config` — config dataclasses (:class:`RunConfig`, :func:`option`), YAML +
  ``key=value`` overrides (:func:`load_config`, :func:`save_config`).
* :mod:`tether.runs.rundir` — :class:`RunDir`: config.yaml, metrics.jsonl + TensorBoard, resume.
* :mod:`tether.runs.checkpoint` — atomic, exactly-resumable checkpoints.
* :mod:`tether.runs.progress` — a terminal progress bar that stays quiet off a TTY.
* :mod:`tether.runs.plot` — :func:`plot_run`, a PNG of a run's metrics, a panel per unit.
* :mod:`tether.runs.registry` — the algorithms ``tether train`` dispatches to.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "checkpoint": (
        "checkpoint_name",
        "latest_checkpoint",
        "list_checkpoints",
        "load_checkpoint",
        "save_checkpoint",
        "trainable_state_dict",
    ),
    "config": (
        "ConfigError",
        "RunConfig",
        "check_config_class",
        "config_to_dict",
        "describe_config",
        "dump_config",
        "load_config",
        "option",
        "save_config",
    ),
    "plot": ("PlotError", "build_figure", "metric_group", "metric_panel", "plot_run"),
    "progress": ("Progress",),
    "registry": (
        "CONFIGS",
        "TRAINERS",
        "UnknownTrainerError",
        "get_config",
        "get_trainer",
        "register_trainer",
    ),
    "rundir": ("RunDir", "read_metrics"),
}
"""Public name → the submodule that defines it. Imported on first use (PEP 562), so that
``tether --help`` and ``tether train --help`` do not pay for torch."""
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'tether.runs' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"tether.runs.{module}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from tether.runs.checkpoint import (
        checkpoint_name,
        latest_checkpoint,
        list_checkpoints,
        load_checkpoint,
        save_checkpoint,
        trainable_state_dict,
    )
    from tether.runs.config import (
        ConfigError,
        RunConfig,
        check_config_class,
        config_to_dict,
        describe_config,
        dump_config,
        load_config,
        option,
        save_config,
    )
    from tether.runs.plot import PlotError, build_figure, metric_group, metric_panel, plot_run
    from tether.runs.progress import Progress
    from tether.runs.registry import (
        CONFIGS,
        TRAINERS,
        UnknownTrainerError,
        get_config,
        get_trainer,
        register_trainer,
    )
    from tether.runs.rundir import RunDir, read_metrics

__all__ = [
    "CONFIGS",
    "TRAINERS",
    "ConfigError",
    "PlotError",
    "Progress",
    "RunConfig",
    "RunDir",
    "UnknownTrainerError",
    "build_figure",
    "check_config_class",
    "checkpoint_name",
    "config_to_dict",
    "describe_config",
    "dump_config",
    "get_config",
    "get_trainer",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_config",
    "metric_group",
    "metric_panel",
    "option",
    "plot_run",
    "read_metrics",
    "register_trainer",
    "save_checkpoint",
    "save_config",
    "trainable_state_dict",
]
