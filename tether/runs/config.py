"""Config dataclasses, and YAML recipes + ``key=value`` overrides mapped onto them.

Every trainer declares one ``@dataclass`` config that extends :class:`RunConfig`. Each field has a
default and a one-line help text, declared with :func:`option`::

    @dataclass
    class OptimConfig:
        lr: float = option(1e-5, help="AdamW learning rate.")
        weight_decay: float = option(0.0, help="AdamW decoupled weight decay.")

    @dataclass
    class DPOConfig(RunConfig):
        beta: float = option(0.1, help="DPO inverse temperature β.")
        loss: Literal["sigmoid", "ipo"] = option("sigmoid", help="DPO loss variant.")
        optim: OptimConfig = option(OptimConfig(), help="Optimizer settings.")

A YAML file is a (possibly partial) serialisation of the config: nested dataclasses are nested
mappings, and a key left out keeps its default. :func:`load_config` reads the file, applies
``key=value`` overrides (dotted keys reach into nested configs; values are parsed as YAML, so
``lr=1e-5``, ``peft=null`` and ``tags=[a,b]`` work), checks every value against the field's
annotation and builds the dataclass; ``__post_init__`` may add cross-field checks by raising a
``ValueError``. Every problem is a :class:`ConfigError` naming the key, where it came from (the file
or the override), and what was expected.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from tether.errors import TetherError

T = TypeVar("T")

HELP_KEY = "help"
"""The ``dataclasses.field`` metadata key that holds a field's one-line help text."""


class ConfigError(TetherError, ValueError):
    """A config file, override or config class is invalid; the message says what, where, and
    what was expected."""


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A config field with a default and a one-line help text (``dataclasses.field`` underneath).

    A mutable or unhashable ``default`` (a list, a dict, a nested config instance) is copied
    fresh for every config object, so ``option([], help=...)`` and
    ``option(OptimConfig(lr=3e-4), help=...)`` are safe.
    """
    if not help or not help.strip():
        raise ConfigError("option() needs a non-empty help text")
    metadata = {HELP_KEY: help.strip()}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    if default is dataclasses.MISSING:
        raise ConfigError(f"option(help={help!r}) needs a default or a default_factory")
    if default.__hash__ is None:  # list, dict, set, a (non-frozen) dataclass instance
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


TRACKERS: dict[str, str] = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "trackio": "trackio",
}
"""``report_to`` name → the module it needs (also its pip package; MLflow's lighter
``mlflow-skinny`` provides the ``mlflow`` module too)."""
NO_TRACKERS = ("none", "")
"""``report_to`` values that mean metrics.jsonl only."""


def normalize_report_to(value: str | Sequence[str] | None) -> list[str]:
    """``report_to`` as a list of distinct tracker names, in order.

    Accepts a list, one name as a string, or ``none`` / ``null`` / ``[]`` for none. Raises a
    ``ValueError`` naming an unknown tracker and the choices.
    """
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"report_to: expected tracker names, got {item!r}")
        name = item.strip().lower()
        if name in NO_TRACKERS:
            if len(items) > 1:
                raise ValueError(f"report_to: {item!r} cannot be combined with other trackers")
            continue
        if name not in TRACKERS:
            choices = ", ".join(TRACKERS)
            raise ValueError(
                f"report_to: unknown tracker {item!r}; choose from {choices} (or none)"
            )
        if name not in names:
            names.append(name)
    return names


@dataclasses.dataclass
class RunConfig:
    """Fields every trainer shares. Algorithm configs extend it; a subclass that defines
    ``__post_init__`` must call ``super().__post_init__()``."""

    output_dir: str = option(
        "runs/default", help="Run directory: config.yaml, metrics.jsonl, tb/, checkpoints/."
    )
    seed: int = option(0, help="Seed for python, numpy and torch RNGs (and data shuffling).")
    resume: bool = option(
        False, help="Continue from the latest checkpoint in output_dir (fresh start if none)."
    )
    max_steps: int = option(1000, help="Number of optimizer steps to train for.")
    logging_steps: int = option(10, help="Log metrics every N optimizer steps.")
    save_steps: int = option(
        500, help="Save a checkpoint every N optimizer steps (0: at the end only)."
    )
    keep_last: int | None = option(2, help="Checkpoints kept on disk, newest first (null: all).")
    save_optimizer: Literal["last", "all", "none"] = option(
        "last",
        help="Optimizer state (AdamW: 2× the weights) in checkpoints. last: only the newest "
        "checkpoint keeps it, and an end-of-run checkpoint at a step save_steps does not hit "
        "has none; all: every checkpoint; none: never (a resume then restarts the optimizer).",
    )
    overwrite: bool = option(
        False,
        help="Start over in an output_dir that holds a run: its checkpoints, metrics and final/ "
        "are deleted first (without it, such a directory is an error unless resume=true).",
    )
    resume_override: bool = option(
        False,
        help="Resume even though the config differs from the saved one in fields that change "
        "the training; the new values apply from the resumed step (LR schedule recomputed).",
    )
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = option(
        "auto",
        help="Autocast for the trained model (auto: bf16 where the hardware has bf16 kernels, "
        "i.e. an Ampere+ GPU or a CPU with AVX512-BF16/AMX; else no). Log-softmax, KL and "
        "losses stay fp32.",
    )
    report_to: list[str] | str | None = option(
        ["tensorboard"],
        help="Experiment trackers that get the metrics besides metrics.jsonl: a list of "
        "tensorboard, wandb, mlflow, trackio ([] or none: metrics.jsonl only); each writes "
        "inside output_dir (W&B offline unless WANDB_MODE is set).",
    )
    tracker_project: str = option(
        "tether", help="Project (W&B, trackio) or experiment (MLflow) the trackers file it under."
    )
    run_name: str | None = option(
        None, help="The run's name in the trackers (null: output_dir's last component)."
    )

    def __post_init__(self) -> None:
        self.report_to = normalize_report_to(self.report_to)
        if not self.tracker_project:
            raise ValueError("tracker_project must not be empty")
        for name in ("max_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.save_steps < 0:
            raise ValueError(f"save_steps must be ≥ 0, got {self.save_steps}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"keep_last must be ≥ 1 or null, got {self.keep_last}")
        if self.save_optimizer not in ("last", "all", "none"):
            raise ValueError(
                f"save_optimizer must be last, all or none, got {self.save_optimizer!r}"
            )
        if not self.output_dir:
            raise ValueError("output_dir must not be empty")
        if self.overwrite and self.resume:
            raise ValueError(
                "resume=true continues the run in output_dir and overwrite=true deletes it: "
                "set one of them"
            )
        if self.resume_override and not self.resume:
            raise ValueError("resume_override=true applies to a resumed run: set resume=true too")


# ------------------------------------------------------------------------------------------------
# Class checks and introspection
# ------------------------------------------------------------------------------------------------


def _config_fields(cls: type) -> list[dataclasses.Field[Any]]:
    """The fields a config file can set (``init=False`` fields are derived, not configured)."""
    return [f for f in dataclasses.fields(cls) if f.init]


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError as exc:
        raise ConfigError(
            f"cannot resolve the type annotations of config {cls.__qualname__}: {exc}; "
            "define config dataclasses (and the types they use) at module level"
        ) from None


def check_config_class(cls: type) -> None:
    """Raise a ``ConfigError`` unless ``cls`` (and every nested config) is a dataclass whose
    every field has a default and a help text (see :func:`option`)."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ConfigError(f"a config must be a dataclass type, got {cls!r}")
    hints = _type_hints(cls)
    for f in _config_fields(cls):
        where = f"{cls.__qualname__}.{f.name}"
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config field {where} has no default")
        if not f.metadata.get(HELP_KEY):
            raise ConfigError(
                f"config field {where} has no help text; declare it with option(..., help=...)"
            )
        for nested in _nested_config_types(hints[f.name]):
            check_config_class(nested)


def _config_arm(tp: Any) -> type | None:
    """The config dataclass an annotation holds directly (``Nested`` or ``Nested | None``)."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    if _is_union(typing.get_origin(tp)):
        arms = [a for a in typing.get_args(tp) if _config_arm(a) is not None]
        return arms[0] if arms else None
    return None


def _nested_config_types(tp: Any) -> list[type]:
    """Dataclass types reachable from an annotation (through Optional/Union, list, dict)."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return [tp]
    return [n for arg in typing.get_args(tp) for n in _nested_config_types(arg)]


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "Literal[" + ", ".join(repr(a) for a in args) + "]"
    if _is_union(origin):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
    return str(tp).replace("typing.", "")


def describe_config(cls: type) -> str:
    """Every field of a config class, one per line with its type and default, then its help;
    nested configs are listed with dotted names (``tether train ALGO --help-config``)."""
    check_config_class(cls)
    lines = [f"{cls.__qualname__} fields (set in the YAML file or as key=value overrides):"]

    def walk(c: type, prefix: str, instance: Any) -> None:
        hints = _type_hints(c)
        for f in _config_fields(c):
            tp = hints[f.name]
            default = getattr(instance, f.name) if instance is not None else _default_of(f)
            nested = _config_arm(tp)
            if nested is not None and default is not None:
                lines.append(f"  {prefix}{f.name}: {_type_name(tp)}")
            else:
                shown = yaml.safe_dump(_to_plain(default), default_flow_style=True, width=1000)
                shown = shown.strip().removesuffix("...").strip()
                lines.append(f"  {prefix}{f.name}: {_type_name(tp)} = {shown}")
            lines.append(f"      {f.metadata[HELP_KEY]}")
            if nested is not None:
                walk(nested, f"{prefix}{f.name}.", default)

    walk(cls, "", None)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Type checking and coercion
# ------------------------------------------------------------------------------------------------


def _is_union(origin: Any) -> bool:
    return origin is typing.Union or origin is types.UnionType


def _accepts_str(tp: Any) -> bool:
    """Whether a string is a valid value for ``tp`` (used for quoting hints and raw overrides)."""
    if tp is str or tp is Any or tp is Path:
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return any(isinstance(a, str) for a in args)
    if _is_union(origin):
        return any(_accepts_str(a) for a in args)
    return False


def _describe_value(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


class _Where:
    """Where a value came from, for error messages: a dotted key and a source description."""

    def __init__(self, key: str, source: str) -> None:
        self.key, self.source = key, source

    def child(self, name: str) -> _Where:
        return _Where(f"{self.key}.{name}" if self.key else name, self.source)

    def item(self, index: Any) -> _Where:
        return _Where(f"{self.key}[{index!r}]", self.source)

    def invalid(self, expected: str, value: Any, tp: Any, extra: str = "") -> ConfigError:
        hint = extra
        if isinstance(value, (bool, int, float)) and _accepts_str(tp):
            hint += " (YAML reads unquoted yes/no/on/off/true/false and numbers as such; quote it)"
        return ConfigError(
            f"invalid value for {self.key!r} in {self.source}: expected {expected}, "
            f"got {_describe_value(value)}{hint}"
        )


def _coerce(value: Any, tp: Any, where: _Where, base: Any = None) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (``"1e-5"`` → float, a
    mapping → nested config, a list → tuple). ``base`` is the default a partial nested mapping
    overlays. Raises a ``ConfigError`` naming the key."""
    if tp is Any or tp is object:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        if value is None:
            return None
        raise where.invalid("null", value, tp)
    if _is_union(origin):
        return _coerce_union(value, tp, args, where, base)
    if origin is Literal:
        for allowed in args:
            if value == allowed and type(value) is type(allowed):
                return allowed
        choices = ", ".join(repr(a) for a in args)
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        suggestion = f"; did you mean {close[0]!r}?" if close else ""
        raise where.invalid(f"one of {choices}", value, tp, suggestion)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise where.invalid("a bool (true/false)", value, tp)
    if tp is int:
        return _coerce_int(value, where, tp)
    if tp is float:
        return _coerce_float(value, where, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        raise where.invalid("a string", value, tp)
    if tp is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise where.invalid("a path string", value, tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return _build(tp, value, where, base)
        raise where.invalid(f"a mapping of {tp.__qualname__} fields", value, tp)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        return _coerce_sequence(value, tp, origin or tp, args, where)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise where.invalid(f"a mapping ({_type_name(tp)})", value, tp)
        key_tp, value_tp = args if args else (Any, Any)
        return {
            _coerce(k, key_tp, where.item(k)): _coerce(v, value_tp, where.item(k))
            for k, v in value.items()
        }
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise where.invalid(tp.__name__, value, tp)
    raise ConfigError(f"config field {where.key!r} has an unsupported annotation {tp!r}")


def _coerce_union(value: Any, tp: Any, args: tuple[Any, ...], where: _Where, base: Any) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise where.invalid(_type_name(tp), value, tp)
    arms = [a for a in args if a is not type(None)]
    for arm in arms:  # an exact match wins over a conversion (int | float keeps an int)
        if isinstance(arm, type) and type(value) is arm:
            return value
    if len(arms) == 1:  # Optional[X]: X's own error says more than "expected X | None"
        return _coerce(value, arms[0], where, base)
    for arm in arms:
        try:
            return _coerce(value, arm, where, base)
        except ConfigError:
            continue
    raise where.invalid(_type_name(tp), value, tp)


def _coerce_int(value: Any, where: _Where, tp: Any) -> int:
    if isinstance(value, bool):
        raise where.invalid("an int", value, tp)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.replace("_", ""))
        except ValueError:
            try:
                value = float(value)  # "1e3": YAML 1.1 reads it as a string
            except ValueError:
                raise where.invalid("an int", value, tp) from None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise where.invalid("an int", value, tp)


def _coerce_float(value: Any, where: _Where, tp: Any) -> float:
    if isinstance(value, bool):
        raise where.invalid("a float", value, tp)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)  # "1e-5": YAML 1.1 reads it as a string
        except ValueError:
            pass
    raise where.invalid("a float", value, tp)


def _coerce_sequence(
    value: Any, tp: Any, origin: Any, args: tuple[Any, ...], where: _Where
) -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise where.invalid(f"a list ({_type_name(tp)})", value, tp)
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise where.invalid(f"a list of {len(args)} items ({_type_name(tp)})", value, tp)
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(_coerce(v, a, where.item(i)) for i, (v, a) in pairs)
    item_tp = args[0] if args else Any
    items = [_coerce(v, item_tp, where.item(i)) for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _unknown_key(key: str, valid: Sequence[str], prefix: str, source: str) -> ConfigError:
    full = prefix + key
    close = difflib.get_close_matches(key, valid, n=3)
    if close:
        options = " or ".join(repr(prefix + c) for c in close)
        hint = f"did you mean {options}?"
    else:
        hint = "valid keys: " + ", ".join(prefix + v for v in valid)
    return ConfigError(f"unknown key {full!r} in {source}; {hint}")


def _build(cls: type[T], data: Mapping[Any, Any], where: _Where, base: Any = None) -> T:
    """Build config ``cls`` from a (partial) mapping; keys left out come from ``base`` (the
    default instance this mapping overlays) or else from the field defaults."""
    fields = {f.name: f for f in _config_fields(cls)}
    prefix = f"{where.key}." if where.key else ""
    for key in data:
        if key not in fields:
            raise _unknown_key(str(key), list(fields), prefix, where.source)
    hints = _type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        nested_base = getattr(base, name) if base is not None else _default_of(f)
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], where.child(name), nested_base)
        elif base is not None:
            kwargs[name] = copy.deepcopy(nested_base)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:
        at = f" at {where.key!r}" if where.key else ""
        raise ConfigError(f"invalid {cls.__qualname__}{at} in {where.source}: {exc}") from exc


# ------------------------------------------------------------------------------------------------
# Overrides
# ------------------------------------------------------------------------------------------------


def _field_type_at(cls: type, path: list[str], override: str) -> Any:
    """The annotation of the field a dotted override key names (raises on an unknown key).

    Dotted keys reach into nested configs only; a dict-valued field is set whole
    (``weights={a: 1, b: 2}``)."""
    source = f"override {override!r}"
    tp: Any = cls
    for i, segment in enumerate(path):
        config = _config_arm(tp)
        if config is None:
            parent = ".".join(path[:i])
            raise ConfigError(
                f"cannot set {'.'.join(path)!r} in {source}: {parent!r} is a "
                f"{_type_name(tp)}, not a nested config"
            )
        fields = [f.name for f in _config_fields(config)]
        if segment not in fields:
            raise _unknown_key(segment, fields, "".join(p + "." for p in path[:i]), source)
        tp = _type_hints(config)[segment]
    return tp


def _apply_override(cls: type, data: dict[str, Any], override: str) -> None:
    """Validate one ``key=value`` override and write its value into the nested ``data``."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"invalid override {override!r}: expected key=value (e.g. lr=1e-5)")
    path = key.split(".")
    if any(not p for p in path):
        raise ConfigError(f"invalid override {override!r}: empty segment in key {key!r}")
    tp = _field_type_at(cls, path, override)
    where = _Where(key, f"override {override!r}")
    try:
        parsed = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse override {override!r} as YAML: {exc}") from None
    try:
        value = _coerce(parsed, tp, where)
    except ConfigError:
        # `name=no` or `revision=123`: YAML re-typed text meant for a string field.
        if isinstance(parsed, str) or not _accepts_str(tp):
            raise
        value = _coerce(raw.strip(), tp, where)
    node = data
    for segment in path[:-1]:
        child = node.get(segment)
        if dataclasses.is_dataclass(child) and not isinstance(child, type):
            child = _to_plain(child)
        if not isinstance(child, dict):
            child = {}
        node[segment] = child
        node = child
    node[path[-1]] = value


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------


def load_config(
    cls: type[T], path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()
) -> T:
    """Build config ``cls`` from a YAML file (optional) and ``key=value`` overrides.

    Args:
        cls: the config dataclass (every field with a default and a help text).
        path: a YAML file holding a (possibly partial) mapping of the config's fields.
        overrides: ``key=value`` strings applied after the file, in order; dotted keys reach
            nested configs (``optim.lr=1e-5``); values are parsed as YAML.

    Raises:
        ConfigError: a missing or unparsable file, an unknown key (with close matches), a value
            of the wrong type, or a ``ValueError`` from the dataclass's ``__post_init__``, each
            naming the key and the file or override it came from.
    """
    check_config_class(cls)
    data = {}
    if path is not None:
        data = resolve_recipe_paths(_read_yaml_mapping(Path(path)), Path(path).parent)
    for override in overrides:
        _apply_override(cls, data, override)
    sources = [str(path)] if path is not None else []
    if overrides:
        sources.append("overrides " + " ".join(overrides))
    return _build(cls, data, _Where("", " with ".join(sources) or "the defaults"))


NOT_RECIPE_RELATIVE = frozenset({"output_dir"})
"""Keys whose relative paths stay relative to the working directory (where runs are written)."""


def _shown_path(path: Path) -> str:
    """``path`` as the user would type it: relative to the working directory when it lies under
    it (so a recipe run from the repository root records ``data/x.jsonl``, as before), else
    absolute."""
    absolute = os.path.normpath(os.path.abspath(path))
    relative = os.path.relpath(absolute, os.getcwd())
    return absolute if relative == ".." or relative.startswith(".." + os.sep) else relative


def _recipe_relative(value: str, base: Path) -> str:
    """``value`` resolved against the recipe's directory ``base`` when it names something
    there (a file, a directory, or ``PATH:SPLIT`` whose PATH exists); otherwise unchanged (a
    model or reward name, a hub id, a path relative to the working directory)."""
    if not value or os.path.isabs(value) or "://" in value or value.startswith("~"):
        return value
    if (base / value).exists():
        return _shown_path(base / value)
    for at in (i for i, ch in enumerate(value) if ch == ":"):  # PATH:SPLIT, PATH:CONFIG:SPLIT
        if at and (base / value[:at]).exists():
            return f"{_shown_path(base / value[:at])}{value[at:]}"
    return value


def resolve_recipe_paths(data: Any, base: Path, key: str = "") -> Any:
    """Resolve the relative paths in a recipe's values against the recipe file's directory
    ``base``, so ``tether train grpo -c /elsewhere/recipes/grpo.yaml`` finds the data the recipe
    names (``prompts: ../data/prompts.jsonl``) from any working directory.

    A string value (or a string in a list) is resolved only when the path exists relative to
    the recipe (names such as ``vader`` or ``smollm2-135m-instruct`` never do); ``output_dir`` is
    never resolved: runs are written relative to the working directory. Overrides on the command
    line are not recipe values: they stay relative to the working directory."""
    if base.resolve() == Path.cwd().resolve() or key in NOT_RECIPE_RELATIVE:
        return data
    if isinstance(data, str):
        return _recipe_relative(data, base)
    if isinstance(data, Mapping):
        return {k: resolve_recipe_paths(v, base, str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [resolve_recipe_paths(v, base, key) for v in data]
    return data


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        with path.open(encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse config file {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of config keys at the top level, got {type(data).__name__}"
        )
    return data


def _to_plain(value: Any) -> Any:
    """A config value as YAML-safe plain data (dataclass → dict, tuple → list, Path → str)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in _config_fields(type(value))}
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a plain nested dict (what :func:`save_config` writes)."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"expected a config dataclass instance, got {type(cfg).__name__}")
    return _to_plain(cfg)


def dump_config(cfg: Any) -> str:
    """The config as YAML text, with a comment naming its class."""
    body = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    return f"# {type(cfg).__module__}.{type(cfg).__qualname__}\n{body}"


def save_config(cfg: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``cfg`` as YAML that :func:`load_config` reads back to an equal object.

    The file is written to a temporary name and renamed into place, so it is never half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dump_config(cfg), encoding="utf-8")
    os.replace(tmp, path)
    return path
