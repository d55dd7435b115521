"""Online DPO with a judge (``tether train online_dpo``): OAIF, Guo et al. 2024 (arXiv:2402.04792).

Each step: sample two completions per prompt from the *current* policy (KV cache), label the pair
with a judge (any reward callable: VADER, a trained reward model, ``module:function``), and update
with a DPO-family loss against the reference. Because the pairs are on-policy, the KL to the
reference is measured where it matters, on the policy's own samples: ``kl/k1`` and ``kl/k3`` are
unbiased per-sequence estimates (Σ over response tokens) of KL(π_θ‖π_ref), both sides computed in
``kl_precision`` (fp32 by default). The loss's log-ratio has the same value: one update per
rollout means the training forward is at θ_old, so the reference is carried into its numerics
(:func:`tether.core.kl.anchored_ref_logp`) and bf16 rounding noise does not enter the loss.

β schedule (``beta_schedule``): ``constant``; ``linear`` from ``beta`` to ``beta_end`` over
``max_steps``; or ``adaptive``: β follows :class:`tether.core.controllers.AdaptiveKL` to hold the
measured on-policy KL at ``kl_target`` (Ziegler et al. 2019), which no peer offers for DPO.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from tether.configs.online_dpo import OnlineDPOConfig  # the config lives in tether.configs
from tether.core.controllers import AdaptiveKL, FixedKL, KLController
from tether.core.kl import anchored_ref_logp, k1, k3
from tether.core.losses import dpo_loss
from tether.core.masked import masked_sum
from tether.data import load_prompt_dataset
from tether.models import SamplingConfig, generate
from tether.models.generation import sample_seeds
from tether.models.loading import check_generation_fits
from tether.models.numerics import (
    check_fp32_weights,
    fp32_policy_logprobs,
    kl_numerics,
    separate_kl_forward,
)
from tether.models.rollout import params_sharded, rollout_weights
from tether.reference import make_reference
from tether.rewards import call_reward, make_reward
from tether.runs.progress import Progress
from tether.train.common import (
    DataCursor,
    PolicyLogProbs,
    load_trainable_policy,
    make_accelerator,
    make_evaluator,
    model_state_for_checkpoint,
    optimizer_step,
    prepare_training,
    resolve_mixed_precision,
    save_policy_to,
    split_heldout_prompts,
    start_run,
)
from tether.train.distributed import Dist, MetricSums, check_same, global_count
from tether.train.dpo import sequence_logps
from tether.train.guards import StepGuard


def beta_controller(cfg: OnlineDPOConfig) -> KLController:
    if cfg.beta_schedule == "adaptive":
        return AdaptiveKL(init_beta=cfg.beta, target=cfg.kl_target, horizon=cfg.kl_horizon)
    return FixedKL(cfg.beta)


def scheduled_beta(cfg: OnlineDPOConfig, controller: KLController, step: int) -> float:
    """β for optimizer step ``step`` (0-based)."""
    if cfg.beta_schedule == "linear":
        frac = step / max(cfg.max_steps - 1, 1)
        return cfg.beta + (cfg.beta_end - cfg.beta) * frac
    return controller.beta


def pair_batch(
    rollout: Any, scores: list[float], gap: float
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Rows (2i, 2i+1) of a rollout are the two samples of prompt i; order them chosen-first.

    Returns the concatenated batch (chosen rows, then rejected rows; left-padded prompts, masks
    over the full sequence) and counts of kept pairs and ties.
    """
    n = len(scores) // 2
    chosen, rejected, ties = [], [], 0
    for i in range(n):
        a, b = 2 * i, 2 * i + 1
        if abs(scores[a] - scores[b]) <= gap:
            ties += 1
            continue
        hi, lo = (a, b) if scores[a] > scores[b] else (b, a)
        chosen.append(hi)
        rejected.append(lo)
    batch = rollout_rows(rollout, chosen + rejected)
    return batch, {"pairs": float(len(chosen)), "ties": float(ties)}


def rollout_rows(rollout: Any, rows: list[int]) -> dict[str, torch.Tensor]:
    """Rows ``rows`` of a rollout as a training batch (masks over the full sequence)."""
    order = torch.tensor(rows, dtype=torch.long)
    full_resp = torch.zeros_like(rollout.attention_mask)
    full_resp[:, rollout.prompt_length :] = rollout.response_mask
    return {
        "input_ids": rollout.input_ids[order],
        "attention_mask": rollout.attention_mask[order],
        "response_mask": full_resp[order],
    }


def train(cfg: OnlineDPOConfig) -> dict[str, float]:
    """Run online DPO as configured; returns the final metrics."""
    acc = make_accelerator(cfg)
    run = start_run(cfg, acc)
    judge = make_reward(cfg.judge)
    dist = Dist(acc)
    policy = load_trainable_policy(cfg)
    check_generation_fits(
        policy.model, cfg.max_prompt_length, cfg.max_new_tokens, model_name=cfg.model
    )
    tok = policy.tokenizer
    data, eval_prompts = split_heldout_prompts(
        cfg,
        tok,
        list(
            load_prompt_dataset(
                cfg.prompts, tok, max_prompt_length=cfg.max_prompt_length, as_chat=cfg.as_chat
            )
        ),
        cfg.batch_size * acc.num_processes,
    )
    model = policy.model.to(acc.device)
    reference = make_reference(cfg.reference, model)
    precision = resolve_mixed_precision(cfg.mixed_precision)
    if cfg.kl_precision == "fp32":
        check_fp32_weights(model, "policy")
    controller = beta_controller(cfg)
    sampling = SamplingConfig(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
    )

    module, optimizer, scheduler = prepare_training(
        acc, cfg, PolicyLogProbs(model), shard=model, reference=reference
    )
    guard = StepGuard(cfg.max_bad_steps, run.path)
    step, states = run.restore(models={"policy": model}, optimizer=optimizer, scheduler=scheduler)
    cursor = DataCursor(len(data), cfg.batch_size, cfg.seed, acc.num_processes, acc.process_index)
    evaluator = make_evaluator(cfg, tok, eval_prompts, cfg.judge, run.path, acc)
    if states:
        cursor.load_state_dict(states["cursor"])
        reference.load_state_dict(states["reference"])
        controller.load_state_dict(states["beta"])
        guard.load_state_dict(states.get("guard", guard.state_dict()))
        if evaluator is not None and "evaluator" in states:
            evaluator.load_state_dict(states["evaluator"])

    sampler = rollout_weights(
        model,
        cfg.rollout_dtype,
        resolve_mixed_precision(cfg.mixed_precision),
        sharded=params_sharded(acc, model),
    )
    final: dict[str, float] = {}
    save_best = save_policy_to(model, tok)
    # the steps since the last log line: saved in checkpoints, so a resumed run logs the same
    # means as an uninterrupted one
    window: list[dict[str, float]] = list(states.get("log_window", [])) if states else []
    with Progress(
        cfg.max_steps, initial=step, metrics=("score", "kl/k1", "beta"), accelerator=acc
    ) as bar:
        if evaluator is not None:
            evaluator.note = bar.note
            if step == 0:
                final.update(evaluator.evaluate(model, reference, 0, acc.autocast))
                evaluator.track(0, final, save_best)
                run.log(0, final)
                bar.exclude(final["eval/seconds"])
        t0 = time.perf_counter()
        while step < cfg.max_steps:
            examples = [data[i] for i in cursor.next_indices()]
            prompt_ids = [e.prompt_ids for e in examples for _ in range(2)]
            t_gen = time.perf_counter()
            if sampler is not None:
                sampler.sync()
            with acc.autocast():
                rollout = generate(
                    model,
                    tok,
                    prompt_ids,
                    sampling,
                    compute_logprobs=False,  # the training forward below is at θ_old
                    compute_sampler_logprobs=False,
                    sampler=None if sampler is None else sampler.model,
                    row_seeds=sample_seeds(
                        cfg.seed, step, dist.rank * len(prompt_ids), len(prompt_ids)
                    ),
                    synced_processes=params_sharded(acc, model),
                )
            gen_s = time.perf_counter() - t_gen
            texts = [
                tok.decode(
                    rollout.response_ids[i][rollout.response_mask[i]], skip_special_tokens=True
                )
                for i in range(len(prompt_ids))
            ]
            prompts_text = [e.prompt for e in examples for _ in range(2)]
            scores = call_reward(
                judge,
                prompts_text,
                texts,
                cfg.judge,
                step=step,
                rows=[e.index for e in examples for _ in range(2)],
            )
            batch, counts = pair_batch(rollout, list(scores), cfg.min_score_gap)
            beta = scheduled_beta(cfg, controller, step)
            sums = MetricSums()
            sums.ratio("score", sum(scores), len(scores))
            sums.total("pairs", counts["pairs"])
            sums.total("ties", counts["ties"])
            sums.mean("gen_s", gen_s)
            module.train()
            b = int(counts["pairs"])
            b_all = int(global_count(dist, b))  # every process takes the same branch
            if b_all > 0:
                if b == 0:
                    # No pair here, but the gradient all-reduce needs every process: a
                    # zero-weighted forward/backward on one sampled sequence joins it.
                    batch = rollout_rows(rollout, [0])
                ids, am = batch["input_ids"].to(acc.device), batch["attention_mask"].to(acc.device)
                resp = batch["response_mask"][:, 1:].to(acc.device)
                # Both sides of the KL in the KL's numerics; the loss's reference carried into the
                # training numerics (one update per rollout: this forward is at θ_old).
                with kl_numerics(cfg.kl_precision, acc.autocast, acc.device.type):
                    ref_lp = reference.logprobs(ids, am, resp, temperature=cfg.temperature).logprobs
                pol_kl = None
                if separate_kl_forward(cfg.kl_precision, precision, acc.device.type):
                    pol_kl = fp32_policy_logprobs(model, ids, am, resp, cfg.temperature)
                with acc.autocast():
                    token_logps, _ = module(ids, am, resp, cfg.temperature)
                    token_logps = token_logps.float()
                    behaviour = token_logps.detach()
                    if pol_kl is None:
                        pol_kl = behaviour
                    if b == 0:
                        loss = 0.0 * token_logps.sum()
                    else:
                        ref_loss = anchored_ref_logp(ref_lp, pol_kl, behaviour)
                        seq, ref_seq = (
                            sequence_logps(token_logps, resp, False),
                            sequence_logps(ref_loss, resp, False),
                        )
                        out = dpo_loss(
                            seq[:b],
                            seq[b:],
                            ref_seq[:b],
                            ref_seq[b:],
                            beta,
                            cfg.loss_type,
                            label_smoothing=cfg.label_smoothing,
                        )
                        # this process's share of the mean over every process's pairs
                        loss = out.losses.sum() / b_all
                acc.backward(loss * dist.grad_scale)
                guard.step = step + 1
                stats_grad = optimizer_step(
                    acc, module, optimizer, scheduler, cfg.max_grad_norm, guard, loss.detach()
                )
                if b > 0:
                    # on-policy KL: the samples came from π_θ before this update
                    kl1 = masked_sum(k1(pol_kl, ref_lp), resp, dim=-1)
                    kl3 = masked_sum(k3(pol_kl, ref_lp), resp, dim=-1)
                    sums.ratio("loss", out.losses.detach().sum(), b)
                    sums.ratio("rewards/accuracy", out.accuracy.sum(), b)
                    sums.ratio("rewards/margin", out.margins.sum(), b)
                    sums.ratio("kl/k1", kl1.sum(), 2 * b)
                    sums.ratio("kl/k3", kl3.sum(), 2 * b)
                    sums.ratio("response_length", resp.sum(), 2 * b)
            stats = sums.reduce(dist)
            stats["beta"] = beta
            if b_all > 0:
                if stats_grad is not None:
                    stats["grad_norm"] = stats_grad
                if math.isfinite(stats["kl/k1"]):
                    controller.update(max(stats["kl/k1"], 0.0), n_steps=2 * b_all)
            else:
                scheduler.step()  # no pair anywhere: no update, the schedule moves on
            optimizer.zero_grad(set_to_none=True)
            stats.update(guard.metrics())
            step += 1
            reference.on_step(model, step)
            window.append(stats)
            evaluated = evaluator is not None and (evaluator.due(step) or step == cfg.max_steps)
            eval_metrics: dict[str, float] = {}
            if evaluated:
                t_eval = time.perf_counter()
                eval_metrics = evaluator.evaluate(model, reference, step, acc.autocast)
                evaluator.track(step, eval_metrics, save_best)
                t0 += time.perf_counter() - t_eval  # s_per_step stays the training time
            if evaluated or step % cfg.logging_steps == 0 or step == cfg.max_steps:
                keys = {k for w in window for k in w}
                metrics = {
                    k: sum(w[k] for w in window if k in w) / sum(k in w for w in window)
                    for k in keys
                }
                metrics["lr"] = scheduler.get_last_lr()[0]
                metrics["s_per_step"] = (time.perf_counter() - t0) / len(window)
                metrics.update(eval_metrics)
                run.log(step, metrics)
                final.update(metrics)
                window, t0 = [], time.perf_counter()
            bar.update(step, final)
            stop = evaluator is not None and evaluator.should_stop
            if (cfg.save_steps and step % cfg.save_steps == 0) or step == cfg.max_steps or stop:
                check_same(dist, "beta controller", controller.state_dict())
                run.save(
                    step,
                    models={"policy": model_state_for_checkpoint(model)},
                    optimizer=optimizer,
                    scheduler=scheduler,
                    states={
                        "cursor": cursor.state_dict(),
                        "reference": reference.state_dict(),
                        "beta": controller.state_dict(),
                        "guard": guard.state_dict(),
                        "log_window": window,
                        **({} if evaluator is None else {"evaluator": evaluator.state_dict()}),
                    },
                )
            if stop:
                break
    run.write_final(save_best, models={"policy": model})
    run.close()
    return final
