"""FSDP2 sharding of tether's models (``sharding: fsdp2``): PyTorch's ``fully_shard`` per
decoder block and at the root, on CPU (gloo) and CUDA (NCCL).

Each process holds 1/N of every sharded parameter (a ``DTensor`` sharded on dim 0), its gradient
and its AdamW moments; a block's full weights exist only while that block runs (all-gathered in
its pre-forward hook, freed after forward and after backward, gradients reduce-scattered). The
units follow how tether calls the model:

* every decoder block (the classes in the model's ``_no_split_modules``, as accelerate's FSDP
  auto-wrap reads them) is its own unit;
* the root unit is the causal LM itself: embeddings, final norm and LM head (tied or not);
* tether's chunked log-prob computation (:func:`tether.models.logprobs.forward_logprobs`) calls the
  backbone and the head's weight directly, not the model's ``forward``; it is registered as an
  FSDP forward method of the root (:data:`LOGPROBS_METHOD`), so the root's parameters are
  unsharded around it exactly as around ``forward`` and HF ``generate``.

Gradients are averaged over processes, as under DDP, so tether's loss normalisation
(:mod:`tether.train.distributed`) is the same with and without sharding. Mixed precision stays
autocast over fp32 sharded weights (the same numerics as ``sharding: none``, and the fp32 KL
forward of ``kl_precision=fp32`` keeps fp32 weights); FSDP2's ``MixedPrecisionPolicy`` is used
for what it adds on top: gradients reduced in fp32.

Every forward of a sharded model is a collective: every process must run the same sequence of
forwards (generation keeps decoding until every process is done: HF's ``synced_gpus``).
"""

from __future__ import annotations

import dataclasses
import json
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tether.models.logprobs import LOGPROBS_METHOD as LOGPROBS_METHOD

SHARDINGS = ("none", "fsdp2")
"""Values of the ``sharding`` option."""


def is_sharded(module: Any) -> bool:
    """Whether ``module`` (or the model inside a PEFT/DDP wrapper) holds FSDP2-sharded
    parameters."""
    from torch.distributed.tensor import DTensor

    if not isinstance(module, nn.Module):
        return False
    return any(isinstance(p, DTensor) for p in module.parameters())


def ensure_process_group(device: torch.device) -> None:
    """A process group for FSDP2: the launcher's (torchrun/accelerate) when there is one, else a
    world of one process in memory (gloo on CPU, NCCL on CUDA), so ``sharding=fsdp2`` also
    runs on a single process."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def _mesh(device: torch.device) -> Any:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model: modules whose class is named in its
    ``_no_split_modules`` (the decoder layers of a causal LM), outermost first."""
    from tether.models.logprobs import unwrap_model

    base = unwrap_model(model)
    names = set(getattr(base, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(
            f"{type(base).__name__} does not name its decoder blocks (_no_split_modules): "
            "sharding=fsdp2 shards per block and cannot find them"
        )
    blocks: list[nn.Module] = []
    for m in base.modules():
        if type(m).__name__ in names and not any(m in b.modules() for b in blocks):
            blocks.append(m)
    if not blocks:
        raise ValueError(f"{type(base).__name__} has no module of the classes {sorted(names)}")
    return blocks


def _fsdp_kwargs(device: torch.device) -> dict[str, Any]:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    # parameters stay as stored (fp32 under autocast); gradients are reduced in fp32
    return {
        "mesh": _mesh(device),
        "mp_policy": MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32),
    }


@torch.no_grad()
def broadcast_from_main(module: nn.Module) -> None:
    """Make every process's parameters and buffers rank 0's, as DDP does when it wraps a model:
    weights initialised per process (a LoRA adapter's A, drawn from a per-process seed) would
    otherwise become a mix of every process's draws once sharded. A collective."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=0)


def shard_model(model: nn.Module, device: torch.device, root: nn.Module | None = None) -> nn.Module:
    """Shard an HF model (or the base model under a PEFT wrapper) in place with FSDP2:
    ``fully_shard`` on every decoder block, then on ``root`` (default: the model itself; a reward
    model's module around its backbone and head), with
    :func:`tether.models.logprobs.forward_logprobs` registered as a forward method of the root.
    Returns ``model`` (the same object, now sharded). Every process must call it."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from tether.models.logprobs import forward_logprobs_unsharded, unwrap_model

    ensure_process_group(device)
    base = unwrap_model(model)
    top = base if root is None else unwrap_model(root)
    if is_sharded(top):
        return model
    broadcast_from_main(top)
    kwargs = _fsdp_kwargs(device)
    for block in decoder_blocks(base):
        fully_shard(block, **kwargs)
    # the root too is resharded after every forward (FSDP2's default keeps it gathered from a
    # forward to its backward, so after a no-grad forward it would stay whole until the next)
    fully_shard(top, reshard_after_forward=True, **kwargs)

    def logprobs(self: nn.Module, *args: Any, _model: Any = None, **kw: Any) -> Any:
        # _model: the model as the caller passed it (a PEFT wrapper keeps its adapter switches)
        out = forward_logprobs_unsharded(self if _model is None else _model, *args, **kw)
        # FSDP2 hooks the outputs for its backward; views of them must not be changed in place
        return dataclasses.replace(
            out,
            logprobs=out.logprobs.clone(),
            entropy=None if out.entropy is None else out.entropy.clone(),
        )

    if root is None:
        setattr(top, LOGPROBS_METHOD, types.MethodType(logprobs, top))
        register_fsdp_forward_method(top, LOGPROBS_METHOD)
    return model


def shard_module(module: nn.Module, device: torch.device) -> nn.Module:
    """``fully_shard`` a small module as one unit (a value head): its parameters sharded like
    the policy's, its gradients reduced over processes. Every process must call it."""
    from torch.distributed.fsdp import fully_shard

    ensure_process_group(device)
    if not is_sharded(module):
        broadcast_from_main(module)
        fully_shard(module, **_fsdp_kwargs(device))
    return module


def unsharded_class(model: nn.Module) -> type:
    """The model's own class (FSDP2 swaps in a subclass ``FSDP<Name>``)."""
    from torch.distributed.fsdp import FSDPModule

    for cls in type(model).__mro__:
        if not issubclass(cls, FSDPModule) and issubclass(cls, nn.Module):
            return cls
    return type(model)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded model, gathered on CPU on the main process (rank 0;
    empty elsewhere). A collective: every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    # a tied parameter (LM head = input embeddings) is stored once, as save_pretrained does
    once = {n for n, _ in model.named_parameters()}
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {k: v for k, v in state.items() if k in once or k not in every}


def local_bytes(tensors: Any) -> int:
    """Bytes this process holds of ``tensors`` (a sharded parameter counts its local shard)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def fix_saved_architecture(path: Path, model: nn.Module) -> None:
    """``save_pretrained`` records ``type(model).__name__`` in config.json; for a sharded model
    that is FSDP2's subclass, which plain transformers cannot load: write the model's own class."""
    from tether.models.logprobs import unwrap_model

    base = unwrap_model(model)
    config = Path(path) / "config.json"
    if not config.is_file():
        return
    data = json.loads(config.read_text(encoding="utf-8"))
    own = unsharded_class(base).__name__
    if data.get("architectures") and data["architectures"] != [own]:
        data["architectures"] = [own]
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class ModelSaver:
    """``save(dir)`` for ``final/`` and ``best/``: the model (an adapter for LoRA) and the
    tokenizer. For a sharded model the weights are gathered first by :meth:`collect`, a
    collective every process calls before the main process calls ``save`` (see
    :func:`collect_for_save`); unsharded, ``collect`` does nothing."""

    def __init__(self, model: nn.Module, tokenizer: Any, after: Callable[[Path], None]) -> None:
        self.model, self.tokenizer, self.after = model, tokenizer, after
        self._state: dict[str, torch.Tensor] | None = None

    def collect(self) -> None:
        if is_sharded(self.model):
            self._state = full_state_dict(self.model)

    def __call__(self, path: Any) -> None:
        if self._state is not None:
            # (a PEFT model picks its adapter's entries out of the whole state dict itself)
            self.model.save_pretrained(path, state_dict=self._state)
            fix_saved_architecture(Path(path), self.model)
            self._state = None
        elif is_sharded(self.model):
            raise ValueError(
                "a sharded model is saved from its gathered weights: call collect() on every "
                "process first (tether.models.sharding.collect_for_save)"
            )
        else:
            self.model.save_pretrained(path)
        self.after(Path(path))
        self.tokenizer.save_pretrained(path)


def collect_for_save(save: Any) -> None:
    """Run ``save.collect()`` when ``save`` (or the object whose method it is, e.g. a reward
    model's ``save``) has one: every process, before the main process writes."""
    owner = getattr(save, "__self__", None)
    collect = getattr(save, "collect", None) or getattr(owner, "collect", None)
    if callable(collect):
        collect()
