"""Reward-model training on preference pairs (``tether train reward``).

The reward model r_φ (:class:`tether.rewards.model.RewardModel`) is fitted by maximum likelihood
under the Bradley–Terry model P(y_w ≻ y_l | x) = σ(r_φ(x, y_w) − r_φ(x, y_l)) (Bradley & Terry
1952), the loss of Ouyang et al. 2022 (arXiv:2203.02155 eq. 1), with an optional margin
(Llama 2, arXiv:2307.09288 eq. 2) and TRL's optional reward-centering term (Eisenstein et al.
2023, arXiv:2312.09244). The loop: one concatenated forward of chosen and rejected rows (B pairs
→ 2B rows, rewards read at each row's last real token), the loss from
:func:`tether.core.losses.bradley_terry_loss`, gradient accumulation, an LR schedule, gradient
clipping, optional LoRA and mixed precision (the head and the loss in fp32).

Logged every ``logging_steps`` (means over the steps since the last log, gathered over all
processes): ``loss``, ``accuracy`` (fraction of pairs with r_w > r_l), ``margin`` (r_w − r_l),
``rewards/chosen``, ``rewards/rejected``, ``rewards/mean`` and ``rewards/std`` (over every
chosen and rejected row), ``lr``, ``grad_norm`` (before clipping), ``examples_per_s`` (pairs,
all processes) and ``s_per_step``; with centering also ``bt_loss`` and ``center_penalty``. Before
training (step 0, the baseline), every ``eval_steps`` and at the end: the same statistics on the
held-out pairs as ``eval/loss``, ``eval/accuracy``, ``eval/margin``, ``eval/rewards/...``.

At the end the model is saved with :meth:`RewardModel.save` to ``<output_dir>/reward_model``
together with the mean and std of its rewards on (up to ``normalization_samples``) training
pairs, and :func:`tether.rewards.model.load_reward_model` turns it into a reward function.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from tether.configs.reward_model import RewardConfig  # the config lives in tether.configs
from tether.core.losses import bradley_terry_loss
from tether.data import PreferenceExample, collate_preferences
from tether.rewards.model import RewardModel, RewardNormalization, backbone_context_length
from tether.runs.checkpoint import trainable_state_dict
from tether.runs.progress import Progress
from tether.train.common import (
    DataCursor,
    load_preference_split,
    make_accelerator,
    optimizer_step,
    prepare_training,
    split_micro_batches,
    start_run,
)
from tether.train.guards import StepGuard

REWARD_MODEL_DIR = "reward_model"
"""Sub-directory of the run directory the trained reward model is saved to."""
CHECKPOINT_MODEL_NAME = "reward_model"
"""The model's name inside checkpoints."""


def centering_penalty(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """mean_b (r_w + r_l)²: TRL's ``center_rewards_coefficient`` term (Eisenstein et al. 2023,
    arXiv:2312.09244). Bradley–Terry fixes rewards only up to a constant; this pins the constant
    so that each pair's rewards sum to about 0. (B,), (B,) → scalar, float32."""
    return (chosen_rewards.float() + rejected_rewards.float()).pow(2).mean()


def reward_step_loss(
    model: nn.Module, batch: dict[str, Tensor], cfg: RewardConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss (mean over pairs) and detached statistics for one collated micro-batch.

    ``batch`` is :func:`tether.data.collate_preferences` output: rows 0..B−1 chosen, B..2B−1
    rejected. The statistics are per pair (B,) except ``rewards`` (2B,).
    """
    rewards = model(batch["input_ids"], batch["attention_mask"])  # (2B,)
    b = rewards.shape[0] // 2
    out = bradley_terry_loss(rewards[:b], rewards[b:], cfg.margin)
    bt = out.losses.mean()
    stats = {
        "loss": out.losses.detach(),
        "accuracy": out.accuracy,
        "margin": out.margins,
        "rewards/chosen": out.chosen_rewards,
        "rewards/rejected": out.rejected_rewards,
        "rewards": rewards.detach().float(),
    }
    if not cfg.center_rewards_coefficient:
        return bt, stats
    penalty = centering_penalty(rewards[:b], rewards[b:])
    loss = bt + cfg.center_rewards_coefficient * penalty
    stats["bt_loss"] = stats["loss"]
    stats["center_penalty"] = penalty.detach().expand(b)
    stats["loss"] = stats["loss"] + cfg.center_rewards_coefficient * stats["center_penalty"]
    return loss, stats


def summarize(chunks: list[dict[str, Tensor]], acc: Accelerator | None = None) -> dict[str, float]:
    """Means of the per-pair statistics of :func:`reward_step_loss`, plus ``rewards/mean`` and
    ``rewards/std`` over all rows; gathered across processes when ``acc`` is given."""
    out: dict[str, float] = {}
    for key in chunks[0]:
        values = torch.cat([c[key].reshape(-1).float() for c in chunks])
        if acc is not None:
            values = acc.gather(values)
        if key == "rewards":
            out["rewards/mean"] = values.mean().item()
            out["rewards/std"] = values.std(correction=0).item()
        else:
            out[key] = values.mean().item()
    return out


def split_data(
    cfg: RewardConfig, tokenizer: PreTrainedTokenizerBase, context_length: int | None = None
) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """Train and held-out pairs: ``eval_data`` when given, else a seeded ``eval_fraction`` split
    of ``train_data``. A pair longer than the backbone's context after the ``max_length``
    truncation is a ``DataError`` naming the file and the row; ``context_length`` defaults to
    the one in ``cfg.model``'s config (an embedded encoder's too; unknown: no check)."""
    if context_length is None:
        context_length = backbone_context_length(cfg.model)
    train, held, _ = load_preference_split(
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
    return train, held


def _batches(
    examples: list[PreferenceExample], size: int, pad_id: int, device: torch.device
) -> Iterator[dict[str, Tensor]]:
    for s in range(0, len(examples), size):
        batch = collate_preferences(examples[s : s + size], pad_id)
        yield {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    examples: list[PreferenceExample],
    cfg: RewardConfig,
    pad_id: int,
    device: torch.device,
) -> dict[str, float]:
    """Held-out loss, accuracy, margin and reward mean/std over all of ``examples``.

    Every process evaluates all of them (the same forward calls on every process keep DDP and
    FSDP collectives in step), so the result needs no gathering.
    """
    was_training = model.training
    model.eval()
    try:
        chunks = [
            reward_step_loss(model, batch, cfg)[1]
            for batch in _batches(examples, cfg.micro_batch_size, pad_id, device)
        ]
    finally:
        model.train(was_training)
    return {f"eval/{k}": v for k, v in summarize(chunks).items()}


@torch.no_grad()
def reward_normalization(
    model: nn.Module, examples: list[PreferenceExample], batch_size: int, pad_id: int
) -> RewardNormalization | None:
    """Mean and std of the raw rewards of the chosen and rejected responses of ``examples``
    (``None`` when they all get the same reward)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        rewards = torch.cat(
            [
                model(b["input_ids"], b["attention_mask"]).double()
                for b in _batches(examples, batch_size, pad_id, device)
            ]
        )  # (2N,)
    finally:
        model.train(was_training)
    std = rewards.std(correction=0).item()
    return RewardNormalization(rewards.mean().item(), std) if std > 0 else None


def train(cfg: RewardConfig) -> dict[str, float]:
    """Train a Bradley–Terry reward model as configured; return the last logged metrics.

    The trained model is saved to ``<output_dir>/reward_model`` (see the module docstring).
    """
    acc = make_accelerator(cfg)
    run = start_run(cfg, acc)
    rm = RewardModel.from_pretrained_backbone(
        cfg.model,
        dtype=cfg.dtype,
        peft=cfg.peft,
        activation_checkpointing=cfg.activation_checkpointing,
        max_length=cfg.max_length,
    )
    pad_id = rm.tokenizer.pad_token_id
    train_ex, eval_ex = split_data(cfg, rm.tokenizer)
    rm.to(acc.device)

    module, optimizer, scheduler = prepare_training(acc, cfg, rm, shard=rm.backbone, shard_root=rm)
    guard = StepGuard(cfg.max_bad_steps, run.path)
    step, states = run.restore(
        models={CHECKPOINT_MODEL_NAME: rm}, optimizer=optimizer, scheduler=scheduler
    )
    cursor = DataCursor(
        len(train_ex), cfg.batch_size, cfg.seed, acc.num_processes, acc.process_index
    )
    # the steps since the last log line: saved in checkpoints, so a resumed run logs the same
    # means as an uninterrupted one
    window: list[dict[str, Tensor]] = []
    pairs, window_steps, t0 = 0, 0, time.perf_counter()
    if states:
        cursor.load_state_dict(states["cursor"])
        guard.load_state_dict(states.get("guard", guard.state_dict()))
        saved_window = states.get("log_window", {})
        window = list(saved_window.get("stats", []))
        pairs, window_steps = saved_window.get("pairs", 0), saved_window.get("steps", 0)

    final: dict[str, float] = {}
    if eval_ex and step == 0:  # the untrained baseline, for comparison
        run.log(0, evaluate(module, eval_ex, cfg, pad_id, acc.device))
    with Progress(
        cfg.max_steps, initial=step, metrics=("loss", "accuracy"), accelerator=acc
    ) as bar:
        while step < cfg.max_steps:
            module.train()
            guard.step, mark, bad = step + 1, len(window), guard.total
            micro = split_micro_batches(cursor.next_indices(), cfg.gradient_accumulation_steps)
            for i, idx in enumerate(micro):
                batch = collate_preferences([train_ex[j] for j in idx], pad_id)
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                sync = acc.no_sync(module) if i < len(micro) - 1 else contextlib.nullcontext()
                with sync, acc.autocast():
                    loss, stats = reward_step_loss(module, batch, cfg)
                    acc.backward(loss / len(micro))
                window.append(stats)
                pairs += len(idx)
            grad_norm = optimizer_step(
                acc, module, optimizer, scheduler, cfg.max_grad_norm, guard, loss.detach()
            )
            step += 1
            window_steps += 1
            if guard.total > bad:  # skipped: its non-finite statistics stay out of the means
                del window[mark:]

            if step % cfg.logging_steps == 0 or step == cfg.max_steps:
                elapsed = time.perf_counter() - t0
                metrics = summarize(window, acc) if window else {}  # empty: all skipped
                metrics["lr"] = scheduler.get_last_lr()[0]
                metrics["examples_per_s"] = pairs * acc.num_processes / max(elapsed, 1e-9)
                metrics["s_per_step"] = elapsed / window_steps
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                metrics.update(guard.metrics())
                run.log(step, metrics)
                bar.update(step, metrics)
                final.update(metrics)
                window, pairs, window_steps, t0 = [], 0, 0, time.perf_counter()
            else:
                bar.update(step)
            if eval_ex and (step % cfg.eval_steps == 0 or step == cfg.max_steps):
                ev = evaluate(module, eval_ex, cfg, pad_id, acc.device)
                run.log(step, ev)
                final.update(ev)
            if (cfg.save_steps and step % cfg.save_steps == 0) or step == cfg.max_steps:
                run.save(
                    step,
                    models={CHECKPOINT_MODEL_NAME: trainable_state_dict(rm) if rm.is_peft else rm},
                    optimizer=optimizer,
                    scheduler=scheduler,
                    states={
                        "cursor": cursor.state_dict(),
                        "guard": guard.state_dict(),
                        "log_window": {"stats": window, "pairs": pairs, "steps": window_steps},
                    },
                )

    if cfg.normalization_samples:
        rm.normalization = reward_normalization(
            module, train_ex[: cfg.normalization_samples], cfg.micro_batch_size, pad_id
        )
    run.write_final(rm.save, models={CHECKPOINT_MODEL_NAME: rm}, name=REWARD_MODEL_DIR)
    run.close()
    return final
