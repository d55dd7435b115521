"""``tether export``: a run's trained model as a plain Hugging Face model directory.

The result (safetensors weights, ``config.json``, ``generation_config.json``, the tokenizer)
loads with ``transformers.AutoModelForCausalLM.from_pretrained(dir)`` alone: no peft, no tether.
A LoRA run's adapter is merged into its base (``peft``'s ``merge_and_unload``: W + (α/r)·B·A, in
fp32, cast to ``dtype`` afterwards); a full fine-tune is saved as it is. The directory is written
into a temporary sibling and renamed into place, so it is never half-written, and a previous
export there is replaced. ``tether_export.json`` records where it came from (run, checkpoint,
step, base model as configured, tether version).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tether
from tether.errors import RunDirError, describe_os_error
from tether.trained import TrainedModel, is_run_dir, load_trained, resolve_trained

EXPORT_DIR = "export"
"""Default output: ``RUN_DIR/export``."""
PROVENANCE_FILE = "tether_export.json"
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_run` wrote."""

    out: Path
    trained: TrainedModel
    merged_adapter: bool
    dtype: str
    parameters: int


def _check_out(out: Path) -> None:
    """``out`` may be replaced only when it is absent or a previous export."""
    if out.exists() and not (out / PROVENANCE_FILE).is_file():
        what = "a file" if not out.is_dir() else "a directory that is not a tether export"
        raise RunDirError(
            f"--out {out} exists and is {what} (no {PROVENANCE_FILE}): choose another --out, "
            "or remove it"
        )


def export_run(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    checkpoint: str | None = None,
    dtype: str = "float32",
) -> ExportResult:
    """Write ``run_dir``'s model (``final/`` by default) as a plain HF model directory.

    Args:
        run_dir: a tether run directory.
        out: where (default ``run_dir/export``); replaced if it holds a previous export.
        checkpoint: ``final`` (default), ``best``, ``step-N`` or ``latest``.
        dtype: the exported weights' dtype (the merge itself runs in fp32).

    Raises:
        CheckpointError: ``run_dir`` is not a run directory, or has no such checkpoint.
        ModelError: the model cannot be loaded.
        RunDirError: ``out`` cannot be written, or holds something else.
    """
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    root = Path(run_dir)
    if not (root.is_dir() and is_run_dir(root)):
        from tether.errors import CheckpointError

        raise CheckpointError(
            f"{run_dir} is not a tether run directory (no config.yaml): tether export takes "
            "the output_dir of a training run"
        )
    trained = resolve_trained(str(root), checkpoint)
    target = Path(out) if out is not None else root / EXPORT_DIR
    _check_out(target)
    policy = load_trained(trained, dtype="float32")
    merged = policy.is_peft
    model = policy.model.merge_and_unload() if merged else policy.model
    model = model.to(getattr(torch, dtype))
    model.config.use_cache = True
    provenance: dict[str, Any] = {
        "run_dir": str(root.resolve()),
        "checkpoint": trained.checkpoint,
        "step": trained.step,
        "base_model": trained.base_model,
        "peft": (trained.run_config or {}).get("peft"),
        "merged_adapter": merged,
        "dtype": dtype,
        "tether_version": tether.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    except OSError as exc:
        raise RunDirError(describe_os_error(exc, f"cannot write {target}")) from exc
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        model.generation_config.save_pretrained(tmp)
        policy.tokenizer.save_pretrained(tmp)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise RunDirError(describe_os_error(exc, f"cannot write {target}")) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return ExportResult(target, trained, merged, dtype, sum(p.numel() for p in model.parameters()))
