"""Using a trained model: find it (a run directory, one of its checkpoints, a model directory, an
embedded name or a hub id), load it, and pick the reference policy it is compared against.

What ``tether generate``, ``tether eval`` and ``tether export`` share. A run directory
(``config.yaml`` plus ``final/``, ``best/`` or ``checkpoints/``) gives its ``final/`` by default;
``checkpoint="best"`` its ``best/``; ``checkpoint="step-40"`` (or ``"40"``, ``"latest"``) a
training checkpoint, whose weights (the whole model, or a LoRA run's adapter) are loaded onto the
run's configured model. ``RUN/final`` or ``RUN/best`` named directly count as that run's.

The reference of a run is its configured base model (``model`` in ``config.yaml``): for a LoRA
policy that is the same model with the adapter disabled (no second copy of the weights).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tether.errors import CheckpointError, ModelError

RUN_CONFIG = "config.yaml"
FINAL = "final"
BEST = "best"
NAMED_CHECKPOINTS = (FINAL, BEST)
"""Model directories a run leaves besides its training checkpoints."""
_STEP = re.compile(r"^(?:step-)?(\d+)$")


@dataclass(frozen=True)
class TrainedModel:
    """Where a model to use comes from.

    Attributes:
        spec: how the user named it.
        source: what :func:`tether.models.load_policy` loads (a directory, an embedded name or a
            hub id); for a training checkpoint, the run's configured model.
        run_dir: the run directory, when the model is a run's.
        checkpoint: ``"final"``, ``"best"`` or ``"step-000040"`` (None: not a run's).
        step: the optimizer steps behind it, when known.
        checkpoint_dir: a training checkpoint whose ``policy`` weights go onto ``source``.
        run_config: the run's ``config.yaml`` as a mapping (None: not a run's).
    """

    spec: str
    source: str
    run_dir: Path | None = None
    checkpoint: str | None = None
    step: int | None = None
    checkpoint_dir: Path | None = None
    run_config: dict[str, Any] | None = None

    @property
    def base_model(self) -> str | None:
        """The run's configured model (its ``model`` field) as the user named it."""
        if self.run_config is None:
            return None
        model = self.run_config.get("model")
        return model if isinstance(model, str) and model else None

    def describe(self) -> str:
        """One phrase for messages and summaries."""
        if self.run_dir is None:
            return self.spec
        step = f", step {self.step}" if self.step is not None else ""
        return f"{self.run_dir} ({self.checkpoint}{step})"


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a tether run directory: its ``config.yaml`` and no model
    ``config.json`` (a model directory)."""
    return (path / RUN_CONFIG).is_file() and not (path / "config.json").is_file()


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The run's ``config.yaml`` as a mapping.

    Raises:
        CheckpointError: the file cannot be read or is not a mapping.
    """
    path = run_dir / RUN_CONFIG
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"cannot read the run's config {path}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a mapping of config keys")
    return data


def _final_step(run_dir: Path) -> int | None:
    """The step of the run's latest checkpoint (what ``final/`` holds for a finished run)."""
    from tether.runs.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run_dir)
    match = _STEP.match(latest.name) if latest is not None else None
    return int(match.group(1)) if match else None


def _best_step(run_dir: Path) -> int | None:
    import json

    try:
        return int(json.loads((run_dir / BEST / "best.json").read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _available(run_dir: Path) -> str:
    from tether.runs.checkpoint import list_checkpoints

    have = [n for n in NAMED_CHECKPOINTS if (run_dir / n).is_dir()]
    have += [p.name for p in list_checkpoints(run_dir)]
    return ", ".join(have) if have else "nothing yet"


def resolve_trained(spec: str, checkpoint: str | None = None) -> TrainedModel:
    """Where ``spec`` (and ``checkpoint``) point, checked before anything loads.

    Args:
        spec: a run directory, a model directory (full or a LoRA adapter), an embedded model
            name or a hub id.
        checkpoint: for a run: ``"final"`` (default), ``"best"``, ``"step-N"`` / ``"N"`` or
            ``"latest"`` (its newest training checkpoint).

    Raises:
        CheckpointError: the run has no such checkpoint (the message lists what it has), or
            ``checkpoint`` was given for something that is not a run directory.
    """
    from tether.runs.checkpoint import latest_checkpoint, list_checkpoints

    path = Path(spec).expanduser()
    if path.name in NAMED_CHECKPOINTS and path.is_dir() and is_run_dir(path.parent):
        if checkpoint not in (None, path.name):
            raise CheckpointError(
                f"{spec} is the run's {path.name}/; --checkpoint {checkpoint} names another: "
                f"give the run directory {path.parent} instead"
            )
        path, checkpoint = path.parent, path.name
    if not (path.is_dir() and is_run_dir(path)):
        if checkpoint is not None:
            raise CheckpointError(
                f"--checkpoint {checkpoint} needs a run directory (with {RUN_CONFIG}); "
                f"{spec} is not one"
            )
        return TrainedModel(spec=spec, source=spec)
    config = read_run_config(path)
    name = checkpoint or FINAL
    if name in NAMED_CHECKPOINTS:
        target = path / name
        if not target.is_dir():
            why = (
                "the run has not finished (interrupted, or still training)"
                if name == FINAL
                else "the run kept no best/ (it needs early_stop_on)"
            )
            raise CheckpointError(
                f"{target} not found: {why}; the run has {_available(path)}: pass "
                "--checkpoint step-N (or latest, best)"
            )
        step = _final_step(path) if name == FINAL else _best_step(path)
        return TrainedModel(spec, str(target), path, name, step, None, config)
    if name == "latest":
        ckpt = latest_checkpoint(path)
    else:
        match = _STEP.match(name)
        if match is None:
            raise CheckpointError(
                f"--checkpoint {name!r}: expected final, best, latest or step-N (e.g. step-40)"
            )
        wanted = int(match.group(1))
        ckpt = next((c for c in list_checkpoints(path) if int(c.name[5:]) == wanted), None)
    if ckpt is None:
        raise CheckpointError(
            f"{path} has no checkpoint {name!r}; it has {_available(path)} "
            "(save_steps sets how often checkpoints are kept, keep_last how many)"
        )
    model = config.get("model")
    if not isinstance(model, str) or not model:
        raise CheckpointError(f"{path / RUN_CONFIG} names no model to load {ckpt.name} onto")
    return TrainedModel(spec, model, path, ckpt.name, int(ckpt.name[5:]), ckpt, config)


def load_trained(
    trained: TrainedModel,
    *,
    dtype: str = "float32",
    device: str | None = None,
    merge_adapter: bool = False,
) -> Any:
    """Load ``trained`` as a :class:`tether.models.Policy` (eval mode, no grads).

    A training checkpoint's ``policy`` weights are loaded onto the run's configured model (with
    its LoRA settings for a LoRA run). ``merge_adapter``: merge a LoRA adapter into its base
    (a plain model) instead of returning the ``PeftModel``.

    Raises:
        ModelError: the model cannot be loaded.
        CheckpointError: the checkpoint is unreadable or does not fit the run's model.
    """
    from tether.models import load_policy

    if trained.checkpoint_dir is None:
        policy = load_policy(
            trained.source, dtype=dtype, device=device, merge_adapter=merge_adapter
        )
    else:
        peft = (trained.run_config or {}).get("peft")
        policy = load_policy(trained.source, dtype=dtype, peft=peft)
        _apply_policy_weights(policy.model, trained.checkpoint_dir)
        if merge_adapter and policy.is_peft:
            policy.model = policy.model.merge_and_unload()
        if device is not None:
            policy.model.to(device)
    policy.model.eval().requires_grad_(False)
    return policy


def _apply_policy_weights(model: Any, checkpoint_dir: Path) -> None:
    """Load the ``policy`` entry of a training checkpoint into ``model`` (all of it, or the
    trainable part a LoRA run saved)."""
    from tether.runs.checkpoint import read_checkpoint

    data = read_checkpoint(checkpoint_dir)
    if "policy" not in data["models"]:
        raise CheckpointError(
            f"{checkpoint_dir} holds no policy (it has {sorted(data['models'])}): not an LM run"
        )
    state, partial = data["models"]["policy"]
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(
            f"{checkpoint_dir}: its policy weights do not fit the run's model: {e}"
        ) from None
    missing = [] if partial else list(result.missing_keys)
    if result.unexpected_keys or missing:
        keys = (result.unexpected_keys or missing)[:5]
        raise CheckpointError(
            f"{checkpoint_dir}: its policy weights do not fit the run's model "
            f"({'unexpected' if result.unexpected_keys else 'missing'} keys {keys}); was the "
            "model or peft in config.yaml changed after training?"
        )


# ------------------------------------------------------------------------------------------------
# The reference policy
# ------------------------------------------------------------------------------------------------


def model_reference(model: Any) -> Any:
    """A :class:`tether.reference.ReferencePolicy` that is ``model`` itself (frozen)."""
    from tether.reference import ReferencePolicy

    class _ModelReference(ReferencePolicy):
        kind = "model"

        def __init__(self, m: Any) -> None:
            self.model = m.eval().requires_grad_(False)

    return _ModelReference(model)


def check_same_vocabulary(policy: Any, reference: Any, name: str) -> None:
    """The exact KL compares two distributions over one vocabulary: same size and same tokens.

    Raises:
        ModelError: naming the reference and both sizes.
    """
    from tether.models import unwrap_model

    sizes = [
        unwrap_model(p.model).get_output_embeddings().weight.shape[0] for p in (policy, reference)
    ]
    if sizes[0] != sizes[1] or policy.tokenizer.get_vocab() != reference.tokenizer.get_vocab():
        raise ModelError(
            f"reference {name!r} has another vocabulary than the model ({sizes[1]} vs "
            f"{sizes[0]} logits, or different tokens): the KL needs the same tokenizer; give a "
            "reference of the same model family, or --reference none"
        )


@dataclass
class Reference:
    """The reference policy to measure the KL against, and how to name it."""

    policy: Any
    """A :class:`tether.reference.ReferencePolicy`."""
    name: str


def resolve_reference(
    trained: TrainedModel, policy: Any, spec: str | None, *, device: str | None = None
) -> Reference | None:
    """The reference of ``policy``: ``spec`` when given (``"none"``: no reference), else the
    run's or the adapter's base model (the LoRA adapter disabled), else None.

    Raises:
        ModelError: the reference cannot be loaded or has another vocabulary.
    """
    from tether.reference import AdapterReference

    if spec is not None and spec.lower() == "none":
        return None
    if spec is None:
        if policy.is_peft:
            base = trained.base_model or _adapter_base(policy)
            return Reference(AdapterReference(policy.model), f"{base} (the adapter disabled)")
        if trained.base_model is None:
            return None
        spec = trained.base_model
    ref = load_trained(resolve_trained(spec), device=device, merge_adapter=True)
    check_same_vocabulary(policy, ref, spec)
    return Reference(model_reference(ref.model), spec)


def _adapter_base(policy: Any) -> str:
    configs = list(getattr(policy.model, "peft_config", {}).values())
    return str(configs[0].base_model_name_or_path) if configs else "the base model"
