"""Offline DPO-family training (``tether train dpo``).

DPO (Rafailov et al. 2023, arXiv:2305.18290) optimises reward − β·KL(π_θ‖π_ref) implicitly, from
preference pairs. The loop: one concatenated forward of chosen and rejected responses (B pairs →
2B rows), per-sequence log-probs from tether's chunked head (only response positions computed),
reference log-probs from one of the four reference kinds (``precomputed`` by default: computed once
for the whole dataset before training, then free), a loss from :func:`tether.core.losses.dpo_loss`,
gradient accumulation, an LR schedule, optional LoRA and bf16 autocast (log-softmax and loss in
fp32). The KL to the reference is measured, not assumed: every logging step reports, on the
chosen responses (teacher-forced, so these describe the policy along the data, not on its own
samples):

* ``kl/chosen_logratio``: Σ_t log π_θ − log π_ref per sequence (the chosen implicit reward / β);
* ``kl/chosen_k3``: Σ_t k3 per sequence (non-negative);
* ``kl/chosen_exact``: Σ_t KL(π_θ(·|prefix) ‖ π_ref(·|prefix)) per sequence, exact over the
  vocabulary, on ``exact_kl_samples`` chosen responses (needs a live reference; with the
  precomputed one a frozen copy is kept for this metric only).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any

import torch

from tether.configs.dpo import DPOConfig  # the config lives in tether.configs (no torch)
from tether.core.kl import exact_from_logits, k3
from tether.core.losses import dpo_loss
from tether.core.masked import masked_sum
from tether.data import PreferenceExample, PromptExample, collate_preferences, load_prompt_dataset
from tether.models import cache_dir, forward_logprobs
from tether.models.loading import model_context_length
from tether.models.numerics import HALF_PRECISIONS
from tether.reference import (
    CopyReference,
    PrecomputedReference,
    ReferencePolicy,
    make_reference,
)
from tether.runs.progress import Progress
from tether.train.common import (
    DataCursor,
    PolicyLogProbs,
    load_preference_split,
    load_trainable_policy,
    make_accelerator,
    make_evaluator,
    model_state_for_checkpoint,
    optimizer_step,
    prepare_training,
    resolve_mixed_precision,
    save_policy_to,
    split_micro_batches,
    start_run,
)
from tether.train.distributed import Dist, MetricSums, global_count, memory_metrics
from tether.train.guards import StepGuard


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, mean: bool) -> torch.Tensor:
    """(2B, T−1) per-token log-probs and response mask → (2B,) per-sequence sum (or mean)."""
    total = masked_sum(token_logps, mask, dim=-1)  # (2B,)
    if mean:
        return total / mask.sum(-1).clamp(min=1).to(total.dtype)
    return total


def split_data(
    cfg: DPOConfig, tokenizer: Any, context_length: int | None = None
) -> tuple[list[PreferenceExample], list[PreferenceExample], str]:
    """Train and eval examples, and a fingerprint of both (keys the precomputed reference).

    A pair longer than the model's context after the ``max_length`` truncation is a
    ``DataError`` naming the file and the row. ``context_length``: the model's positions
    (:func:`tether.models.loading.model_context_length` of the loaded model); default: read
    from ``cfg.model``'s config (on disk, never the network; unknown: no check).
    """
    if context_length is None:
        context_length = model_context_length(cfg.model)
    return load_preference_split(
        tokenizer,
        cfg.train_data,
        cfg.eval_data,
        cfg.eval_fraction,
        cfg.seed,
        context_length=context_length,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        as_chat=cfg.as_chat,
    )


def _batches(examples: list[PreferenceExample], size: int, pad_id: int):
    for s in range(0, len(examples), size):
        yield collate_preferences(examples[s : s + size], pad_id)


def _with_progress(batches: Any, total: int, description: str) -> Any:
    """Yield ``batches`` with a progress bar (plain lines every ~10% without a terminal); the bar
    only appears once the first batch is asked for, so a cache hit shows nothing."""
    from tether.runs.progress import Progress

    with Progress(total=total, description=description, metrics=["pairs"]) as bar:
        every, pairs = max(1, total // 10), 0
        for i, batch in enumerate(batches, 1):
            yield batch
            pairs += int(batch["input_ids"].shape[0]) // 2  # rows: B chosen, then B rejected
            if i == total or i % every == 0:
                bar.update(i, {"pairs": pairs})


def build_reference(
    cfg: DPOConfig,
    model: Any,
    examples: list[PreferenceExample],
    data_fp: str,
    pad_id: int,
    accelerator: Any = None,
) -> tuple[ReferencePolicy, ReferencePolicy | None]:
    """The reference, and (for precomputed) a live copy used only for the exact-KL metric.

    A precomputed reference's cache is shared by every process: the main process builds it (or
    finds it), the others wait at a barrier and then load it."""
    kind = cfg.reference_kind
    if kind == "precomputed" and resolve_mixed_precision(cfg.mixed_precision) in HALF_PRECISIONS:
        warnings.warn(
            f"reference=precomputed under mixed_precision={cfg.mixed_precision}: the cached "
            "reference log-probs round differently from the training forward's (other batches), "
            "so the implicit rewards carry half-precision noise (the step-0 loss is not log 2); "
            "reference=auto uses a live reference on the training batch instead",
            stacklevel=2,
        )
    if kind == "precomputed":
        total = -(-len(examples) // cfg.micro_batch_size)

        def build() -> PrecomputedReference:
            return PrecomputedReference.build(
                model,
                _with_progress(
                    _batches(examples, cfg.micro_batch_size, pad_id), total, "reference log-probs"
                ),
                cache_dir() / "reference",
                data_fingerprint=data_fp,
            )

        if accelerator is None or accelerator.num_processes == 1:
            ref = build()
        else:
            if accelerator.is_main_process:
                ref = build()
            accelerator.wait_for_everyone()
            if not accelerator.is_main_process:
                ref = build()  # the main process's cache: loaded, not recomputed
        live = None
        if cfg.exact_kl_samples > 0 or (cfg.eval_generate and cfg.eval_steps):
            live = (
                make_reference("adapter", model)
                if hasattr(model, "peft_config")
                else CopyReference(model)
            )
        return ref, live
    dtype = torch.bfloat16 if cfg.ref_dtype == "bfloat16" else None
    ref = make_reference(kind, model, dtype=dtype, sync_alpha=cfg.sync_alpha, sync_tau=cfg.sync_tau)
    return ref, ref


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def dpo_step_loss(
    policy: torch.nn.Module,
    reference: ReferencePolicy,
    batch: dict[str, torch.Tensor],
    cfg: DPOConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (mean over pairs) and detached per-pair/per-row statistics for one micro-batch."""
    ids, am = batch["input_ids"], batch["attention_mask"]
    resp = batch["response_mask"][:, 1:]  # (2B, T−1): positions predicting response tokens
    token_logps, _ = policy(ids, am, resp)  # (2B, T−1)
    ref_token_logps = reference.logprobs(ids, am, resp).logprobs.to(token_logps.device)
    seq = sequence_logps(token_logps, resp, cfg.mean_logps)  # (2B,)
    ref_seq = sequence_logps(ref_token_logps, resp, cfg.mean_logps)
    b = ids.shape[0] // 2
    out = dpo_loss(
        seq[:b],
        seq[b:],
        ref_seq[:b],
        ref_seq[b:],
        cfg.beta,
        cfg.loss_type,
        label_smoothing=cfg.label_smoothing,
        chi2_max_reward=cfg.chi2_max_reward,
    )
    chosen_resp = resp[:b]
    log_ratio = (token_logps[:b] - ref_token_logps[:b]).detach()  # (B, T−1)
    stats = {
        "loss": out.losses.detach(),
        "rewards/chosen": out.chosen_rewards,
        "rewards/rejected": out.rejected_rewards,
        "rewards/margin": out.margins,
        "rewards/accuracy": out.accuracy,
        "kl/chosen_logratio": masked_sum(log_ratio, chosen_resp, dim=-1),
        "kl/chosen_k3": masked_sum(
            k3(token_logps[:b].detach(), ref_token_logps[:b]), chosen_resp, dim=-1
        ),
        "logps/chosen": seq[:b].detach(),
        "logps/rejected": seq[b:].detach(),
    }
    return out.losses.mean(), stats


@torch.no_grad()
def exact_chosen_kl(
    model: Any, live_ref: ReferencePolicy, batch: dict[str, torch.Tensor], n: int
) -> torch.Tensor:
    """(n,) exact Σ_t KL(π_θ‖π_ref) over the vocabulary along the first n chosen responses."""
    ids, am = batch["input_ids"][:n], batch["attention_mask"][:n]
    resp = batch["response_mask"][:n, 1:]
    was = model.training
    model.eval()
    try:
        pol = forward_logprobs(model, ids, am, mask=resp, return_logits=True)
    finally:
        model.train(was)
    ref = live_ref.logprobs(ids, am, resp, return_logits=True)
    per_pos = exact_from_logits(pol.logits, ref.logits.to(pol.logits.device), resp)  # (n, T−1)
    return per_pos.sum(-1)


def _mean_stats(
    chunks: list[dict[str, torch.Tensor]], dist: Dist | None = None
) -> dict[str, float]:
    """Each statistic's mean over every pair of ``chunks`` (of every process with ``dist``)."""
    sums = MetricSums()
    for c in chunks:
        for k, v in c.items():
            v = v.detach().float().reshape(-1)
            sums.ratio(k, v.sum(), v.numel())
    return sums.reduce(dist or Dist())


@torch.no_grad()
def evaluate(
    policy: torch.nn.Module,
    reference: ReferencePolicy,
    examples: list[PreferenceExample],
    cfg: DPOConfig,
    pad_id: int,
    device: torch.device,
) -> dict[str, float]:
    """Held-out loss, implicit-reward accuracy and margins over all eval examples."""
    was = policy.training
    policy.eval()
    try:
        chunks = [
            dpo_step_loss(policy, reference, _to(b, device), cfg)[1]
            for b in _batches(examples, cfg.micro_batch_size, pad_id)
        ]
    finally:
        policy.train(was)
    return {f"eval/{k}": v for k, v in _mean_stats(chunks).items()}


def heldout_prompts(
    cfg: DPOConfig, tokenizer: Any, eval_ex: list[PreferenceExample]
) -> list[PromptExample]:
    """The prompts held-out sampling uses: ``eval_prompts`` if given, else the distinct prompts
    of the held-out pairs, in order."""
    if not cfg.eval_generate:
        return []
    if cfg.eval_prompts:
        held = load_prompt_dataset(
            cfg.eval_prompts,
            tokenizer,
            max_prompt_length=cfg.max_prompt_length,
            as_chat=cfg.as_chat,
        )
        return list(held)[: cfg.eval_num_prompts]
    seen: dict[str, PromptExample] = {}
    for e in eval_ex:
        if e.prompt not in seen:
            seen[e.prompt] = PromptExample(e.index, e.prompt, list(e.prompt_ids), None)
    if not seen:
        raise ValueError(
            "held-out sampling needs eval prompts: give eval_prompts, hold out pairs "
            "(eval_data / eval_fraction > 0), or set eval_generate=false"
        )
    return list(seen.values())[: cfg.eval_num_prompts]


def train(cfg: DPOConfig) -> dict[str, float]:
    """Run offline DPO as configured; returns the final metrics."""
    acc = make_accelerator(cfg)
    run = start_run(cfg, acc)
    dist = Dist(acc)
    policy = load_trainable_policy(cfg)
    tok = policy.tokenizer
    pad_id = tok.pad_token_id
    train_ex, eval_ex, data_fp = split_data(cfg, tok)
    model = policy.model.to(acc.device)
    # the reference is computed in the precision the policy trains in: at step 0, π = π_ref
    with acc.autocast():
        reference, live_ref = build_reference(cfg, model, train_ex + eval_ex, data_fp, pad_id, acc)

    module, optimizer, scheduler = prepare_training(
        acc, cfg, PolicyLogProbs(model), shard=model, reference=live_ref
    )
    guard = StepGuard(cfg.max_bad_steps, run.path)
    step, states = run.restore(models={"policy": model}, optimizer=optimizer, scheduler=scheduler)
    cursor = DataCursor(
        len(train_ex), cfg.batch_size, cfg.seed, acc.num_processes, acc.process_index
    )
    evaluator = make_evaluator(
        cfg, tok, heldout_prompts(cfg, tok, eval_ex), cfg.reward, run.path, acc
    )
    # the steps since the last log line: saved in checkpoints, so a resumed run logs the same
    # means as an uninterrupted one
    window: list[dict[str, torch.Tensor]] = []
    tokens, window_steps, t0 = 0, 0, time.perf_counter()
    if states:
        cursor.load_state_dict(states["cursor"])
        reference.load_state_dict(states["reference"])
        guard.load_state_dict(states.get("guard", guard.state_dict()))
        saved_window = states.get("log_window", {})
        window = list(saved_window.get("stats", []))
        tokens, window_steps = saved_window.get("tokens", 0), saved_window.get("steps", 0)
        if evaluator is not None and "evaluator" in states:
            evaluator.load_state_dict(states["evaluator"])

    final: dict[str, float] = {}
    save_best = save_policy_to(model, tok)
    n_micro = cfg.gradient_accumulation_steps
    with Progress(
        cfg.max_steps, initial=step, metrics=("loss", "rewards/accuracy"), accelerator=acc
    ) as bar:
        if evaluator is not None:
            evaluator.note = bar.note
            if step == 0:
                final.update(evaluator.evaluate(model, live_ref, 0, acc.autocast))
                evaluator.track(0, final, save_best)
                run.log(0, final)
                bar.exclude(final["eval/seconds"])
                t0 = time.perf_counter()
        while step < cfg.max_steps:
            module.train()
            guard.step, mark, bad = step + 1, len(window), guard.total
            micro = split_micro_batches(cursor.next_indices(), n_micro)
            for i, idx in enumerate(micro):
                batch = _to(collate_preferences([train_ex[j] for j in idx], pad_id), acc.device)
                sync = acc.no_sync(module) if i < len(micro) - 1 else contextlib.nullcontext()
                with sync, acc.autocast():
                    loss, stats = dpo_step_loss(module, reference, batch, cfg)
                    acc.backward(loss / len(micro))
                window.append(stats)
                tokens += int(batch["attention_mask"].sum())
            grad_norm = optimizer_step(
                acc, module, optimizer, scheduler, cfg.max_grad_norm, guard, loss.detach()
            )
            step += 1
            window_steps += 1
            if guard.total > bad:  # skipped: its non-finite statistics stay out of the means
                del window[mark:]
            reference.on_step(model, step)

            if step % cfg.logging_steps == 0 or step == cfg.max_steps:
                if live_ref is not None and cfg.exact_kl_samples > 0:
                    exact = exact_chosen_kl(
                        model,
                        live_ref,
                        batch,
                        min(cfg.exact_kl_samples, batch["input_ids"].shape[0] // 2),
                    )
                    window.append({"kl/chosen_exact": exact})
                metrics = _mean_stats(window, dist) if window else {}  # every process's pairs
                all_tokens = global_count(dist, tokens)
                elapsed = time.perf_counter() - t0
                metrics.update(
                    {
                        "lr": scheduler.get_last_lr()[0],
                        "tokens_per_s": all_tokens / max(elapsed, 1e-9),
                        "s_per_step": elapsed / window_steps,
                    }
                )
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                metrics.update(guard.metrics())
                if step == cfg.max_steps:  # what each process held (collective)
                    metrics.update(memory_metrics(dist, module, optimizer))
                run.log(step, metrics)
                bar.update(step, metrics)
                final.update(metrics)
                window, tokens, window_steps, t0 = [], 0, 0, time.perf_counter()
            else:
                bar.update(step)
            stop = False
            if step % cfg.eval_steps == 0 or step == cfg.max_steps:
                t_eval = time.perf_counter()
                ev = (
                    evaluate(module, reference, eval_ex, cfg, pad_id, acc.device) if eval_ex else {}
                )
                if evaluator is not None:
                    ev.update(evaluator.evaluate(model, live_ref, step, acc.autocast))
                    evaluator.track(step, ev, save_best)
                    stop = evaluator.should_stop
                if ev:
                    run.log(step, ev)
                    final.update(ev)
                t0 += time.perf_counter() - t_eval  # s_per_step stays the training time
            if (cfg.save_steps and step % cfg.save_steps == 0) or step == cfg.max_steps or stop:
                run.save(
                    step,
                    models={"policy": model_state_for_checkpoint(model)},
                    optimizer=optimizer,
                    scheduler=scheduler,
                    states={
                        "cursor": cursor.state_dict(),
                        "reference": reference.state_dict(),
                        "guard": guard.state_dict(),
                        "log_window": {"stats": window, "tokens": tokens, "steps": window_steps},
                        **({} if evaluator is None else {"evaluator": evaluator.state_dict()}),
                    },
                )
            if stop:
                break
    run.write_final(save_best, models={"policy": model})
    run.close()
    return final
