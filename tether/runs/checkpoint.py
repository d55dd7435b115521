"""Atomic, exactly-resumable checkpoints: ``<run>/checkpoints/step-000123/``.

A checkpoint holds everything a resumed run needs to continue bit for bit:

* ``<name>.safetensors`` per model: its ``state_dict()`` (or the state dict the caller passed,
  e.g. only a PEFT adapter's trainable entries), shared/tied tensors stored once;
* ``optimizer.pt`` / ``scheduler.pt``: their ``state_dict()`` via ``torch.save``;
* ``rng-<process>.pt``: the python ``random``, numpy (global), torch CPU and CUDA RNG states of
  every process;
* ``states.json`` (+ ``states.pt`` for tensors inside): small named states such as a KL
  controller's, the reference policy's or the data cursor's ``state_dict()``;
* ``checkpoint.json``: the manifest (step, what is present).

Writing is atomic: all files go into ``checkpoints/.tmp-step-000123/``, are fsynced, and the
directory is renamed into place with ``os.replace``; only then is ``checkpoints/latest`` (a text
file naming the newest checkpoint) replaced and old checkpoints beyond ``keep_last`` removed. A
crash at any point leaves the previous checkpoints intact and no partial ``step-*`` directory.

Under ``accelerate`` every process must call :func:`save_checkpoint` and :func:`load_checkpoint`
(model state dicts are gathered with ``accelerator.get_state_dict``, which FSDP needs on every
process); only the main process writes, except each process's RNG file. ``run_dir`` must be on a
filesystem every process sees. Optimizer state is saved from the main process as is, which is
right for DDP and single-process training.

**Sharded models** (``sharding=fsdp2``: parameters that are ``DTensor`` shards): their weights and
the optimizer state go into ``model/`` and ``optimizer/``, each a ``torch.distributed.checkpoint``
(DCP) written collectively by every process (its own shards, into the same temporary directory
before the rename). DCP reshards on load, so a checkpoint saved on N processes resumes on M.
Frozen parameters (a LoRA base) are not saved: they come from the model as loaded.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import tether
from tether.errors import CheckpointError, NumericalError, TetherWarning, describe_os_error

if TYPE_CHECKING:
    from accelerate import Accelerator

CHECKPOINTS_DIR = "checkpoints"
"""Sub-directory of a run directory that holds its checkpoints."""
LATEST_FILE = "latest"
"""Text file in ``checkpoints/`` naming the newest complete checkpoint (for people and tools)."""
MANIFEST_FILE = "checkpoint.json"
FORMAT_VERSION = 1

_STEP_DIR = re.compile(r"^step-(\d+)$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_ALIASES_KEY = "tether_aliases"
_TENSOR_REF = "__tensor__"
_STATES_JSON = "states.json"
_STATES_TENSORS = "states.pt"
_OPTIMIZER_FILE = "optimizer.pt"
_SHARDED_MODEL_DIR = "model"
"""DCP directory of a checkpoint's sharded models (all of them, keyed by model name)."""
_SHARDED_OPTIMIZER_DIR = "optimizer"
"""DCP directory of the optimizer state of a checkpoint's sharded models."""
_SCHEDULER_FILE = "scheduler.pt"

StateDict = Mapping[str, torch.Tensor]


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint at ``step``: ``step-000123``."""
    return f"step-{step:06d}"


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The ``state_dict()`` entries of ``module``'s trainable parameters (``requires_grad``).

    Pass it instead of the module to :func:`save_checkpoint` to store only what training changes,
    e.g. a PEFT adapter without its frozen base model; loading then restores those entries and
    leaves the rest of the module as constructed.
    """
    trainable = {n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {k: v for k, v in module.state_dict().items() if k in trainable}


def check_finite_weights(
    state: StateDict, model: str, what: str, run_dir: str | os.PathLike[str]
) -> None:
    """Raise :class:`NumericalError` if a floating-point entry of ``state`` holds NaN or ±inf,
    naming ``model``, the first bad entry, ``what`` was being written and the run's last
    checkpoint (which is kept)."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if not bool(torch.isfinite(value).all()):
                last = latest_checkpoint(run_dir)
                keep = f"the last good checkpoint is {last}" if last else "no checkpoint was kept"
                raise NumericalError(
                    f"model {model!r} has non-finite weights ({key!r}); not writing {what} "
                    f"({keep}). Lower learning_rate, keep max_grad_norm on, or resume from the "
                    "checkpoint"
                )


# ------------------------------------------------------------------------------------------------
# Process helpers
# ------------------------------------------------------------------------------------------------


def _is_main(accelerator: Accelerator | None) -> bool:
    return accelerator is None or accelerator.is_main_process


def _rank(accelerator: Accelerator | None) -> int:
    return 0 if accelerator is None else accelerator.process_index


def _barrier(accelerator: Accelerator | None) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------------------
# Durable file writes
# ------------------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (new files, renames) durable; a no-op where unsupported."""
    if os.name != "posix":
        return
    _fsync_file(path)


def _torch_save(obj: Any, path: Path) -> None:
    with path.open("wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _write_text(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


# ------------------------------------------------------------------------------------------------
# Model weights (safetensors, shared tensors stored once)
# ------------------------------------------------------------------------------------------------


def _save_weights(state: StateDict, path: Path, model: str) -> None:
    """Write a state dict as safetensors. Entries that are the same view of the same storage
    (tied weights) are stored once and recorded as aliases in the file's metadata; other
    overlapping or partial views are stored as contiguous copies (safetensors refuses shared
    storage)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"model {model!r}: state entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        t = value.detach()
        view = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride())
        if t.numel() > 0 and (view, t.dtype) in seen:
            aliases[key] = seen[(view, t.dtype)]
            continue
        seen[(view, t.dtype)] = key
        tensors[key] = t
    storages = Counter(t.untyped_storage().data_ptr() for t in tensors.values())
    for key, t in tensors.items():
        whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if storages[t.untyped_storage().data_ptr()] > 1 or not whole or not t.is_contiguous():
            tensors[key] = t.clone(memory_format=torch.contiguous_format)
    # "format": "pt" as transformers writes it, so a model directory may hard-link this file
    # in place of its own when the tensors are the same (see link_identical_weights).
    save_file(tensors, str(path), metadata={_ALIASES_KEY: json.dumps(aliases), "format": "pt"})
    _fsync_file(path)


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    state = load_file(str(path), device="cpu")
    with safe_open(str(path), framework="pt") as fh:
        aliases = json.loads((fh.metadata() or {}).get(_ALIASES_KEY, "{}"))
    for alias, target in aliases.items():
        state[alias] = state[target]
    return state


def _apply_weights(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    partial: bool,
    path: Path,
    name: str,
    accelerator: Accelerator | None,
) -> None:
    target = accelerator.unwrap_model(module) if accelerator is not None else module
    try:
        result = target.load_state_dict(state, strict=not partial)
    except RuntimeError as exc:
        raise CheckpointError(f"cannot load model {name!r} from {path}: {exc}") from None
    if result.unexpected_keys:
        raise CheckpointError(
            f"cannot load model {name!r} from {path}: keys not in the module: "
            f"{result.unexpected_keys[:10]} (save partial states with keys from "
            "module.state_dict(), e.g. trainable_state_dict(module))"
        )


# ------------------------------------------------------------------------------------------------
# RNG states
# ------------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: Mapping[str, Any], path: Path) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np.asarray(np_state["keys"], dtype=np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    elif cuda or torch.cuda.is_available():
        warnings.warn(
            f"{path}: saved CUDA RNG states for {len(cuda)} device(s), this process sees "
            f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}; "
            "CUDA RNG not restored, so the resumed run will not match exactly",
            stacklevel=3,
        )


# ------------------------------------------------------------------------------------------------
# Named states: JSON, with tensors stored alongside
# ------------------------------------------------------------------------------------------------


def _split_tensors(obj: Any, where: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON-able data, each tensor replaced by a reference into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        ref = str(len(tensors))
        tensors[ref] = obj.detach().cpu()
        return {_TENSOR_REF: ref}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, f"{where}[{i}]", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; use str keys")
            if key == _TENSOR_REF:
                raise TypeError(f"{where}: the key {_TENSOR_REF!r} is reserved")
            out[key] = _split_tensors(value, f"{where}[{key!r}]", tensors)
        return out
    raise TypeError(
        f"{where} is a {type(obj).__name__}; states may hold None, bool, int, float, str, "
        "lists, str-keyed dicts and tensors (convert numpy scalars with int()/float())"
    )


def _join_tensors(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR_REF}:
            return tensors[obj[_TENSOR_REF]]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    return obj


# ------------------------------------------------------------------------------------------------
# Listing
# ------------------------------------------------------------------------------------------------


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The run's complete checkpoints, oldest first (half-written ones are never listed)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / MANIFEST_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The run's newest complete checkpoint directory, or ``None`` if it has none.

    This is the highest-step ``step-*`` directory: each one is complete by construction, so a
    crash between installing a checkpoint and updating ``latest`` loses nothing.
    """
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


# ------------------------------------------------------------------------------------------------
# Save
# ------------------------------------------------------------------------------------------------


def _sharded(models: Mapping[str, Any]) -> dict[str, nn.Module]:
    from tether.models.sharding import is_sharded

    return {n: m for n, m in models.items() if isinstance(m, nn.Module) and is_sharded(m)}


def _dcp_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True)


def _dcp_states(
    models: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """This process's shards of the models' (trainable) state and of the optimizer's, keyed by
    model name, as DCP saves and loads them."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    container = nn.ModuleDict(dict(models))
    opts = _dcp_options()
    model_state = get_model_state_dict(container, options=opts)
    optim_state = None
    if optimizer is not None:
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        optim_state = get_optimizer_state_dict(container, inner, options=opts)
    return model_state, optim_state


def check_finite_shards(
    models: Mapping[str, nn.Module], what: str, run_dir: str | os.PathLike[str]
) -> None:
    """:func:`check_finite_weights` of sharded models: each process checks its shards, the verdict
    is reduced, so every process raises (or none does) before the collective write."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    bad = ""
    for name, module in models.items():
        for key, p in module.state_dict().items():
            local = p.to_local() if isinstance(p, DTensor) else p
            if isinstance(local, torch.Tensor) and local.is_floating_point():
                if not bool(torch.isfinite(local).all()):
                    bad = bad or f"{name}:{key}"
    flag = torch.tensor([1.0 if bad else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag)
    if float(flag) > 0:
        model, _, key = (bad or "?:?").partition(":")
        last = latest_checkpoint(run_dir)
        keep = f"the last good checkpoint is {last}" if last else "no checkpoint was kept"
        raise NumericalError(
            f"model {model or 'the policy'!r} has non-finite weights "
            f"({key or 'on another process'!r}); not writing {what} ({keep}). Lower "
            "learning_rate, keep max_grad_norm on, or resume from the checkpoint"
        )


def _fsync_tree(path: Path) -> None:
    for sub in sorted(path.rglob("*")):
        if sub.is_file():
            _fsync_file(sub)
    for sub in sorted(p for p in path.rglob("*") if p.is_dir()):
        _fsync_dir(sub)


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    *,
    models: Mapping[str, nn.Module | StateDict],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    states: Mapping[str, Any] | None = None,
    accelerator: Accelerator | None = None,
    keep_last: int | None = 2,
    drop_older_optimizers: bool = False,
) -> Path:
    """Write the checkpoint for ``step`` atomically and prune old ones; return its directory.

    Args:
        run_dir: the run directory; the checkpoint goes to ``run_dir/checkpoints/step-NNNNNN``.
        step: the number of completed optimizer steps (≥ 0). Saving a step that exists
            replaces it.
        models: name → module (its whole ``state_dict()`` is saved) or → a state dict (saved as
            given, e.g. :func:`trainable_state_dict`; loading then allows the module's other
            keys to be missing). Names are file names: letters, digits, ``_.-``.
        optimizer, scheduler: saved with their ``state_dict()``.
        states: name → JSON-able state (None/bool/int/float/str, lists, str-keyed dicts) that may
            contain tensors, e.g. ``{"kl_controller": ctl.state_dict()}``. Tuples come back as
            lists.
        accelerator: when given, every process must call this; the main process writes.
        keep_last: how many checkpoints to keep, newest first (``None``: all).
        drop_older_optimizers: once this checkpoint is installed, remove the optimizer state
            of every older one (``save_optimizer=last``; see :func:`drop_optimizer_states`).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int ≥ 0, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be ≥ 1 or None, got {keep_last!r}")
    for name in models:
        if not _MODEL_NAME.match(name):
            raise ValueError(f"model name {name!r} must match {_MODEL_NAME.pattern}")
    sharded = _sharded(models)
    if sharded:
        check_finite_shards(sharded, f"the checkpoint of step {step}", run_dir)
    model_states: dict[str, tuple[StateDict, bool]] = {}
    for name, model in models.items():
        if name in sharded:
            continue
        if isinstance(model, nn.Module):
            full = accelerator.get_state_dict(model) if accelerator else model.state_dict()
            model_states[name] = (full, False)
        else:
            model_states[name] = (model, True)
        check_finite_weights(model_states[name][0], name, f"the checkpoint of step {step}", run_dir)
    state_tensors: dict[str, torch.Tensor] = {}
    states_json = _split_tensors(dict(states or {}), "states", state_tensors)

    main = _is_main(accelerator)
    root = Path(run_dir) / CHECKPOINTS_DIR
    name = checkpoint_name(step)
    tmp = root / f".tmp-{name}"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left behind by a crash
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier(accelerator)
    try:
        _torch_save(_rng_state(), tmp / f"rng-{_rank(accelerator)}.pt")
        if sharded:  # collective: every process writes its shards
            import torch.distributed.checkpoint as dcp

            model_state, optim_state = _dcp_states(sharded, optimizer)
            dcp.save(model_state, checkpoint_id=str(tmp / _SHARDED_MODEL_DIR))
            if optim_state is not None:
                dcp.save(
                    {"optimizer": optim_state}, checkpoint_id=str(tmp / _SHARDED_OPTIMIZER_DIR)
                )
        _barrier(accelerator)
        if main:
            manifest: dict[str, Any] = {
                "format": FORMAT_VERSION,
                "step": step,
                "time": time.time(),
                "tether_version": tether.__version__,
                "num_processes": 1 if accelerator is None else accelerator.num_processes,
                "models": {},
                "optimizer": optimizer is not None,
                "scheduler": scheduler is not None,
            }
            for model_name, (state, partial) in model_states.items():
                file = f"{model_name}.safetensors"
                _save_weights(state, tmp / file, model_name)
                manifest["models"][model_name] = {"file": file, "partial": partial}
            for model_name in sharded:
                manifest["models"][model_name] = {
                    "file": _SHARDED_MODEL_DIR,
                    "partial": False,
                    "sharded": True,
                }
            if sharded:
                manifest["sharded"] = True
            if optimizer is not None and not sharded:
                _torch_save(optimizer.state_dict(), tmp / _OPTIMIZER_FILE)
            if scheduler is not None:
                _torch_save(scheduler.state_dict(), tmp / _SCHEDULER_FILE)
            if state_tensors:
                _torch_save(state_tensors, tmp / _STATES_TENSORS)
            _write_text(tmp / _STATES_JSON, json.dumps(states_json, indent=1))
            _write_text(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1))
            _fsync_tree(tmp)  # RNG files and shards of the other processes
            _fsync_dir(tmp)
            _install(tmp, root / name)
            _prune(root, keep_last, keep=name)
            if drop_older_optimizers:
                drop_optimizer_states(run_dir, before=step)
    except OSError as exc:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(run_dir)
        kept = f"; {last} is intact" if last else ""
        raise CheckpointError(
            describe_os_error(exc, f"cannot write the checkpoint of step {step}") + kept
        ) from exc
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier(accelerator)
    return root / name


def _install(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` directory to ``final`` and point ``latest`` at it."""
    root = final.parent
    old = root / f".old-{final.name}"
    if final.exists():  # re-saving a step (e.g. a resumed run ending where it started)
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    pointer = root / f".{LATEST_FILE}.tmp"
    _write_text(pointer, final.name + "\n")
    os.replace(pointer, root / LATEST_FILE)
    _fsync_dir(root)
    if old.exists():
        shutil.rmtree(old)


def _prune(root: Path, keep_last: int | None, keep: str) -> None:
    """Remove all but the newest ``keep_last`` checkpoints (never ``keep``). Each is renamed out
    of the ``step-*`` namespace first, so a crash mid-delete leaves no partial checkpoint."""
    if keep_last is None:
        return
    for path in list_checkpoints(root.parent)[:-keep_last]:
        if path.name == keep:
            continue
        doomed = root / f".old-{path.name}"
        if doomed.exists():
            shutil.rmtree(doomed)
        os.replace(path, doomed)
        shutil.rmtree(doomed)


def drop_optimizer_states(run_dir: str | os.PathLike[str], before: int) -> list[Path]:
    """Remove ``optimizer.pt`` from the run's checkpoints older than step ``before``; return
    the checkpoints changed. Each manifest is rewritten first (atomically: a temporary file,
    fsync, rename) to say the checkpoint holds no optimizer state, and only then is the file
    deleted, so a crash in between leaves a readable checkpoint with a stray file, never a
    manifest naming a missing one. A checkpoint that cannot be changed (unreadable manifest,
    permissions) is left as it is, with a warning: the run goes on."""
    changed = []
    for path in list_checkpoints(run_dir):
        match = _STEP_DIR.match(path.name)
        if match is None or int(match.group(1)) >= before:
            continue
        manifest_file = path / MANIFEST_FILE
        try:
            manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
            if manifest.get("optimizer"):
                manifest["optimizer"] = False
                manifest["optimizer_dropped"] = True
                pointer = path / f".{MANIFEST_FILE}.tmp"
                _write_text(pointer, json.dumps(manifest, indent=1))
                os.replace(pointer, manifest_file)
                _fsync_dir(path)
                changed.append(path)
            (path / _OPTIMIZER_FILE).unlink(missing_ok=True)
            if (path / _SHARDED_OPTIMIZER_DIR).is_dir():
                shutil.rmtree(path / _SHARDED_OPTIMIZER_DIR)
        except (OSError, ValueError, AttributeError) as exc:
            warnings.warn(
                f"could not drop the optimizer state of {path} ({exc}); it stays on disk",
                TetherWarning,
                stacklevel=3,
            )
    return changed


def link_identical_weights(directory: str | os.PathLike[str], checkpoint: Path | None) -> list[str]:
    """Hard-link the weights of ``checkpoint`` into ``directory`` where they are the same: each
    ``*.safetensors`` file of ``directory`` whose tensors (names, dtypes, shapes and bytes) and
    metadata equal a weights file of the checkpoint's is replaced by a hard link to that file,
    so a run's ``final/`` and its end-of-run checkpoint share one copy of the weights on disk.

    The replacement is atomic (a link under a temporary name, then ``os.replace``) and files are
    never written in place afterwards, so the two names stay independent: pruning the checkpoint
    or replacing ``final/`` leaves the other intact. The checkpoint's file holds the same
    tensors plus tether's alias metadata (tied weights stored once, as transformers stores
    them), so loaders of ``directory`` see the same model. Files that differ (a LoRA adapter, a
    reward model's split files, another dtype) and filesystems without hard links keep their
    own copy. Returns the names of the files linked."""
    if checkpoint is None or not (checkpoint / MANIFEST_FILE).is_file():
        return []
    try:
        manifest = json.loads((checkpoint / MANIFEST_FILE).read_text(encoding="utf-8"))
        sources = [
            checkpoint / entry["file"]
            for entry in manifest["models"].values()
            if not entry.get("sharded")  # a DCP directory of shards: never the same file
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    linked = []
    for target in sorted(Path(directory).glob("*.safetensors")):
        for source in sources:
            if _same_tensors(target, source):
                pointer = target.with_name(f".{target.name}.link")
                try:
                    os.link(source, pointer)
                    os.replace(pointer, target)
                except OSError:  # no hard links here (some network/FUSE filesystems)
                    pointer.unlink(missing_ok=True)
                    break
                linked.append(target.name)
                break
    return linked


def _same_tensors(target: Path, source: Path) -> bool:
    """Whether two safetensors files hold the same tensors, byte for byte, and ``source``'s
    metadata includes ``target``'s (compared one tensor at a time, so memory stays small)."""
    try:
        with (
            safe_open(str(target), framework="pt") as a,
            safe_open(str(source), framework="pt") as b,
        ):
            if set(a.keys()) != set(b.keys()):
                return False
            meta_a, meta_b = a.metadata() or {}, b.metadata() or {}
            if any(meta_b.get(k) != v for k, v in meta_a.items()):
                return False
            for key in a.keys():
                x, y = a.get_slice(key), b.get_slice(key)
                if x.get_dtype() != y.get_dtype() or x.get_shape() != y.get_shape():
                    return False
            for key in a.keys():
                x, y = a.get_tensor(key), b.get_tensor(key)
                if x.numel() and not torch.equal(
                    x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)
                ):
                    return False
    except (OSError, ValueError, RuntimeError):
        return False
    return True


# ------------------------------------------------------------------------------------------------
# Load
# ------------------------------------------------------------------------------------------------


def _resolve(path: Path) -> Path:
    if (path / MANIFEST_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(
            f"no checkpoint at {path}: expected a checkpoint directory holding {MANIFEST_FILE} "
            f"or a run directory with {CHECKPOINTS_DIR}/step-*/"
        )
    return latest


def _read_dcp_metadata(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(path)).read_metadata()


def read_checkpoint(
    path: str | os.PathLike[str], accelerator: Accelerator | None = None
) -> dict[str, Any]:
    """Read every file of a checkpoint into memory (nothing is applied yet), so a truncated or
    corrupt checkpoint fails here, as a :class:`CheckpointError` naming the file, before any
    model or optimizer has changed. Tensors load with ``weights_only=True`` (no code runs from
    a pickle)."""
    ckpt = _resolve(Path(path))
    current = ckpt / MANIFEST_FILE

    def fail(exc: BaseException) -> CheckpointError:
        lines = str(exc).strip().splitlines() or [""]
        reason = lines[0][:200]  # torch's unpickling errors run to a page
        return CheckpointError(
            f"checkpoint {ckpt} is unreadable: {current.name}: {type(exc).__name__}: {reason}"
        )

    try:
        manifest = json.loads(current.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
            raise CheckpointError(
                f"{current}: checkpoint format "
                f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, this "
                f"tether reads {FORMAT_VERSION}"
            )
        data: dict[str, Any] = {"path": ckpt, "manifest": manifest, "models": {}}
        for name, entry in manifest["models"].items():
            current = ckpt / entry["file"]
            if entry.get("sharded"):
                # DCP loads collectively when applied; here: its metadata must be readable
                current = current / ".metadata"
                _read_dcp_metadata(current.parent)
                data["models"][name] = (None, False)
                continue
            data["models"][name] = (_load_weights(current), bool(entry["partial"]))
        if manifest.get("sharded") and manifest["optimizer"]:
            current = ckpt / _SHARDED_OPTIMIZER_DIR / ".metadata"
            _read_dcp_metadata(current.parent)
        for key, file in (("optimizer", _OPTIMIZER_FILE), ("scheduler", _SCHEDULER_FILE)):
            if key == "optimizer" and manifest.get("sharded"):
                continue
            if manifest[key]:
                current = ckpt / file
                data[key] = torch.load(current, map_location="cpu", weights_only=True)
        tensors: dict[str, torch.Tensor] = {}
        current = ckpt / _STATES_TENSORS
        if current.is_file():
            tensors = torch.load(current, map_location="cpu", weights_only=True)
        current = ckpt / _STATES_JSON
        data["states"] = _join_tensors(json.loads(current.read_text(encoding="utf-8")), tensors)
        current = ckpt / f"rng-{_rank(accelerator)}.pt"
        data["rng"] = torch.load(current, weights_only=True) if current.is_file() else None
    except CheckpointError:
        raise
    except Exception as exc:  # truncated/corrupt files: safetensors, pickle, JSON, missing keys
        raise fail(exc) from exc
    return data


def apply_checkpoint(
    data: Mapping[str, Any],
    *,
    models: Mapping[str, nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    accelerator: Accelerator | None = None,
    missing_optimizer: str = "error",
) -> tuple[int, dict[str, Any]]:
    """Restore what :func:`read_checkpoint` read, in place; return ``(step, states)``.

    ``missing_optimizer``: what an ``optimizer`` passed for a checkpoint without optimizer state
    (``save_optimizer=last`` or ``none``) means: ``"error"`` (a :class:`CheckpointError`) or
    ``"warn"`` (a :class:`tether.errors.TetherWarning`; the optimizer restarts fresh, with the
    learning rate the restored scheduler gives at the restored step)."""
    ckpt, manifest = data["path"], data["manifest"]
    saved = manifest["models"]
    missing = sorted(set(models) - set(saved))
    extra = sorted(set(saved) - set(models))
    if missing:
        raise CheckpointError(f"{ckpt} has no model(s) {missing}; it holds {sorted(saved)}")
    if extra:
        raise CheckpointError(
            f"{ckpt} also holds model(s) {extra}: pass them in models= so the run resumes exactly"
        )
    sharded = _sharded(models)
    saved_sharded = sorted(n for n, e in saved.items() if e.get("sharded"))
    if sorted(sharded) != saved_sharded:
        raise CheckpointError(
            f"{ckpt} holds sharded model(s) {saved_sharded} (sharding=fsdp2), this run shards "
            f"{sorted(sharded)}: resume with the sharding the checkpoint was saved with"
        )
    for name, module in models.items():
        if name in sharded:
            continue
        state, partial = data["models"][name]
        _apply_weights(module, state, partial, ckpt / saved[name]["file"], name, accelerator)
    if sharded:
        _load_sharded(ckpt, sharded, optimizer if manifest["optimizer"] else None)
    fresh_optimizer = False
    for obj, key in ((optimizer, "optimizer"), (scheduler, "scheduler")):
        if obj is None:
            continue
        if key == "optimizer" and sharded and manifest[key]:
            continue  # loaded from its DCP state above
        if not manifest[key] and key == "optimizer" and missing_optimizer == "warn":
            why = (
                "it was dropped when a newer checkpoint was written (save_optimizer=last)"
                if manifest.get("optimizer_dropped")
                else "saved without it: save_optimizer=none, or an end-of-run checkpoint at a "
                "step save_steps does not hit"
            )
            warnings.warn(
                f"{ckpt} holds no optimizer state ({why}): the optimizer restarts fresh "
                "(AdamW moments at zero) from the restored weights, so the resumed run will "
                "not match an uninterrupted one exactly",
                TetherWarning,
                stacklevel=3,
            )
            fresh_optimizer = True
            continue
        if not manifest[key]:
            raise CheckpointError(f"{ckpt} has no {key} state, but a {key} was passed to restore")
        try:
            obj.load_state_dict(data[key])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"{ckpt}: the saved {key} state does not fit this run's {key} ({exc}); was the "
                "model, peft or optimizer setup changed?"
            ) from exc
    if fresh_optimizer and scheduler is not None:
        # A restored scheduler does not touch the optimizer's learning rates (a restored
        # optimizer carries them); a fresh optimizer needs the schedule's value at this step.
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
    rng_file = ckpt / f"rng-{_rank(accelerator)}.pt"
    if data["rng"] is not None:
        _set_rng_state(data["rng"], rng_file)
    else:
        warnings.warn(
            f"{ckpt} has no RNG state for process {_rank(accelerator)} (saved with "
            f"{manifest['num_processes']} process(es)); RNG not restored, so the resumed run "
            "will not match exactly",
            stacklevel=3,
        )
    return int(manifest["step"]), data["states"]


def _load_sharded(
    ckpt: Path, models: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer | None
) -> None:
    """Load the DCP states of sharded models (and their optimizer) in place, resharding to this
    run's processes. A collective: every process calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    container = nn.ModuleDict(dict(models))
    model_state, optim_state = _dcp_states(models, optimizer)
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    try:
        dcp.load(model_state, checkpoint_id=str(ckpt / _SHARDED_MODEL_DIR))
        set_model_state_dict(container, model_state, options=options)
        if optimizer is not None and optim_state is not None:
            wrapped = {"optimizer": optim_state}
            dcp.load(wrapped, checkpoint_id=str(ckpt / _SHARDED_OPTIMIZER_DIR))
            inner = getattr(optimizer, "optimizer", optimizer)
            set_optimizer_state_dict(container, inner, wrapped["optimizer"], options=options)
    except (RuntimeError, ValueError, KeyError) as exc:
        reason = (str(exc).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(
            f"{ckpt}: the sharded state does not fit this run's model or optimizer ({reason}); "
            "was the model, peft or optimizer setup changed?"
        ) from exc


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    models: Mapping[str, nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    accelerator: Accelerator | None = None,
) -> tuple[int, dict[str, Any]]:
    """Restore a checkpoint in place and return ``(step, states)``.

    Args:
        path: a checkpoint directory, or a run directory (its latest checkpoint is loaded).
        models: name → module, the same names that were saved (all of them: a model left out
            would silently not resume).
        optimizer, scheduler: restored when given (and then must be in the checkpoint).
        accelerator: when given, every process must call this; modules are unwrapped.

    Every file is read before anything is applied (:func:`read_checkpoint`): an unreadable
    checkpoint is a :class:`tether.errors.CheckpointError` naming the file, and leaves the
    models as they were. The RNG states (python, numpy, torch CPU and CUDA) of this process are
    restored too, so call this after building models, optimizer and data, right before the
    training loop.
    """
    data = read_checkpoint(path, accelerator)
    return apply_checkpoint(
        data, models=models, optimizer=optimizer, scheduler=scheduler, accelerator=accelerator
    )
