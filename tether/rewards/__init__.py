"""Reward functions ``(prompts, completions) -> rewards``: built-in rules, learned reward models,
user functions, and the check of what they return.

reward = make_reward("vader")                   # a built-in
reward = make_reward("runs/rm")                 # a reward model saved by `tether train reward`
reward = make_reward("my_rewards:score")        # a function of your own
scores = validate_rewards(reward(prompts, completions), len(completions), "vader")
scores = call_reward(reward, prompts, completions, "vader", step=3)   # both, errors named
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import cast

from tether.errors import ModelError
from tether.rewards.base import (
    RewardError,
    RewardFn,
    ValidatedRewards,
    call_reward,
    check_texts,
    reward_name,
    validate_rewards,
)
from tether.rewards.length import Length
from tether.rewards.lexicon import AfinnSentiment, TextBlobSentiment
from tether.rewards.vader import VaderSentiment

BUILTIN_REWARDS: dict[str, Callable[[], RewardFn]] = {
    "vader": VaderSentiment,
    "length": Length,
    "textblob": TextBlobSentiment,
    "afinn": AfinnSentiment,
}
"""Built-in rewards by name: each value builds a fresh reward function."""


def make_reward(spec: str) -> RewardFn:
    """Build the reward function that ``spec`` names.

    ``spec`` is, in the order tried:

    * a built-in name (:data:`BUILTIN_REWARDS`): ``"vader"`` (VADER compound sentiment of the
      completion, in [−1, 1]), ``"length"`` (completion characters / 100), or the gold
      lexicons ``"textblob"`` and ``"afinn"`` (:mod:`tether.rewards.lexicon`);
    * a directory: a reward model saved by ``tether train reward``, loaded on the CPU with
      :func:`tether.rewards.model.load_reward_model` (normalised if it records a normalisation),
      or an ensemble of reward specs with an ``ensemble.json``
      (:mod:`tether.rewards.ensemble`: mean, worst-case or uncertainty-weighted);
    * ``"module:function"``: the user's own reward function, imported from an importable module
      (installed, or on ``PYTHONPATH``: ``PYTHONPATH=. tether bon --reward my_rewards:score``).
      The function is called as ``function(prompts, completions)`` and must return one real
      number per completion; attributes may be dotted (``"pkg.mod:Scorer.score"``).

    Raises:
        ValueError: ``spec`` is none of these; the message lists the built-ins.
        RewardImportError: the module of a ``"module:function"`` spec cannot be imported (a
            :class:`~tether.errors.ModelError` and an ``ImportError``).
        ModelError: the function does not exist or is not callable; ``spec`` is a file, not a
            directory; the directory is not a saved reward model
            (:class:`~tether.models.loading.ModelNotFoundError`, a ``FileNotFoundError``) or
            cannot be loaded.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a reward spec must be a non-empty string, got {spec!r}")
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]()
    if Path(spec).is_file():
        stem = Path(spec).stem
        raise ModelError(
            f"reward {spec!r} is a file; expected a built-in name, a reward-model directory or "
            f"'module:function' (for a function `score` in {Path(spec).name}: "
            f"'{stem}:score', with its folder on PYTHONPATH)"
        )
    if Path(spec).is_dir():
        from tether.rewards.ensemble import is_ensemble_dir, load_ensemble

        if is_ensemble_dir(spec):
            return load_ensemble(spec)
        from tether.rewards.model import load_reward_model  # transformers: imported on demand

        return load_reward_model(spec)
    if ":" in spec:
        return _import_function(spec)
    builtins = ", ".join(sorted(BUILTIN_REWARDS))
    if "/" in spec or os.sep in spec:
        from tether.models.loading import ModelNotFoundError  # transformers: imported on demand

        raise ModelNotFoundError(
            f"unknown reward {spec!r}: no such reward-model directory ({Path(spec).absolute()}); "
            f"expected a built-in ({builtins}), a reward-model directory, or 'module:function'"
        )
    raise ModelError(
        f"unknown reward {spec!r}: expected a built-in ({builtins}), "
        "a reward-model directory (no such directory exists), or 'module:function'"
    )


class RewardImportError(ModelError, ImportError):
    """The module of a ``"module:function"`` reward spec cannot be imported (also an
    ``ImportError``, as it was before)."""


def _import_function(spec: str) -> RewardFn:
    """Import the callable named by ``"module:attr[.attr...]"``."""
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"reward {spec!r}: expected 'module:function' with both parts non-empty")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise RewardImportError(
                f"reward {spec!r}: cannot import module {module_name!r} (no module named "
                f"{missing!r}); is it installed or on PYTHONPATH? (e.g. `PYTHONPATH=. tether ...` "
                f"for ./{module_name.replace('.', '/')}.py)"
            ) from e
        raise RewardImportError(
            f"reward {spec!r}: cannot import module {module_name!r}: importing it needs "
            f"{missing!r}, which is not installed ({e})"
        ) from e
    except Exception as e:  # the user's module raised while it was imported
        where = ""
        if isinstance(e, SyntaxError) and e.filename:
            where = f" ({e.filename}, line {e.lineno})"
        raise RewardImportError(
            f"reward {spec!r}: cannot import module {module_name!r}: importing it raised "
            f"{type(e).__name__}: {e}{where}"
        ) from e
    obj: object = module
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            found = getattr(module, "__file__", None) or module_name
            raise ModelError(
                f"reward {spec!r}: {module_name!r} has no attribute {attr_path!r} (module file "
                f"{found}); check the function's name"
            ) from None
    if not callable(obj):
        raise ModelError(
            f"reward {spec!r}: {attr_path!r} is a {type(obj).__name__}, not a function "
            "(prompts, completions) -> rewards"
        )
    return cast(RewardFn, obj)


__all__ = [
    "BUILTIN_REWARDS",
    "AfinnSentiment",
    "TextBlobSentiment",
    "Length",
    "RewardError",
    "RewardFn",
    "RewardImportError",
    "ValidatedRewards",
    "VaderSentiment",
    "call_reward",
    "check_texts",
    "make_reward",
    "reward_name",
    "validate_rewards",
]
