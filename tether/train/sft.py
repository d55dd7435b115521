"""Supervised fine-tuning (``tether train sft``): the reference model the other trainers start from.

Maximum likelihood on demonstrations: minimise the token-mean negative log-likelihood

    L(θ) = − Σ_{b,t} m_{b,t} · log π_θ(x_{b,t} | x_{b,<t}) / Σ_{b,t} m_{b,t}

over the loss tokens m of each optimizer step's global batch (completions / assistant turns by
default, every token with ``completion_only_loss=false``; rows in TRL's column conventions, see
:mod:`tether.data.sft`). The denominator is the step's loss-token count summed over every
micro-batch and every process (:func:`tether.train.distributed.global_count`), so gradient
accumulation and N processes give the gradient one process computes on the whole global batch.
Log-probs come from tether's chunked fp32 head (:func:`tether.models.forward_logprobs`), computed
only at loss positions; ``packing`` runs the backbone padding-free (same loss up to float
summation order). Held-out NLL and perplexity over the eval rows' loss tokens are measured before
training, every ``eval_steps`` and at the end.

The run's ``final/`` (``save_pretrained`` + tokenizer; for LoRA the adapter directory, which
:func:`tether.models.load_policy` loads onto its base model) is what ``model=`` of the other
trainers takes: their reference is then this SFT model.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import torch
from torch import Tensor

from tether.configs.sft import SFTConfig  # the config lives in tether.configs (no torch)
from tether.core.losses import nll_sum
from tether.data.sft import SFTExample, collate_sft, load_sft_dataset
from tether.models.loading import model_context_length
from tether.runs.config import ConfigError
from tether.runs.progress import Progress
from tether.train.common import (
    DataCursor,
    PolicyLogProbs,
    load_trainable_policy,
    make_accelerator,
    model_state_for_checkpoint,
    optimizer_step,
    prepare_training,
    save_policy_to,
    split_micro_batches,
    start_run,
)
from tether.train.distributed import Dist, global_count
from tether.train.guards import StepGuard


class SFTLogProbs(PolicyLogProbs):
    """The policy as a module returning (B, T−1) fp32 log-probs at the ``mask`` positions, with
    the run's packing choice (``accelerator.prepare`` wraps this module)."""

    def __init__(self, model: torch.nn.Module, packing: bool) -> None:
        super().__init__(model)
        self.packing = packing

    def forward(  # type: ignore[override]
        self, input_ids: Tensor, attention_mask: Tensor, mask: Tensor
    ) -> Tensor:
        from tether.models import forward_logprobs

        return forward_logprobs(
            self.model, input_ids, attention_mask, mask=mask, packing=self.packing
        ).logprobs


def split_data(cfg: SFTConfig, tokenizer: Any) -> tuple[list[SFTExample], list[SFTExample]]:
    """Train and held-out examples: ``eval_data`` when given, else a seeded ``eval_fraction``
    split of ``train_data`` (the same split for every run with the same seed)."""
    kwargs = dict(
        max_length=cfg.max_length,
        as_chat=cfg.as_chat,
        completion_only_loss=cfg.completion_only_loss,
        truncate=cfg.truncate,
    )
    examples = list(load_sft_dataset(cfg.train_data, tokenizer, **kwargs))
    if cfg.eval_data:
        return examples, list(load_sft_dataset(cfg.eval_data, tokenizer, **kwargs))
    n_eval = int(round(cfg.eval_fraction * len(examples)))
    g = torch.Generator().manual_seed(cfg.seed)
    held = set(torch.randperm(len(examples), generator=g)[:n_eval].tolist())
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [examples[i] for i in sorted(held)]


def check_context(cfg: SFTConfig, model: Any) -> None:
    """``max_length`` must fit the model's positions (rows are cut to it, so then all fit)."""
    context = model_context_length(model)
    if context is not None and cfg.max_length > context:
        raise ConfigError(
            f"max_length ({cfg.max_length}) is more than the context of {cfg.model!r} "
            f"({context} positions, config.max_position_embeddings): set max_length ≤ {context}"
        )


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def micro_nll(module: Any, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    """(Σ NLL over the batch's loss tokens (fp32 scalar, with grad), number of loss tokens)."""
    mask = batch["loss_mask"][:, 1:]  # (B, T−1): positions predicting a loss token
    logps = module(batch["input_ids"], batch["attention_mask"], mask)  # (B, T−1)
    return nll_sum(logps, mask), int(mask.sum())


@torch.no_grad()
def evaluate(
    module: Any, examples: list[SFTExample], batch_size: int, pad_id: int, acc: Any
) -> dict[str, float]:
    """Held-out token-mean NLL over the loss tokens of all ``examples``, and its perplexity.

    Every process evaluates every example (the same numbers everywhere, no collective)."""
    was = module.training
    module.eval()
    total, count = 0.0, 0
    try:
        for s in range(0, len(examples), batch_size):
            batch = _to(collate_sft(examples[s : s + batch_size], pad_id), acc.device)
            with acc.autocast():
                nll, n = micro_nll(module, batch)
            total += float(nll)
            count += n
    finally:
        module.train(was)
    nll = total / max(count, 1)
    return {"eval/nll": nll, "eval/ppl": math.exp(min(nll, 50.0)), "eval/tokens": float(count)}


def window_metrics(window: list[dict[str, float]], dist: Dist) -> dict[str, float]:
    """The logged training metrics of the steps since the last log line, over every process:
    ``loss``, the mean over steps of each step's token-mean NLL (the optimised objective), and
    ``nll``, the token-mean NLL over all the window's loss tokens."""
    if not window:
        return {}
    local = [w["nll_sum"] for w in window] + [w["tokens"] for w in window]
    reduced = dist.sum_floats(*local)
    sums, counts = reduced[: len(window)], reduced[len(window) :]
    return {
        "loss": sum(s / max(c, 1.0) for s, c in zip(sums, counts, strict=True)) / len(window),
        "nll": sum(sums) / max(sum(counts), 1.0),
    }


def train(cfg: SFTConfig) -> dict[str, float]:
    """Run supervised fine-tuning as configured; returns the final metrics (with the held-out
    NLL before training as ``eval/nll_before``)."""
    if not cfg.train_data:
        raise ConfigError(
            "train_data is required: a data file of SFT rows (prompt/completion, messages or text)"
        )
    acc = make_accelerator(cfg)
    run = start_run(cfg, acc)
    dist = Dist(acc)
    policy = load_trainable_policy(cfg)
    tok = policy.tokenizer
    pad_id = tok.pad_token_id
    check_context(cfg, policy.model)
    train_ex, eval_ex = split_data(cfg, tok)
    model = policy.model.to(acc.device)

    module, optimizer, scheduler = prepare_training(
        acc, cfg, SFTLogProbs(model, cfg.packing), shard=model
    )
    guard = StepGuard(cfg.max_bad_steps, run.path)
    step, states = run.restore(models={"policy": model}, optimizer=optimizer, scheduler=scheduler)
    cursor = DataCursor(
        len(train_ex), cfg.batch_size, cfg.seed, acc.num_processes, acc.process_index
    )
    # the steps since the last log line (saved in checkpoints, so a resumed run logs the same
    # means as an uninterrupted one), the loss tokens trained on so far, the NLL before training
    window: list[dict[str, float]] = []
    seen_tokens, all_tokens, window_steps, t0 = 0.0, 0, 0, time.perf_counter()
    nll_before: float | None = None
    if states:
        cursor.load_state_dict(states["cursor"])
        guard.load_state_dict(states["guard"])
        saved = states["log_window"]
        window, all_tokens, window_steps = (
            list(saved["steps_stats"]),
            saved["tokens"],
            saved["steps"],
        )
        seen_tokens, nll_before = states["seen_tokens"], states["nll_before"]

    final: dict[str, float] = {}
    n_micro = cfg.gradient_accumulation_steps
    with Progress(
        cfg.max_steps, initial=step, metrics=("loss", "eval/nll"), accelerator=acc
    ) as bar:
        if eval_ex and step == 0:
            ev = evaluate(module, eval_ex, cfg.micro_batch_size, pad_id, acc)
            nll_before = ev["eval/nll"]
            ev["eval/nll_before"] = nll_before
            run.log(0, ev)
            bar.update(0, ev)
            final.update(ev)
            t0 = time.perf_counter()
        while step < cfg.max_steps:
            module.train()
            guard.step = step + 1
            micro = [
                _to(collate_sft([train_ex[j] for j in idx], pad_id), acc.device)
                for idx in split_micro_batches(cursor.next_indices(), n_micro)
            ]
            local_tokens = sum(int(b["loss_mask"][:, 1:].sum()) for b in micro)
            # the step's loss-token count over every micro-batch of every process
            denom = max(global_count(dist, local_tokens), 1.0)
            step_nll = torch.zeros((), device=acc.device)
            for i, batch in enumerate(micro):
                sync = acc.no_sync(module) if i < len(micro) - 1 else contextlib.nullcontext()
                with sync, acc.autocast():
                    nll, _ = micro_nll(module, batch)
                    # DDP averages gradients over processes: × world restores the global mean
                    acc.backward(nll / denom * dist.grad_scale)
                step_nll += nll.detach()
                all_tokens += int(batch["attention_mask"].sum())
            bad = guard.total
            grad_norm = optimizer_step(
                acc, module, optimizer, scheduler, cfg.max_grad_norm, guard, step_nll / denom
            )
            step += 1
            window_steps += 1
            if guard.total == bad:  # a skipped step's non-finite loss stays out of the means
                window.append({"nll_sum": float(step_nll), "tokens": float(local_tokens)})
                seen_tokens += denom

            if step % cfg.logging_steps == 0 or step == cfg.max_steps:
                metrics = window_metrics(window, dist)
                elapsed = time.perf_counter() - t0
                metrics.update(
                    {
                        "tokens": seen_tokens,
                        "lr": scheduler.get_last_lr()[0],
                        "tokens_per_s": global_count(dist, all_tokens) / max(elapsed, 1e-9),
                        "s_per_step": elapsed / window_steps,
                    }
                )
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                metrics.update(guard.metrics())
                run.log(step, metrics)
                bar.update(step, metrics)
                final.update(metrics)
                window, all_tokens, window_steps, t0 = [], 0, 0, time.perf_counter()
            else:
                bar.update(step)
            at_eval = (cfg.eval_steps and step % cfg.eval_steps == 0) or step == cfg.max_steps
            if eval_ex and at_eval:
                t_eval = time.perf_counter()
                ev = evaluate(module, eval_ex, cfg.micro_batch_size, pad_id, acc)
                if nll_before is not None:
                    ev["eval/nll_before"] = nll_before
                run.log(step, ev)
                bar.update(step, ev)
                final.update(ev)
                t0 += time.perf_counter() - t_eval  # s_per_step stays the training time
            if (cfg.save_steps and step % cfg.save_steps == 0) or step == cfg.max_steps:
                run.save(
                    step,
                    models={"policy": model_state_for_checkpoint(model)},
                    optimizer=optimizer,
                    scheduler=scheduler,
                    states={
                        "cursor": cursor.state_dict(),
                        "guard": guard.state_dict(),
                        "log_window": {
                            "steps_stats": window,
                            "tokens": all_tokens,
                            "steps": window_steps,
                        },
                        "seen_tokens": seen_tokens,
                        "nll_before": nll_before,
                    },
                )
    run.write_final(save_policy_to(model, tok), models={"policy": model})
    run.close()
    return final
