"""Held-out evaluation inside training: what the KL penalty buys, measured off the training reward.

Every LM trainer owns a :class:`HeldOutEvaluator`. At step 0 (before any update) and every
``eval_steps`` it samples ``eval_samples_per_prompt`` completions of each held-out prompt (a fixed
seed each time, in a forked RNG, so the training RNG and a resumed run are untouched), and logs
under ``eval/``:

* ``eval/proxy``: the training reward on those samples; ``eval/gold/<name>``: each
  ``eval_rewards`` spec, measured and never optimised (the "gold" rewards of Gao et al. 2022,
  arXiv:2210.10760);
* ``eval/kl/k1``, ``eval/kl/k3``, ``eval/kl/exact``: KL(π_θ‖π_ref) per response on the samples
  (the exact one over the full vocabulary at every position, fp32); ``eval/entropy``: the policy's
  mean per-token entropy on its own samples (exact, from the logits);
* diversity: ``eval/distinct_n`` and ``eval/ead_n`` (n = 1..4) over the completions' tokens,
  ``eval/self_bleu`` and ``eval/semantic_similarity`` among the completions of the same prompt;
* capability retention: ``eval/nll`` and ``eval/ref_nll`` (mean per-token NLL of a held-out general
  text corpus) and ``eval/nll_tax`` = their difference (the "alignment tax"); ``eval/kl/offtask``:
  the exact KL to the reference on responses to general prompts outside the task;
* ``eval/proxy_gold_gap``: (proxy − proxy₀)/σ_proxy₀ − (gold − gold₀)/σ_gold₀, each standardised by
  its step-0 mean and spread over the eval samples, which grows when the proxy climbs and the gold
  does not; a warning line, once per gold, when over the last ``overopt_window`` evaluations the
  proxy rises while the gold falls by more than twice its step-0 standard error;
* ``eval/seconds``: the cost.

The samples go to ``samples/step-NNNNNN.jsonl`` (prompt, completion, each reward, per-response KL,
and per token: the text, log π, log π_ref and the exact KL at that position), which
``tether report`` colours token by token. With ``early_stop_on`` the run stops after
``early_stop_patience`` evaluations without improving that metric, and ``best/`` keeps the policy
at its best evaluation.

Across processes the eval prompts and passages are sharded over the ranks and every per-sample
record is gathered to every rank, so all ranks compute the same metrics and stop together.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tether.configs.checks import reward_names as reward_names  # re-exported
from tether.configs.eval import BUILTIN_TEXT
from tether.configs.eval import EvalConfig as EvalConfig  # re-exported
from tether.core.kl import exact_from_logits, k1, k3
from tether.core.masked import masked_sum
from tether.data import PromptExample, load_prompt_dataset
from tether.eval.capability import NLL, corpus_nll, corpus_nll_of
from tether.eval.diversity import distinct_n, expectation_adjusted_distinct
from tether.eval.selfbleu import self_bleu
from tether.models.generation import SamplingConfig, generate, sample_seed
from tether.models.logprobs import forward_logprobs, unwrap_model
from tether.models.numerics import fp32_numerics, weights_are_fp32
from tether.rewards import RewardFn, call_reward, make_reward

log = logging.getLogger(__name__)

SAMPLES_DIR = "samples"
BEST_DIR = "best"
DISTINCT_ORDERS = (1, 2, 3, 4)
EXACT_CHUNK_ROWS = 8
"""Responses per full-logit forward of the exact KL (bounds the (rows, T, V) logits)."""
SEED_OFFSET = 7919
"""Eval sampling seed = run seed + this (the same draw at every evaluation)."""
ROUND = 5
"""Decimals of the per-token numbers written to the samples files."""


def builtin_data(name: str) -> Path:
    """Path of a data file tether ships in ``tether/eval/data``."""
    path = Path(str(resources.files("tether.eval") / "data" / name))
    if not path.is_file():
        raise FileNotFoundError(f"tether's built-in eval data {name} is missing at {path}")
    return path


# ------------------------------------------------------------------------------------------------
# Pure pieces
# ------------------------------------------------------------------------------------------------


def standardised_gap(
    proxy: float,
    gold: float,
    base_proxy: tuple[float, float],
    base_gold: tuple[float, float],
    spread_now: tuple[float, float] = (1.0, 1.0),
) -> float:
    """(proxy − μ_p)/σ_p − (gold − μ_g)/σ_g with the step-0 (μ, σ) of each.

    0 at step 0; grows when the proxy improves more (in its own step-0 spread) than the gold.
    A step-0 σ of 0 (every sample scored the same, e.g. a reward that is 0 until the policy
    finds it) is replaced by that reward's spread now, ``spread_now`` (proxy, gold), and by 1 if
    that is 0 too."""

    def scale(base: float, now: float) -> float:
        return base if base > 0 else (now if now > 0 else 1.0)

    sp, sg = scale(base_proxy[1], spread_now[0]), scale(base_gold[1], spread_now[1])
    return (proxy - base_proxy[0]) / sp - (gold - base_gold[0]) / sg


def slope(values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` against 0, 1, 2, ... (0 for fewer than 2 values)."""
    n = len(values)
    if n < 2:
        return 0.0
    xm, ym = (n - 1) / 2, sum(values) / n
    num = sum((i - xm) * (v - ym) for i, v in enumerate(values))
    den = sum((i - xm) ** 2 for i in range(n))
    return num / den


def overoptimising(proxy: Sequence[float], gold: Sequence[float], gold_se: float) -> bool:
    """Over the given evaluations (oldest first): the proxy trends up while the gold trends down
    and has fallen by more than two step-0 standard errors ``gold_se`` from the first to the
    last."""
    return slope(proxy) > 0 and slope(gold) < 0 and gold[0] - gold[-1] > 2 * gold_se


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation of finite ``values``; (nan, nan) if none."""
    xs = [v for v in values if math.isfinite(v)]
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def _finite_mean(values: Sequence[float]) -> float:
    return mean_std(values)[0]


def diversity_metrics(
    token_ids: Sequence[Sequence[int]],
    texts: Sequence[str],
    groups: Sequence[int],
    vocab_size: int,
) -> dict[str, float]:
    """distinct-n and EAD-n (n = 1..4, V^n n-gram types) over all completions' tokens, and
    self-BLEU among the completions of each prompt (``groups``: a prompt id per completion),
    averaged over prompts with ≥ 2 completions."""
    out: dict[str, float] = {}
    for n in DISTINCT_ORDERS:
        out[f"distinct_{n}"] = distinct_n(token_ids, n)
        # n-grams drawn uniformly from the V^n possible ones
        out[f"ead_{n}"] = expectation_adjusted_distinct(token_ids, n, vocab_size**n)
    by_group: dict[int, list[str]] = {}
    for g, t in zip(groups, texts, strict=True):
        by_group.setdefault(g, []).append(t)
    bleus = [self_bleu(ts) for ts in by_group.values() if len(ts) >= 2]
    if bleus:
        out["self_bleu"] = sum(bleus) / len(bleus)
    return out


# ------------------------------------------------------------------------------------------------
# Model passes
# ------------------------------------------------------------------------------------------------


@dataclass
class ScoredResponses:
    """Per-response KL to the reference and per-token detail, for B responses."""

    exact: list[float]
    k1: list[float]
    k3: list[float]
    entropy_sum: float
    tokens: int
    logp: list[list[float]]
    ref_logp: list[list[float]]
    token_kl: list[list[float]]


@torch.no_grad()
def score_responses(
    model: nn.Module,
    reference: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    prompt_length: int,
    temperature: float,
    numerics: Callable[[], Any],
) -> ScoredResponses:
    """Exact KL(π_θ‖π_ref) per position over the vocabulary, the sampled tokens' log π and
    log π_ref (k1, k3), and π_θ's entropy, on (B, P + R) rollouts, ``EXACT_CHUNK_ROWS`` at a
    time. Shapes: ``response_mask`` (B, R)."""
    out = ScoredResponses([], [], [], 0.0, 0, [], [], [])
    base = unwrap_model(model)
    was = base.training
    base.eval()
    try:
        for s in range(0, input_ids.shape[0], EXACT_CHUNK_ROWS):
            ids = input_ids[s : s + EXACT_CHUNK_ROWS]
            am = attention_mask[s : s + EXACT_CHUNK_ROWS]
            resp = response_mask[s : s + EXACT_CHUNK_ROWS]
            pad = resp.new_zeros(resp.shape[0], prompt_length - 1)
            mask = torch.cat([pad, resp], dim=1)  # (b, P + R − 1)
            with numerics():
                pol = forward_logprobs(
                    model, ids, am, mask=mask, temperature=temperature, return_logits=True
                )
                ref = reference.logprobs(ids, am, mask, temperature=temperature, return_logits=True)
            cols = slice(prompt_length - 1, None)
            per_pos = exact_from_logits(pol.logits, ref.logits.to(pol.logits.device), mask)
            logp_all = torch.log_softmax(pol.logits[:, cols].float(), -1)  # (b, R, V)
            ent = -(logp_all.exp() * logp_all).sum(-1)  # (b, R)
            del logp_all
            lp, rlp = pol.logprobs[:, cols], ref.logprobs[:, cols].to(pol.logprobs.device)
            kl_t = per_pos[:, cols]
            out.exact += masked_sum(kl_t, resp, dim=-1).tolist()
            out.k1 += masked_sum(k1(lp, rlp), resp, dim=-1).tolist()
            out.k3 += masked_sum(k3(lp, rlp), resp, dim=-1).tolist()
            out.entropy_sum += float(ent[resp].sum())
            out.tokens += int(resp.sum())
            for i in range(resp.shape[0]):
                m = resp[i]
                out.logp.append([round(v, ROUND) for v in lp[i][m].tolist()])
                out.ref_logp.append([round(v, ROUND) for v in rlp[i][m].tolist()])
                out.token_kl.append([round(v, ROUND) for v in kl_t[i][m].tolist()])
    finally:
        base.train(was)
    return out


def reference_corpus_nll(
    reference: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 8
) -> NLL:
    """:func:`tether.eval.capability.corpus_nll_of` under the reference policy (fp32)."""
    device = next(unwrap_model(reference.model).parameters()).device
    return corpus_nll_of(
        lambda ids, am, m: reference.logprobs(ids, am, m).logprobs,
        device,
        tokenizer,
        texts,
        batch_size,
    )


def load_texts(spec: str, limit: int) -> list[str]:
    """The first ``limit`` texts of a corpus spec ('general' or a data file with 'text')."""
    from tether.data.errors import DataError, Problem
    from tether.data.sources import read_source

    path = builtin_data("general_text.jsonl") if spec == BUILTIN_TEXT else Path(spec)
    raw = read_source(str(path))
    if raw.problems:
        raise DataError(raw.name, raw.problems)
    texts, problems = [], []
    for row in raw.rows:
        text = row.fields.get("text")
        if not isinstance(text, str) or not text.strip():
            problems.append(
                Problem(
                    f"expected a non-empty string, got {text!r}",
                    row=row.index,
                    line=row.line,
                    field="text",
                )
            )
        else:
            texts.append(text)
    if problems:
        raise DataError(raw.name, problems)
    return texts[:limit]


# ------------------------------------------------------------------------------------------------
# The evaluator
# ------------------------------------------------------------------------------------------------


@dataclass
class _History:
    steps: list[int] = field(default_factory=list)
    proxy: list[float] = field(default_factory=list)
    gold: dict[str, list[float]] = field(default_factory=dict)


class HeldOutEvaluator:
    """Held-out evaluation of one run (see the module docstring).

    Args:
        cfg: the trainer's config (an :class:`EvalConfig` with ``eval_steps``, ``seed``,
            ``temperature``/``top_k``/``top_p``, ``max_new_tokens``, ``as_chat``,
            ``max_prompt_length``).
        tokenizer: the policy's tokenizer.
        prompts: the held-out prompts.
        proxy: the training reward spec (None: no proxy, e.g. offline DPO without one).
        run_path: the run directory (samples/ and best/ go there); None: nothing written.
        accelerator: for sharding and gathering across processes (None: one process).
    """

    def __init__(
        self,
        cfg: Any,
        tokenizer: Any,
        prompts: Sequence[PromptExample],
        proxy: str | None,
        run_path: Path | None,
        accelerator: Any = None,
    ) -> None:
        self.cfg, self.tok, self.acc = cfg, tokenizer, accelerator
        self.prompts = list(prompts)[: cfg.eval_num_prompts]
        if not self.prompts:
            raise ValueError("held-out evaluation needs at least one eval prompt")
        self.run_path = run_path
        self.proxy_spec = proxy
        self.proxy_fn: RewardFn | None = make_reward(proxy) if proxy else None
        self.gold_names = reward_names(list(cfg.eval_rewards))
        self.gold_fns = [make_reward(s) for s in cfg.eval_rewards]
        self.sampling = SamplingConfig(
            max_new_tokens=cfg.eval_max_new_tokens or getattr(cfg, "max_new_tokens", 64),
            temperature=getattr(cfg, "temperature", 1.0),
            top_k=getattr(cfg, "top_k", 0),
            top_p=getattr(cfg, "top_p", 1.0),
        )
        self.texts = (
            load_texts(cfg.eval_capability_text, cfg.eval_capability_passages)
            if cfg.eval_capability_text
            else []
        )
        self.offtask: list[PromptExample] = []
        if cfg.eval_offtask_prompts:
            path = (
                builtin_data("offtask_prompts.jsonl")
                if cfg.eval_offtask_prompts == BUILTIN_TEXT
                else cfg.eval_offtask_prompts
            )
            self.offtask = list(
                load_prompt_dataset(
                    str(path),
                    tokenizer,
                    max_prompt_length=getattr(cfg, "max_prompt_length", None),
                    as_chat=getattr(cfg, "as_chat", False),
                )
            )[: cfg.eval_offtask_num]
        self.ref_nll: float | None = None
        self.baseline: dict[str, tuple[float, float]] = {}
        self.n_samples = 0
        self._every_process_all = False
        """The policy is FSDP2-sharded: every process evaluates every item (see :meth:`_shard`)."""
        self.history = _History()
        self.warned: list[str] = []
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.should_stop = False
        self.note: Callable[[str], None] = self._print
        """Where progress lines go (a trainer sets its progress bar's ``note``)."""

    def _print(self, text: str) -> None:
        if self._main:
            print(text, flush=True)

    # -- schedule and state ----------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether to evaluate after ``step`` completed steps (step 0 = before training)."""
        every = self.cfg.eval_steps
        return every > 0 and step % every == 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "ref_nll": self.ref_nll,
            "baseline": {k: list(v) for k, v in self.baseline.items()},
            "n_samples": self.n_samples,
            "history": {
                "steps": self.history.steps,
                "proxy": self.history.proxy,
                "gold": self.history.gold,
            },
            "warned": self.warned,
            "best": self.best,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ref_nll = state["ref_nll"]
        self.baseline = {k: (float(v[0]), float(v[1])) for k, v in state["baseline"].items()}
        self.n_samples = int(state["n_samples"])
        h = state["history"]
        self.history = _History(list(h["steps"]), list(h["proxy"]), dict(h["gold"]))
        self.warned = list(state["warned"])
        self.best, self.best_step = state["best"], state["best_step"]
        self.bad_evals = int(state["bad_evals"])

    # -- process helpers ---------------------------------------------------------------------------

    def _shard(self, items: Sequence[Any]) -> list[tuple[int, Any]]:
        """This process's share of ``items``. With an FSDP2-sharded policy every process takes
        all of them: each forward is then a collective, and shares of different sizes (7 prompts
        on 2 processes) would leave one process waiting in a forward the other never runs; every
        process computes the same records (sampling is seeded per row), so no gather is needed."""
        if self._every_process_all:
            return list(enumerate(items))
        n, r = (1, 0) if self.acc is None else (self.acc.num_processes, self.acc.process_index)
        return [(i, x) for i, x in enumerate(items) if i % n == r]

    def _gather(self, records: list[Any]) -> list[Any]:
        if self.acc is None or self.acc.num_processes == 1 or self._every_process_all:
            return records
        from accelerate.utils import gather_object

        return list(gather_object(records))

    @property
    def _sharded(self) -> bool:
        """Sharded parameters (FSDP, ZeRO-3): every forward is a collective."""
        from tether.models.rollout import SHARDED

        if self._every_process_all:
            return True
        return self.acc is not None and str(self.acc.distributed_type) in SHARDED

    @property
    def _main(self) -> bool:
        return self.acc is None or self.acc.is_main_process

    # -- the evaluation ----------------------------------------------------------------------------

    def evaluate(
        self,
        model: nn.Module,
        reference: Any,
        step: int,
        autocast: Callable[[], Any] = contextlib.nullcontext,
    ) -> dict[str, float]:
        """Sample, score and measure at ``step``; returns the ``eval/`` metrics (the same on every
        rank) and writes ``samples/step-NNNNNN.jsonl``. ``autocast``: the training numerics the
        samples are drawn in; the KLs, entropy and NLLs are fp32 when the weights are."""
        t0 = time.perf_counter()
        from tether.models.sharding import is_sharded

        self._every_process_all = is_sharded(model)
        base = unwrap_model(model)
        numerics: Callable[[], Any] = (
            (lambda: fp32_numerics(next(base.parameters()).device.type))
            if weights_are_fp32(base)
            else autocast
        )
        k = self.cfg.eval_samples_per_prompt
        cached = self._load_base(step)
        if cached is not None:
            records, metrics = cached
            self.note(f"eval step {step}: the untrained policy's evaluation, from the base cache")
        else:
            self.note(
                f"eval step {step}: sampling {len(self.prompts)} held-out prompts × {k}"
                + (f", capability NLL on {len(self.texts)} passages" if self.texts else "")
                + (f", {len(self.offtask)} off-task prompts" if self.offtask else "")
            )
            shard = self._shard(self.prompts)
            records = self._sample_and_score(model, reference, shard, k, autocast, numerics, step)
            records = sorted(
                self._gather(records), key=lambda r: (r["prompt_index"], r["sample_index"])
            )
            metrics = self._sample_metrics(records)
            metrics.update(self._capability(model, reference, autocast, numerics))
            self._save_base(step, records, metrics)
        metrics.update(self._gap(step, records, metrics))
        if self.cfg.eval_semantic and k >= 2:
            from tether.eval.semantic import semantic_similarity

            metrics["eval/semantic_similarity"] = semantic_similarity(
                [r["completion"] for r in records], [r["prompt_index"] for r in records]
            )
        if self._main and self.run_path is not None:
            write_samples(self.run_path / SAMPLES_DIR, step, records)
        metrics["eval/seconds"] = time.perf_counter() - t0
        shown = ["eval/proxy", *(f"eval/gold/{n}" for n in self.gold_names), "eval/kl/exact"]
        shown += ["eval/nll_tax", "eval/proxy_gold_gap"]
        self.note(
            f"eval step {step}: {metrics['eval/seconds']:.1f} s  "
            + "  ".join(f"{k_[5:]} {metrics[k_]:.4g}" for k_ in shown if k_ in metrics)
        )
        return {k_: v for k_, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}

    # -- the base cache: one step-0 evaluation shared by runs from the same policy ---------------

    def base_key(self) -> str:
        """What the step-0 evaluation depends on: the policy and its numerics, the prompts, the
        sampling, the rewards, the capability and off-task data, the seed."""
        import hashlib

        c = self.cfg
        fields = (
            "model",
            "dtype",
            "peft",
            "mixed_precision",
            "kl_precision",
            "rollout_dtype",
            "seed",
            "as_chat",
            "max_prompt_length",
            "eval_rewards",
            "eval_samples_per_prompt",
            "eval_capability_text",
            "eval_capability_passages",
            "eval_offtask_prompts",
            "eval_offtask_num",
            "eval_batch_size",
        )
        request = {f: getattr(c, f, None) for f in fields}
        request.update(
            sampling=self.sampling.__dict__,
            prompts=[e.prompt for e in self.prompts],
            proxy=self.proxy_spec,
            schema=2,  # 2: per-sample seeded sampling
        )
        text = json.dumps(request, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def _base_path(self, step: int) -> Path | None:
        cache = getattr(self.cfg, "eval_base_cache", None)
        if step != 0 or not cache or (self.acc is not None and self.acc.num_processes > 1):
            return None
        return Path(cache) / f"base-{self.base_key()}.json"

    def _load_base(self, step: int) -> tuple[list[dict[str, Any]], dict[str, float]] | None:
        path = self._base_path(step)
        if path is None or not path.is_file():
            return None
        saved = json.loads(path.read_text(encoding="utf-8"))
        self.ref_nll = saved["ref_nll"]
        records = [dict(r, _entropy=tuple(r["_entropy"])) for r in saved["records"]]
        return records, {k: float(v) for k, v in saved["metrics"].items()}

    def _save_base(
        self, step: int, records: list[dict[str, Any]], metrics: dict[str, float]
    ) -> None:
        path = self._base_path(step)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".base-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"ref_nll": self.ref_nll, "records": records, "metrics": metrics}, f)
        os.replace(tmp, path)

    def _generate(
        self,
        model: nn.Module,
        prompt_ids: list[list[int]],
        autocast: Callable[[], Any],
        seeds: list[int] | None = None,
    ) -> list[Any]:
        rollouts = []
        base = unwrap_model(model)
        was = base.training
        base.eval()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.cfg.seed + SEED_OFFSET)
                for s in range(0, len(prompt_ids), self.cfg.eval_batch_size):
                    with autocast():
                        rollouts.append(
                            generate(
                                model,
                                self.tok,
                                prompt_ids[s : s + self.cfg.eval_batch_size],
                                self.sampling,
                                compute_logprobs=False,
                                compute_sampler_logprobs=False,
                                row_seeds=None
                                if seeds is None
                                else seeds[s : s + self.cfg.eval_batch_size],
                                synced_processes=self._sharded,
                            )
                        )
        finally:
            base.train(was)
        return rollouts

    def _sample_and_score(
        self,
        model: nn.Module,
        reference: Any,
        shard: list[tuple[int, PromptExample]],
        k: int,
        autocast: Callable[[], Any],
        numerics: Callable[[], Any],
        step: int,
    ) -> list[dict[str, Any]]:
        if not shard:
            return []
        flat = [(pi, si, ex) for pi, ex in shard for si in range(k)]
        records: list[dict[str, Any]] = []
        # one seed per (prompt, sample): the same samples on any number of processes, and the
        # same noise at every evaluation (common random numbers across steps)
        seeds = [sample_seed(self.cfg.seed + SEED_OFFSET, 0, pi * k + si) for pi, si, _ in flat]
        for ro in self._generate(model, [ex.prompt_ids for _, _, ex in flat], autocast, seeds):
            part = flat[len(records) : len(records) + ro.input_ids.shape[0]]
            resp = ro.response_mask
            ids = [ro.response_ids[i][resp[i]].tolist() for i in range(resp.shape[0])]
            texts = [self.tok.decode(x, skip_special_tokens=True) for x in ids]
            prompts = [ex.prompt for _, _, ex in part]
            rewards: dict[str, list[float]] = {}
            where: dict[str, Any] = {
                "step": step,
                "rows": [ex.index for _, _, ex in part],
                "stage": "the held-out evaluation",
                "on_invalid": "skip",
            }
            if self.proxy_fn is not None:
                rewards["proxy"] = list(
                    call_reward(self.proxy_fn, prompts, texts, str(self.proxy_spec), **where)
                )
            for name, fn, spec in zip(
                self.gold_names, self.gold_fns, self.cfg.eval_rewards, strict=True
            ):
                rewards[name] = list(call_reward(fn, prompts, texts, spec, **where))
            sc = score_responses(
                model,
                reference,
                ro.input_ids,
                ro.attention_mask,
                resp,
                ro.prompt_length,
                self.sampling.temperature,
                numerics,
            )
            ent = sc.entropy_sum / max(sc.tokens, 1)
            for i, (pi, si, ex) in enumerate(part):
                records.append(
                    {
                        "step": step,
                        "prompt_index": pi,
                        "sample_index": si,
                        "prompt": ex.prompt,
                        "completion": texts[i],
                        "rewards": {n: v[i] for n, v in rewards.items()},
                        "kl": {"k1": sc.k1[i], "k3": sc.k3[i], "exact": sc.exact[i]},
                        "tokens": [self.tok.decode([t]) for t in ids[i]],
                        "token_ids": ids[i],
                        "logp": sc.logp[i],
                        "ref_logp": sc.ref_logp[i],
                        "token_kl": sc.token_kl[i],
                        "_entropy": (ent, len(ids[i])),
                    }
                )
        # entropy of the batch is token-weighted: keep each record's share
        return records

    def _sample_metrics(self, records: list[dict[str, Any]]) -> dict[str, float]:
        m: dict[str, float] = {}
        if "proxy" in records[0]["rewards"]:
            m["eval/proxy"] = _finite_mean([r["rewards"]["proxy"] for r in records])
        for name in self.gold_names:
            m[f"eval/gold/{name}"] = _finite_mean([r["rewards"][name] for r in records])
        for est in ("k1", "k3", "exact"):
            m[f"eval/kl/{est}"] = sum(r["kl"][est] for r in records) / len(records)
        ntok = sum(len(r["token_ids"]) for r in records)
        m["eval/entropy"] = (
            sum(r["_entropy"][0] * r["_entropy"][1] for r in records) / ntok if ntok else math.nan
        )
        m["eval/response_length"] = ntok / len(records)
        div = diversity_metrics(
            [r["token_ids"] for r in records],
            [r["completion"] for r in records],
            [r["prompt_index"] for r in records],
            len(self.tok),
        )
        m.update({f"eval/{k}": v for k, v in div.items()})
        return m

    def _capability(
        self,
        model: nn.Module,
        reference: Any,
        autocast: Callable[[], Any],
        numerics: Callable[[], Any],
    ) -> dict[str, float]:
        m: dict[str, float] = {}
        if self.texts:
            mine = [t for _, t in self._shard(self.texts)]
            nll = corpus_nll(model, self.tok, mine) if mine else NLL(0.0, 0)
            parts = self._gather([(nll.mean * nll.tokens, nll.tokens)])
            m["eval/nll"] = sum(a for a, _ in parts) / max(sum(b for _, b in parts), 1)
            if self.ref_nll is None or getattr(reference, "kind", "") == "synced":
                rn = reference_corpus_nll(reference, self.tok, mine) if mine else NLL(0.0, 0)
                parts = self._gather([(rn.mean * rn.tokens, rn.tokens)])
                self.ref_nll = sum(a for a, _ in parts) / max(sum(b for _, b in parts), 1)
            m["eval/ref_nll"] = self.ref_nll
            m["eval/nll_tax"] = m["eval/nll"] - self.ref_nll
        if self.offtask:
            shard = self._shard(self.offtask)
            exact: list[float] = []
            if shard:
                # seeded per off-task prompt (step slot 1; the held-out prompts use 0): the same
                # samples on any number of processes, whatever the batches
                seeds = [sample_seed(self.cfg.seed + SEED_OFFSET, 1, i) for i, _ in shard]
                prompt_ids = [ex.prompt_ids for _, ex in shard]
                for ro in self._generate(model, prompt_ids, autocast, seeds):
                    sc = score_responses(
                        model,
                        reference,
                        ro.input_ids,
                        ro.attention_mask,
                        ro.response_mask,
                        ro.prompt_length,
                        self.sampling.temperature,
                        numerics,
                    )
                    exact += sc.exact
            allv = self._gather(exact)
            m["eval/kl/offtask"] = sum(allv) / len(allv)
        return m

    def _gap(
        self, step: int, records: list[dict[str, Any]], metrics: dict[str, float]
    ) -> dict[str, float]:
        """Standardised proxy–gold gaps, the over-optimisation warning, early stopping."""
        out: dict[str, float] = {}
        names = (["proxy"] if "eval/proxy" in metrics else []) + self.gold_names
        if not self.baseline:
            for n in names:
                self.baseline[n] = mean_std([r["rewards"][n] for r in records])
            self.n_samples = len(records)
        h = self.history
        h.steps.append(step)
        if "eval/proxy" in metrics:
            h.proxy.append(metrics["eval/proxy"])
        for n in self.gold_names:
            h.gold.setdefault(n, []).append(metrics[f"eval/gold/{n}"])
        if "eval/proxy" in metrics and "proxy" in self.baseline:
            proxy_sd = mean_std([r["rewards"]["proxy"] for r in records])[1]
            for i, n in enumerate(self.gold_names):
                if n not in self.baseline:
                    continue
                gap = standardised_gap(
                    metrics["eval/proxy"],
                    metrics[f"eval/gold/{n}"],
                    self.baseline["proxy"],
                    self.baseline[n],
                    (proxy_sd, mean_std([r["rewards"][n] for r in records])[1]),
                )
                out[f"eval/proxy_gold_gap/{n}"] = gap
                if i == 0:
                    out["eval/proxy_gold_gap"] = gap
                w = self.cfg.overopt_window
                se = self.baseline[n][1] / math.sqrt(max(self.n_samples, 1))
                if (
                    n not in self.warned
                    and len(h.proxy) >= w
                    and overoptimising(h.proxy[-w:], h.gold[n][-w:], se)
                ):
                    self.warned.append(n)
                    msg = (
                        f"tether: over-optimisation at step {step}: over the last {w} evaluations "
                        f"the proxy ({self.proxy_spec}) rose "
                        f"{h.proxy[-w]:.4g} → {h.proxy[-1]:.4g} while the gold reward {n} fell "
                        f"{h.gold[n][-w]:.4g} → {h.gold[n][-1]:.4g}; raise β (kl_coef / "
                        "kl_target), or stop here (early_stop_on)"
                    )
                    # printed once (the progress line); also logged below warning level, so a
                    # process without logging handlers does not print it a second time
                    log.info(msg)
                    self.note(msg)
        return out

    def track(
        self, step: int, metrics: dict[str, float], save_best: Callable[[Path], None]
    ) -> None:
        """Early stopping on ``early_stop_on``: keep ``best/`` (``save_best(dir)`` writes the
        policy; main process) at the best evaluation, and set :attr:`should_stop` after
        ``early_stop_patience`` evaluations without improvement."""
        key = self.cfg.early_stop_on
        if key is None:
            return
        if key not in metrics:
            raise ValueError(
                f"early_stop_on={key!r} is not among the eval metrics of this run: "
                f"{sorted(k for k in metrics if k.startswith('eval/'))}"
            )
        value = metrics[key]
        better = self.best is None or (
            value > self.best if self.cfg.early_stop_mode == "max" else value < self.best
        )
        if better:
            self.best, self.best_step, self.bad_evals = value, step, 0
            from tether.models.sharding import collect_for_save

            collect_for_save(save_best)  # a sharded policy is gathered on every process
            if self._main and self.run_path is not None:
                write_best(self.run_path, save_best, {"step": step, "metric": key, "value": value})
        else:
            self.bad_evals += 1
            if self.bad_evals >= self.cfg.early_stop_patience:
                self.should_stop = True
                self.note(
                    f"tether: early stop at step {step}: {key} has not improved for "
                    f"{self.bad_evals} evaluations (best {self.best:.4g} at step "
                    f"{self.best_step}; its policy is in {self.run_path / BEST_DIR})"
                )
        if self.acc is not None:
            self.acc.wait_for_everyone()


def samples_path(samples_dir: Path, step: int) -> Path:
    return samples_dir / f"step-{step:06d}.jsonl"


def write_samples(samples_dir: Path, step: int, records: list[dict[str, Any]]) -> Path:
    """Write the eval samples of ``step`` atomically (temp file + rename)."""
    samples_dir.mkdir(parents=True, exist_ok=True)
    path = samples_path(samples_dir, step)
    fd, tmp = tempfile.mkstemp(dir=samples_dir, prefix=".tmp-", suffix=".jsonl")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for r in records:
            row = {k: v for k, v in r.items() if not k.startswith("_")}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def write_best(run_path: Path, save: Callable[[Path], None], info: dict[str, Any]) -> None:
    """Replace ``run_path/best`` with what ``save(dir)`` writes, plus ``best.json``."""
    tmp = Path(tempfile.mkdtemp(dir=run_path, prefix=".best-"))
    save(tmp)
    (tmp / "best.json").write_text(json.dumps(info, indent=2))
    target = run_path / BEST_DIR
    old = None
    if target.exists():
        old = run_path / f".best-old-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def split_eval_prompts(
    examples: list[PromptExample], n_eval: int, seed: int, min_train: int
) -> tuple[list[PromptExample], list[PromptExample]]:
    """Hold out ``n_eval`` prompts by a seeded permutation (the same for every run with this
    seed); the rest train. Leaves at least ``min_train`` (one global batch) or raises."""
    if len(examples) - n_eval < min_train:
        raise ValueError(
            f"holding out eval_num_prompts={n_eval} of {len(examples)} prompts leaves "
            f"{len(examples) - n_eval}, fewer than one global batch ({min_train}): lower "
            "eval_num_prompts, give eval_prompts, or set eval_steps=0"
        )
    g = torch.Generator().manual_seed(seed + SEED_OFFSET)
    held = set(torch.randperm(len(examples), generator=g)[:n_eval].tolist())
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [examples[i] for i in sorted(held)]
