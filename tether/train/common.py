"""Pieces every trainer shares: the model/optimiser config fields (defined in the torch-free
:mod:`tether.configs.common`, re-exported here), accelerator and optimiser setup, and a resumable
data cursor."""

from __future__ import annotations

import math
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import AutocastKwargs, set_seed
from torch import nn
from transformers import get_scheduler

from tether.configs.common import (  # re-exported: the config classes live in tether.configs
    PreferenceDataConfig as PreferenceDataConfig,
)
from tether.configs.common import SamplingTrainConfig as SamplingTrainConfig
from tether.configs.common import TrainConfig
from tether.models import Policy, load_policy
from tether.models.checkpointing import autocast_kwargs, enable_activation_checkpointing
from tether.runs.config import ConfigError, RunConfig
from tether.runs.rundir import RunDir


def bf16_supported() -> bool:
    """Whether this machine has fast bf16 matmuls: a CUDA GPU with bf16, or a oneDNN CPU path."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_mixed_precision(value: str) -> str:
    """``auto`` → ``bf16`` where :func:`bf16_supported`, else ``no``; other values unchanged."""
    if value != "auto":
        return value
    return "bf16" if bf16_supported() else "no"


def make_accelerator(cfg: RunConfig) -> Accelerator:
    """An accelerator for the config's precision; seeds every RNG (per process) from cfg.seed."""
    mode = getattr(cfg, "activation_checkpointing", "none")
    handlers = [AutocastKwargs(**autocast_kwargs(mode))] if autocast_kwargs(mode) else []
    precision = resolve_mixed_precision(cfg.mixed_precision)
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", precision) != precision:
        # Another run in this process (a notebook, a sweep, a test session) set a different
        # precision on accelerate's process-wide state; this run's config wins. The process
        # group (PartialState) is kept.
        AcceleratorState._reset_state()
    acc = Accelerator(
        mixed_precision=precision,
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=handlers,
    )
    set_seed(cfg.seed, device_specific=True)
    return acc


def load_trainable_policy(cfg: TrainConfig) -> Policy:
    """The policy of a training run, with LoRA and activation checkpointing as configured."""
    policy = load_policy(cfg.model, dtype=cfg.dtype, peft=cfg.peft)
    enable_activation_checkpointing(policy.model, cfg.activation_checkpointing)
    policy.model.config.use_cache = False
    return policy


DATA_FIELDS = ("train_data", "eval_data", "prompts", "eval_prompts")
"""Config fields that name a data file (checked before anything loads)."""


def check_input_files(cfg: Any) -> None:
    """Before any model or data loads: each data source the config names exists and is readable
    (a data file, a HuggingFace dataset directory or a cached hub id, with the split it names:
    :func:`tether.data.sources.check_source`), and the one the trainer needs is given. Raises
    :class:`tether.runs.ConfigError` naming the option."""
    from tether.data.sources import check_source

    required = {
        "train_data": isinstance(cfg, PreferenceDataConfig),
        "prompts": isinstance(cfg, SamplingTrainConfig),
    }
    for name in DATA_FIELDS:
        value = getattr(cfg, name, None)
        if not value:
            if required.get(name):
                kind = (
                    "preference pairs (prompt/chosen/rejected)"
                    if name == "train_data"
                    else ("prompts (a 'prompt' column)")
                )
                raise ConfigError(f"{name} is required: a data file of {kind}")
            continue
        check_source(name, value)  # a file, a HF dataset dir, a cached hub id; :SPLIT


def start_run(cfg: RunConfig, accelerator: Accelerator) -> RunDir:
    """Check the config's data files and open (lock, check, create) the run directory — before
    the model and data load, so a mistake there costs no loading time."""
    check_input_files(cfg)
    return RunDir.from_config(cfg, accelerator)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and norm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    params = decay + no_decay
    # The fused kernel (CPU and CUDA) updates in one pass without the foreach implementation's
    # parameter-sized temporaries: faster, and a lower peak memory.
    fused = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params
    )
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.learning_rate,
        betas=(cfg.adam_betas[0], cfg.adam_betas[1]),
        fused=fused,
    )


def autocast_forward(module: nn.Module, accelerator: Accelerator) -> nn.Module:
    """Run ``module.forward`` under the accelerator's autocast, as ``accelerator.prepare`` does for
    the modules it wraps (a sharded module is not wrapped). Returns ``module``."""
    forward = module.forward

    def forward_in_autocast(*args: Any, **kwargs: Any) -> Any:
        with accelerator.autocast():
            return forward(*args, **kwargs)

    module.forward = forward_in_autocast  # type: ignore[method-assign]
    return module


def uses_fsdp2(cfg: TrainConfig, accelerator: Accelerator) -> bool:
    """``sharding=fsdp2``, or an accelerate launch with an FSDP2 config (``distributed_type:
    FSDP``, ``fsdp_version: 2``, GPUs only: accelerate ignores the plugin on CPU), which then
    takes tether's own FSDP2 path rather than accelerate's wrapper."""
    if cfg.sharding == "fsdp2":
        return True
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return (
        str(accelerator.distributed_type) in ("DistributedType.FSDP", "FSDP")
        and plugin is not None
        and int(getattr(plugin, "fsdp_version", 1) or 1) == 2
    )


def prepare_training(
    accelerator: Accelerator,
    cfg: TrainConfig,
    module: nn.Module,
    *,
    shard: nn.Module | None = None,
    shard_root: nn.Module | None = None,
    shard_whole: tuple[nn.Module, ...] = (),
    reference: Any = None,
    optimize: nn.Module | None = None,
    total_steps: int | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """The trained module, its AdamW optimizer and LR schedule, ready for the loop.

    ``sharding=none``: ``accelerator.prepare`` wraps module and optimizer (DDP on several
    processes). ``sharding=fsdp2``: ``shard`` (the HF model inside ``module``; ``shard_root``:
    the unit its embeddings and head belong to, default ``shard`` itself) is sharded per decoder
    block and at the root (:func:`tether.models.sharding.shard_model`), each of ``shard_whole``
    (a value head) as one unit, a ``copy`` ``reference`` the same way as the policy, and
    ``module``'s forward runs under autocast; the optimizer is built afterwards, over the
    sharded parameters.

    The schedule is never given to ``accelerator.prepare``: accelerate's prepared scheduler
    steps once per process per optimizer step (N× too fast on N processes); this one advances
    exactly once per optimizer step, whatever the number of processes or micro-batches.

    Args:
        optimize: the module whose trainable parameters AdamW owns (default ``module``).
        total_steps: the schedule's length in optimizer steps (default ``max_steps``).
    """
    target = module if optimize is None else optimize
    if uses_fsdp2(cfg, accelerator):
        from tether.models.sharding import shard_model, shard_module
        from tether.reference import shard_reference

        if shard is None:
            raise ValueError("sharding=fsdp2 needs the model to shard")
        if reference is not None:
            shard_reference(reference, accelerator.device)
        shard_model(shard, accelerator.device, root=shard_root)
        for m in shard_whole:
            shard_module(m, accelerator.device)
        autocast_forward(module, accelerator)
        optimizer = make_optimizer(target, cfg)
        scheduler = make_scheduler(optimizer, cfg, total_steps)
        return module, optimizer, scheduler
    optimizer = make_optimizer(target, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    module, optimizer = accelerator.prepare(module, optimizer)
    return module, optimizer, scheduler


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int | None = None
) -> Any:
    """The configured LR schedule over ``total_steps`` optimizer steps (default ``max_steps``)."""
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
    return get_scheduler(
        name[cfg.lr_scheduler],
        optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=total_steps or cfg.max_steps,
    )


class DataCursor:
    """Epoch-shuffled index batches over a dataset, resumable exactly from its state.

    Each epoch is a permutation drawn from ``torch.Generator(seed + epoch)``, so the order does not
    depend on any other RNG use; ``state_dict()`` holds (epoch, position). With several
    processes, every process draws the same global batch of ``batch_size · num_processes``
    indices and keeps its own slice.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        num_processes: int = 1,
        process_index: int = 0,
    ) -> None:
        global_batch = batch_size * num_processes
        if n < global_batch:
            raise ValueError(
                f"the dataset has {n} examples, fewer than one global batch ({global_batch})"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.num_processes, self.process_index = num_processes, process_index
        self.epoch, self.position = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.num_processes)

    def next_indices(self) -> list[int]:
        """This process's indices of the next batch (drop-last within an epoch)."""
        global_batch = self.batch_size * self.num_processes
        if self.position + global_batch > self.n:
            self.epoch, self.position = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        chunk = self._perm[self.position : self.position + global_batch]
        self.position += global_batch
        start = self.process_index * self.batch_size
        return chunk[start : start + self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = self._permutation(self.epoch)


def split_micro_batches(indices: list[int], n_micro: int) -> list[list[int]]:
    """Split a batch of indices into ``n_micro`` equal micro-batches."""
    size = math.ceil(len(indices) / n_micro)
    return [indices[i : i + size] for i in range(0, len(indices), size)]


class PolicyLogProbs(nn.Module):
    """The policy as a module whose ``forward`` is tether's chunked log-prob computation.

    ``accelerator.prepare`` wraps *this* module (DDP/FSDP), so the chunked head runs inside the
    wrapper's forward and gradient synchronisation sees it; the HF model stays reachable as
    ``.model``. Returns a tuple (DDP-friendly): ``(logprobs (B, T−1), entropy (B, T−1) or None)``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mask: torch.Tensor | None = None,
        temperature: float = 1.0,
        return_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from tether.models import forward_logprobs

        out = forward_logprobs(
            self.model,
            input_ids,
            attention_mask,
            mask=mask,
            temperature=temperature,
            return_entropy=return_entropy,
        )
        return out.logprobs, out.entropy


def model_state_for_checkpoint(model: nn.Module) -> Any:
    """What a checkpoint stores of the policy: a PEFT model's trainable (adapter) entries, or the
    whole module for a full fine-tune; a sharded model as the module (its checkpoint is a DCP
    state of the trainable parameters' shards, :mod:`tether.runs.checkpoint`)."""
    from tether.models.sharding import is_sharded
    from tether.runs.checkpoint import trainable_state_dict

    if hasattr(model, "peft_config") and not is_sharded(model):
        return trainable_state_dict(model)
    return model


def load_preference_split(
    tokenizer: Any,
    train_data: str,
    eval_data: str | None,
    eval_fraction: float,
    seed: int,
    context_length: int | None = None,
    **load_kwargs: Any,
) -> tuple[list[Any], list[Any], str]:
    """Train and held-out preference pairs, and a fingerprint of both.

    ``eval_data`` when given, else a seeded ``eval_fraction`` split of ``train_data`` (the same
    split for every run with the same seed). The fingerprint keys caches such as the
    precomputed reference. With ``context_length`` (the model's positions), a pair longer than
    it after the ``max_length`` truncation is a ``DataError`` naming the file and the row
    (:func:`tether.data.context.check_preference_context`).
    """
    from tether.data import load_preference_dataset
    from tether.data.context import check_preference_context

    max_length = load_kwargs.get("max_length")
    train_ds = load_preference_dataset(train_data, tokenizer, **load_kwargs)
    check_preference_context(train_ds, context_length, train_ds.source, max_length=max_length)
    fingerprint = train_ds.fingerprint()
    examples = list(train_ds)
    if eval_data:
        eval_ds = load_preference_dataset(eval_data, tokenizer, **load_kwargs)
        check_preference_context(eval_ds, context_length, eval_ds.source, max_length=max_length)
        return examples, list(eval_ds), (fingerprint + eval_ds.fingerprint())[:64]
    n_eval = int(round(eval_fraction * len(examples)))
    g = torch.Generator().manual_seed(seed)
    held = set(torch.randperm(len(examples), generator=g)[:n_eval].tolist())
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [examples[i] for i in sorted(held)], fingerprint


def optimizer_step(
    accelerator: Accelerator,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    max_grad_norm: float | None,
    guard: Any = None,
    loss: Any = None,
) -> float | None:
    """Clip the gradient norm (if configured), step optimiser and schedule, clear the grads;
    with a :class:`tether.train.guards.StepGuard`, a non-finite loss or gradient norm skips the
    step instead (:func:`tether.train.guards.guarded_optimizer_step`).

    Returns the gradient norm before clipping, or ``None`` when clipping is off.
    """
    from tether.train.guards import guarded_optimizer_step

    return guarded_optimizer_step(
        accelerator, module, optimizer, scheduler, max_grad_norm, guard, loss
    )


def split_heldout_prompts(
    cfg: SamplingTrainConfig, tokenizer: Any, examples: list[Any], global_batch: int
) -> tuple[list[Any], list[Any]]:
    """(train, eval) prompts: all of ``examples`` and ``cfg.eval_prompts`` when given, else a
    seeded hold-out of ``eval_num_prompts`` training prompts (none when eval_steps is 0)."""
    from tether.data import load_prompt_dataset
    from tether.eval.heldout import split_eval_prompts

    if not cfg.eval_steps or not cfg.eval_generate:
        return examples, []
    if cfg.eval_prompts:
        held = load_prompt_dataset(
            cfg.eval_prompts,
            tokenizer,
            max_prompt_length=cfg.max_prompt_length,
            as_chat=cfg.as_chat,
        )
        return examples, list(held)[: cfg.eval_num_prompts]
    return split_eval_prompts(examples, cfg.eval_num_prompts, cfg.seed, global_batch)


def make_evaluator(
    cfg: Any, tokenizer: Any, prompts: list[Any], proxy: str | None, run_path: Any, acc: Any
) -> Any:
    """The run's :class:`tether.eval.heldout.HeldOutEvaluator`, or None when eval_steps is 0."""
    from tether.eval.heldout import HeldOutEvaluator

    if not cfg.eval_steps or not cfg.eval_generate:
        return None
    return HeldOutEvaluator(cfg, tokenizer, prompts, proxy, run_path, acc)


def save_policy_to(model: nn.Module, tokenizer: Any) -> Any:
    """A ``save(dir)`` that writes the policy (adapter for LoRA) and tokenizer: for ``final/``
    (:meth:`RunDir.write_final`) and ``best/``. ``model``: the bare policy model, not the
    prepared module. A LoRA adapter records its base model as configured (an embedded name, a
    hub id, or a local path relative to ``dir``; see
    :func:`tether.models.loading.make_adapter_base_portable`), never this machine's cache path,
    so the run directory can move."""

    from tether.models.loading import make_adapter_base_portable
    from tether.models.sharding import ModelSaver

    # a sharded model's weights are gathered first, on every process (ModelSaver.collect)
    return ModelSaver(model, tokenizer, after=make_adapter_base_portable)
