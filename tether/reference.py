"""Reference policies π_ref: one interface, four kinds.

* ``copy`` — a frozen copy of the initial policy (eval mode, no grads, optionally lower precision).
* ``adapter`` — for a PEFT policy: the same model with its adapters disabled. No second copy of
  the weights; the reference is exactly the base model.
* ``precomputed`` — reference log-probs computed once for an offline dataset and cached on disk,
  keyed by a fingerprint of the data and of the model; each sequence is looked up by a hash of its
  tokens, so any batching or shuffling of the same data finds its entries.
* ``synced`` — TR-DPO (Gorbatovski et al. 2024, arXiv:2404.09656 §3): every ``tau`` optimiser
  steps, θ_ref ← α·θ + (1 − α)·θ_ref (α = 1 is the hard update).

Every reference has ``logprobs(input_ids, attention_mask, mask=None, ...)`` returning a
:class:`~tether.models.LogProbOutput` (the same alignment as :func:`forward_logprobs`),
``on_step(policy_model, step)`` (a no-op but for ``synced``), and ``state_dict()`` /
``load_state_dict()``. The state goes into every checkpoint: a ``synced`` reference saves its
weights (peers lose them on resume), and the others save a fingerprint that is checked on load, so
a resumed run cannot silently compare against a different reference (e.g. a "copy" rebuilt from
the already-trained policy).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tether.errors import CheckpointError, TetherWarning
from tether.models.fingerprint import model_fingerprint
from tether.models.logprobs import LogProbOutput, forward_logprobs, unwrap_model

ReferenceKind = Literal["copy", "adapter", "precomputed", "synced"]


class ReferencePolicy:
    """Interface shared by the four kinds."""

    kind: str = ""
    model: nn.Module

    def logprobs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        mask: Tensor | None = None,
        *,
        temperature: float = 1.0,
        return_logits: bool = False,
    ) -> LogProbOutput:
        """Log-probs under the reference (same alignment as ``forward_logprobs``), no grad.

        The default runs ``self.model`` in eval mode; kinds without a model of their own
        override it."""
        return _frozen_logprobs(
            self.model,
            input_ids,
            attention_mask,
            mask=mask,
            temperature=temperature,
            return_logits=return_logits,
        )

    def on_step(self, policy_model: nn.Module, step: int) -> None:
        """Called after each optimiser step (``step`` counts from 1)."""

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _check_kind(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(
                f"checkpoint holds a {state.get('kind')!r} reference, this run uses {self.kind!r}"
            )


def _frozen_logprobs(model: nn.Module, *args: Any, **kwargs: Any) -> LogProbOutput:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return forward_logprobs(model, *args, **kwargs)
    finally:
        model.train(was_training)


class CopyReference(ReferencePolicy):
    """A frozen deep copy of the policy as it is now (call before training starts)."""

    kind = "copy"

    def __init__(self, policy_model: nn.Module, dtype: torch.dtype | None = None) -> None:
        self.model = copy.deepcopy(unwrap_model(policy_model))
        if dtype is not None:
            self.model.to(dtype)
        self.model.eval().requires_grad_(False)
        self.fingerprint = model_fingerprint(self.model)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_kind(state)
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                "the reference copy differs from the one this run was trained against "
                f"(fingerprint {self.fingerprint} != {state['fingerprint']}): build the reference "
                "from the initial model, before loading the policy checkpoint"
            )


class AdapterReference(ReferencePolicy):
    """The PEFT policy with its adapters disabled: π_ref is the frozen base model, no copy."""

    kind = "adapter"

    def __init__(self, peft_model: Any) -> None:
        if not (hasattr(peft_model, "disable_adapter") and hasattr(peft_model, "peft_config")):
            raise ValueError("reference kind 'adapter' needs a PEFT policy (set `peft` / LoRA)")
        self.model = peft_model
        base = unwrap_model(peft_model)
        frozen = [(n, p) for n, p in base.named_parameters() if not p.requires_grad]
        self.fingerprint = _params_fingerprint(frozen)

    def logprobs(
        self, input_ids, attention_mask, mask=None, *, temperature=1.0, return_logits=False
    ) -> LogProbOutput:
        with self.model.disable_adapter():
            return _frozen_logprobs(
                self.model,
                input_ids,
                attention_mask,
                mask=mask,
                temperature=temperature,
                return_logits=return_logits,
            )

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_kind(state)
        if state["fingerprint"] != self.fingerprint:
            raise ValueError("the base model under the adapters differs from the checkpoint's")


class SyncedReference(ReferencePolicy):
    """TR-DPO reference: every ``tau`` steps θ_ref ← α·θ + (1 − α)·θ_ref (arXiv:2404.09656)."""

    kind = "synced"

    def __init__(self, policy_model: nn.Module, alpha: float = 0.6, tau: int = 512) -> None:
        if hasattr(policy_model, "peft_config"):
            raise ValueError(
                "reference kind 'synced' mixes full weights; it does not support a PEFT policy "
                "(use 'adapter' for LoRA, or fine-tune fully)"
            )
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"synced reference alpha must be in (0, 1], got {alpha}")
        if tau < 1:
            raise ValueError(f"synced reference tau must be ≥ 1, got {tau}")
        self.alpha, self.tau = float(alpha), int(tau)
        self.model = copy.deepcopy(unwrap_model(policy_model))
        self.model.eval().requires_grad_(False)
        self.syncs = 0

    @torch.no_grad()
    def on_step(self, policy_model: nn.Module, step: int) -> None:
        if step % self.tau != 0:
            return
        src = dict(unwrap_model(policy_model).named_parameters())
        for name, ref_p in self.model.named_parameters():
            ref_p.mul_(1.0 - self.alpha).add_(src[name].detach().to(ref_p.dtype), alpha=self.alpha)
        self.syncs += 1

    def state_dict(self) -> dict[str, Any]:
        weights = {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()}
        return {
            "kind": self.kind,
            "alpha": self.alpha,
            "tau": self.tau,
            "syncs": self.syncs,
            "weights": weights,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_kind(state)
        params = dict(self.model.named_parameters())
        missing = sorted(set(params) - set(state["weights"]))
        if missing:
            raise ValueError(f"synced reference state is missing weights {missing[:5]}")
        for name, p in params.items():
            p.copy_(state["weights"][name])
        self.syncs = int(state["syncs"])


def sequence_key(ids: Tensor) -> str:
    """Key of one sequence in a precomputed cache: sha1 of its real token ids (int64 bytes)."""
    return hashlib.sha1(ids.detach().to(torch.int64).cpu().numpy().tobytes()).hexdigest()


def _params_fingerprint(params: list[tuple[str, Tensor]]) -> str:
    h = hashlib.sha256()
    for name, p in sorted(params, key=lambda kv: kv[0]):
        t = p.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class PrecomputedReference(ReferencePolicy):
    """Reference log-probs computed once per sequence of an offline dataset, cached on disk.

    The cache file (safetensors) is ``<cache_dir>/<model fp>-<data fp>-t<temperature>.safetensors``
    and maps the sha1 of each sequence's real tokens to its (L−1,) next-token log-probs. Lookups
    rebuild the (B, T−1) tensor of any batch layout (left or right padding). Exact-KL logits are
    not cached (V floats per token); use a live reference for those.
    """

    kind = "precomputed"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"precomputed reference cache {self.path} does not exist")
        self.table, self.meta = _read_cache(self.path)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        batches: Iterable[dict[str, Tensor]],
        cache_dir: str | os.PathLike[str],
        data_fingerprint: str,
        temperature: float = 1.0,
    ) -> PrecomputedReference:
        """Compute (or reuse) the cache for every sequence in ``batches``.

        ``batches`` yield dicts with ``input_ids`` and ``attention_mask`` (B, T), e.g. from a
        DataLoader over the training data with the training collator. If the cache for this
        (model, data) pair exists it is loaded without running the model; an entry that cannot
        be used (a truncated or garbled ``.json`` or ``.safetensors``, a missing ``.json``, a
        metadata that does not describe the table) is rebuilt with a warning naming the file.
        """
        fp = model_fingerprint(unwrap_model(model))
        device_type = _device(model).type
        precision = (
            str(torch.get_autocast_dtype(device_type)).removeprefix("torch.")
            if torch.is_autocast_enabled(device_type)
            else "exact"
        )  # computed under the caller's autocast, which is part of what the cache holds
        path = Path(cache_dir) / f"{fp}-{data_fingerprint}-t{temperature:g}-{precision}.safetensors"
        expected = {
            "model_fingerprint": fp,
            "data_fingerprint": data_fingerprint,
            "temperature": temperature,
            "precision": precision,
        }
        if path.is_file():
            try:
                table, meta = _read_cache(path, expected)
            except CheckpointError as e:
                warnings.warn(f"{e}; rebuilding it", TetherWarning, stacklevel=2)
            else:
                ref = cls.__new__(cls)
                ref.path, ref.table, ref.meta = path, table, meta
                return ref
        table: dict[str, Tensor] = {}
        for batch in batches:
            ids, am = batch["input_ids"], batch["attention_mask"].bool()
            out = _frozen_logprobs(
                model, ids.to(_device(model)), am.to(_device(model)), temperature=temperature
            )
            lp = out.logprobs.cpu()
            valid = am[:, 1:] & am[:, :-1]  # (B, T−1) both tokens real
            for i in range(ids.shape[0]):
                key = sequence_key(ids[i][am[i]])
                table[key] = lp[i][valid[i]].clone()  # a repeated sequence is one entry
        n_tokens = sum(v.numel() for v in table.values())
        if not table:
            raise ValueError("precomputed reference: the data yielded no sequences")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "model_fingerprint": fp,
            "data_fingerprint": data_fingerprint,
            "temperature": temperature,
            "precision": precision,
            "sequences": len(table),
            "tokens": n_tokens,
        }
        # Both files atomically (a private temporary name, then a rename), the metadata first:
        # a reader that sees the table also sees its metadata, and two writers (processes,
        # runs) never interleave in one file.
        suffix = f".tmp-{os.getpid()}-{threading.get_ident()}"
        meta_path = path.with_suffix(".json")
        tmp_meta = meta_path.with_name(meta_path.name + suffix)
        tmp_meta.write_text(json.dumps(meta, indent=2))
        os.replace(tmp_meta, meta_path)
        tmp = path.with_name(path.name + suffix)
        save_file(table, str(tmp))
        os.replace(tmp, path)
        return cls(path)

    def logprobs(
        self, input_ids, attention_mask, mask=None, *, temperature=1.0, return_logits=False
    ) -> LogProbOutput:
        if return_logits:
            raise ValueError(
                "a precomputed reference has no logits; the exact KL needs a live "
                "reference ('copy' or 'adapter')"
            )
        if temperature != self.meta.get("temperature", 1.0):
            raise ValueError(
                f"cache was computed at temperature {self.meta.get('temperature')}, "
                f"asked for {temperature}"
            )
        am = attention_mask.bool()
        b, t = input_ids.shape
        out = torch.zeros(b, t - 1, dtype=torch.float32)
        valid = (am[:, 1:] & am[:, :-1]).cpu()
        for i in range(b):
            key = sequence_key(input_ids[i][am[i]])
            try:
                row = self.table[key]
            except KeyError:
                raise KeyError(
                    f"sequence {i} of the batch is not in the precomputed reference cache "
                    f"{self.path} (was the data or tokenizer changed after it was built?)"
                ) from None
            out[i][valid[i]] = row
        out = out.to(input_ids.device)
        if mask is not None:
            out = torch.where(mask, out, 0.0)
        return LogProbOutput(logprobs=out)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "meta": self.meta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_kind(state)
        if state["meta"] != self.meta:
            raise ValueError(
                f"precomputed reference {self.path} differs from the checkpoint's "
                f"({state['meta']} != {self.meta})"
            )


def _read_cache(
    path: Path, expected: dict[str, Any] | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The table and metadata of the precomputed-reference cache ``path`` (and its ``.json``),
    checked: both files readable, the metadata a JSON object whose ``sequences`` / ``tokens``
    counts describe the table and whose fields equal ``expected`` (when given; the metadata is
    then required). Without ``expected`` a missing ``.json`` gives ``{}``.

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    meta_path = path.with_suffix(".json")
    hint = "delete it to rebuild it"
    try:
        table: dict[str, Tensor] = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"precomputed reference cache {path} is truncated or unreadable "
            f"({type(e).__name__}: {e}); {hint}"
        ) from e
    if not meta_path.is_file():
        if expected is not None:
            raise CheckpointError(
                f"precomputed reference cache {path} has no metadata file {meta_path.name}; {hint}"
            )
        return table, {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"precomputed reference metadata {meta_path} is truncated or unreadable "
            f"({type(e).__name__}: {e}); {hint}"
        ) from e
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"precomputed reference metadata {meta_path} holds a JSON {type(meta).__name__}, "
            f"not an object; {hint}"
        )
    bad_rows = [k for k, v in table.items() if v.dim() != 1 or not v.dtype.is_floating_point]
    n_tokens = sum(v.numel() for v in table.values())
    found = {"sequences": len(table), "tokens": n_tokens, **(expected or {})}
    wanted = {"sequences": meta.get("sequences"), "tokens": meta.get("tokens")}
    wanted.update({k: meta.get(k) for k in expected or {}})
    mismatch = [f"{k} {wanted[k]!r} != {found[k]!r}" for k in found if wanted[k] != found[k]]
    if bad_rows or mismatch:
        what = f"{len(bad_rows)} malformed entries" if bad_rows else ", ".join(mismatch)
        raise CheckpointError(
            f"precomputed reference metadata {meta_path} does not match its table {path.name} "
            f"({what}); {hint}"
        )
    return table, meta


def _device(model: nn.Module) -> torch.device:
    return next(unwrap_model(model).parameters()).device


def make_reference(
    kind: ReferenceKind,
    policy_model: nn.Module,
    *,
    dtype: torch.dtype | None = None,
    sync_alpha: float = 0.6,
    sync_tau: int = 512,
    precomputed_path: str | os.PathLike[str] | None = None,
) -> ReferencePolicy:
    """Build a reference of the given kind from the (initial) policy model."""
    if kind == "copy":
        return CopyReference(policy_model, dtype=dtype)
    if kind == "adapter":
        return AdapterReference(policy_model)
    if kind == "synced":
        return SyncedReference(policy_model, alpha=sync_alpha, tau=sync_tau)
    if kind == "precomputed":
        if precomputed_path is None:
            raise ValueError(
                "reference kind 'precomputed' needs a cache path: build it with "
                "PrecomputedReference.build(...)"
            )
        return PrecomputedReference(precomputed_path)
    raise ValueError(f"reference kind must be one of copy/adapter/precomputed/synced, got {kind!r}")


def shard_reference(reference: ReferencePolicy, device: torch.device) -> None:
    """Under ``sharding=fsdp2``: shard a ``copy`` reference's model like the policy
    (:func:`tether.models.sharding.shard_model`); an ``adapter`` reference is the sharded policy
    itself and a ``precomputed`` one holds no model. Every process must call it; the copy's
    fingerprint (taken when it was built, from the whole weights) is unchanged."""
    from tether.models.sharding import shard_model

    if isinstance(reference, CopyReference):
        shard_model(reference.model, device)
    elif isinstance(reference, SyncedReference):
        raise ValueError("reference=synced does not support sharding=fsdp2")
