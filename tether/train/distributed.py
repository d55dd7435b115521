"""Cross-process semantics of tether's trainers: what is reduced over processes, and how.

tether runs on ``accelerate`` (DDP, FSDP, DeepSpeed) and ``torch.distributed``. Every process holds
``batch_size`` examples of the global batch (``batch_size · num_processes``); the rule is that a run
on N processes computes what one process would on the global batch:

* **Gradients.** DDP/FSDP *average* gradients over processes. A loss normalised by a *global* count
  (tokens for ``token_mean``, sequences for ``seq_mean``) is therefore multiplied by the number of
  processes before ``backward``: the average of the N partial losses' gradients is then the
  gradient of the global loss (:func:`global_count`, :attr:`Dist.grad_scale`).
* **Statistics defined over the batch** (advantage whitening, the KL a controller sees, DPO
  accuracy and margins, PPO's early-stop KL, TRPO's surrogate, KL and Fisher-vector products) are
  sums over all processes divided by global counts, never means of per-process means
  (:meth:`Dist.sum`, :class:`MetricSums`).
* **Controllers** (β) see the global KL and the global number of samples, so their state is the
  same on every process and their horizon counts global samples; :func:`check_same` verifies it at
  every checkpoint.
* **Collectives.** Every process takes part in every collective, also with an empty batch (an
  online-DPO step whose pairs all tie on one process still runs a zero-weighted forward/backward).
* **Logged metrics** are reduced the same way before the main process writes them.

On one process every helper here is the identity, so the single-process code path is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


class Dist:
    """The process group of a run, as the few reductions the trainers need.

    Args:
        accelerator: the run's ``Accelerator`` (None: one process).
    """

    def __init__(self, accelerator: Any = None) -> None:
        self.world = 1 if accelerator is None else int(accelerator.num_processes)
        self.rank = 0 if accelerator is None else int(accelerator.process_index)
        self.device = torch.device("cpu") if accelerator is None else accelerator.device

    @property
    def grad_scale(self) -> float:
        """The factor on a globally normalised loss before ``backward`` (gradients are averaged)."""
        return float(self.world)

    def sum(self, x: Tensor) -> Tensor:
        """All-reduce sum of a tensor (a new tensor; the input's dtype and device)."""
        if self.world == 1:
            return x
        import torch.distributed as dist

        y = x.detach().to(self.device, copy=True)
        dist.all_reduce(y)
        return y.to(x.device)

    def sum_floats(self, *values: float) -> list[float]:
        """All-reduce sum of Python floats, in float64 (one collective)."""
        if self.world == 1:
            return [float(v) for v in values]
        t = self.sum(torch.tensor(values, dtype=torch.float64, device=self.device))
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order, on every process."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def global_count(dist: Dist, count: float) -> float:
    """Σ over processes of a local count (tokens, sequences, pairs)."""
    return dist.sum_floats(count)[0]


class MetricSums:
    """Metrics accumulated as (numerator, denominator) pairs and reduced over processes on read.

    ``mean(name, v, w)`` records a value that is a mean over ``w`` items (tokens, samples, pairs):
    the result is Σ v·w / Σ w over every call on every process, i.e. the metric's definition over
    the global batch, not a mean of per-process means (0 when Σ w = 0, as a masked mean of nothing).
    ``total(name, v)`` records a sum (the result is Σ v). ``reduce`` is a collective: every process
    must call it.
    """

    def __init__(self) -> None:
        self.parts: dict[str, list[float]] = {}

    def mean(self, name: str, value: float | Tensor, weight: float | Tensor = 1.0) -> None:
        w = float(weight)
        if w <= 0:
            return
        part = self.parts.setdefault(name, [0.0, 0.0])
        part[0] += float(value) * w
        part[1] += w

    def ratio(self, name: str, numerator: float | Tensor, denominator: float | Tensor) -> None:
        """A metric defined as Σ numerator / Σ denominator (e.g. a masked sum and its count)."""
        part = self.parts.setdefault(name, [0.0, 0.0])
        part[0] += float(numerator)
        part[1] += float(denominator)

    def total(self, name: str, value: float | Tensor) -> None:
        part = self.parts.setdefault(name, [0.0, math.nan])
        part[0] += float(value)

    def reduce(self, dist: Dist) -> dict[str, float]:
        """The metrics over all processes (identical on every process)."""
        merged: dict[str, list[float]] = {}
        for parts in dist.gather(self.parts):
            for name, (num, den) in parts.items():
                part = merged.setdefault(name, [0.0, den if math.isnan(den) else 0.0])
                part[0] += num
                if not math.isnan(den):
                    part[1] += den
        out = {}
        for name, (num, den) in sorted(merged.items()):
            if math.isnan(den):
                out[name] = num
            else:
                out[name] = num / den if den > 0 else 0.0
        return out


def check_same(dist: Dist, name: str, state: Mapping[str, Any] | Sequence[Any] | float) -> None:
    """Raise if ``state`` (e.g. a controller's ``state_dict()``) differs between processes: state
    that every process must hold identically (β, a controller's integral) has diverged."""
    if dist.world == 1:
        return
    states = dist.gather(state)
    first = states[0]
    for rank, other in enumerate(states[1:], 1):
        if other != first:
            raise RuntimeError(
                f"{name} differs between processes (rank 0: {first}, rank {rank}: {other}); "
                "it must be updated from globally reduced statistics"
            )


MEMORY_PARTS = ("params", "grads", "optimizer", "peak_rss")
"""What :func:`memory_metrics` reports per process, in MiB."""


def memory_metrics(dist: Dist, module: Any, optimizer: Any) -> dict[str, float]:
    """This run's memory per process, as ``memory/rank{r}/{part}_mib`` for every rank (a
    collective: every process calls it): the bytes of the parameters this process holds (a
    sharded parameter: its local shard), of their gradients at their peak (one per trainable
    parameter, the same sharding), of the optimizer state (AdamW's moments and step counts), and
    the process's peak resident set size. ``memory/model_state_mib``: the largest
    params + grads + optimizer over the processes."""
    import resource

    from tether.models.sharding import local_bytes

    params = list(module.parameters())
    inner = getattr(optimizer, "optimizer", optimizer)
    state = [t for s in inner.state.values() for t in s.values() if isinstance(t, Tensor)]
    mine = [
        local_bytes(params),
        local_bytes([p for p in params if p.requires_grad]),
        local_bytes(state),
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
    ]
    out: dict[str, float] = {}
    totals = []
    for rank, parts in enumerate(dist.gather(mine)):
        for name, value in zip(MEMORY_PARTS, parts, strict=True):
            out[f"memory/rank{rank}/{name}_mib"] = value / 2**20
        totals.append(sum(parts[:3]) / 2**20)
    out["memory/model_state_mib"] = max(totals)
    return out
