"""``tether lab overopt``: Gao et al.'s reward over-optimisation experiment, one command.

Stages (each cached under ``output_dir`` and skipped when already done for the same request; a
trained arm killed half-way resumes from its last checkpoint):

1. **Prompts.** ``eval_prompts`` prompts are held out (seeded) for best-of-n and every arm's
   evaluation; the rest train the proxies and the arms (``data/prompts-{train,eval}.jsonl``).
2. **Pools** (:mod:`tether.lab.pool`): ``proxy.samples_per_prompt`` base-policy samples per
   training prompt and ``bon.pool`` per eval prompt, with their gold rewards.
3. **Proxies**: Bradley–Terry reward models (``tether train reward``) on the first N
   gold-labelled pairs for each N of ``proxy.pairs`` (nested subsets), ``proxy.ensemble`` seeds
   each, and ensembles of them (:mod:`tether.rewards.ensemble`); each proxy's agreement with the
   gold on held-out pairs of eval-prompt samples and its Spearman correlation with the gold.
4. **Arms**: best-of-n by each proxy (:func:`tether.lab.arms.bon_arm`); trained arms, each a
   normal tether run (``arms/<name>/seed<s>/``, with ``recipe.yaml``, ``metrics.jsonl`` and
   ``samples/``) that optimises its proxy and evaluates proxy, gold, exact KL, diversity and the
   capability NLL on the eval prompts. DPO arms train on pairs of the training pool labelled by
   their proxy.
5. **Fits and verdicts** (:mod:`tether.lab.fits`, :mod:`tether.lab.claims`): Gao's forms per arm,
   then ``results.json`` (:data:`RESULTS_SCHEMA`) and ``report.html``.

``results.json`` (schema 1)::

    {"schema": 1, "tether_version": str, "config": {...}, "gold": str,
     "proxies": {name: {"pairs": N, "members": k, "combine": str | null,
                        "heldout_accuracy": float, "spearman": float, "path": str}},
     "arms": [{"name": str, "kind": "bon" | "trained", "method": str, "proxy": str,
               "seed": int | null, "settings": {...},
               "points": [{"x": n or step, "kl": float, "sqrt_kl": float, "proxy": float,
                           "gold": float, "gold_se": float, ...eval metrics}],
               "fit": {"form": "bon" | "rl", "alpha", "beta", "r2", "n", "peak_kl", "peak_gain"}
                      | null}],
     "claims": {"a" | "b" | "c" | "d": {"question": str, "verdict": str, "tested": bool, ...}}}
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import tether
from tether.lab.arms import ARM_FILE, bon_arm, load_arm, save_arm
from tether.lab.cache import fingerprint, load_cached, save_cached
from tether.lab.claims import spearman
from tether.lab.config import PROXY_NAME, LabConfig
from tether.lab.fits import fit_gao
from tether.lab.pool import Pool, gold_pairs, sample_pool, write_pairs, write_prompts
from tether.lab.results import RESULTS_FILE, RESULTS_SCHEMA, validate_results
from tether.rewards import call_reward, make_reward
from tether.rewards.ensemble import save_ensemble
from tether.runs.config import config_to_dict, save_config

LAB_CONFIG_FILE = "lab.yaml"
MIN_FIT_POINTS = 4
REQUEST_FILE = "lab-request.json"
"""In a trained arm's directory: the fingerprint of the recipe it was started with."""
POINT_KEYS = (
    "eval/entropy",
    "eval/distinct_1",
    "eval/distinct_2",
    "eval/ead_1",
    "eval/ead_2",
    "eval/self_bleu",
    "eval/semantic_similarity",
    "eval/nll",
    "eval/nll_tax",
    "eval/kl/k1",
    "eval/kl/k3",
    "eval/kl/offtask",
    "eval/response_length",
)
"""Eval metrics copied into each trained arm's points (when the run logged them)."""


def say(text: str) -> None:
    """One progress line of the lab (plain, flushed: readable with and without a terminal)."""
    print(f"lab: {text}", flush=True)


# ------------------------------------------------------------------------------------------------
# Pure helpers
# ------------------------------------------------------------------------------------------------


def split_prompts(n: int, held: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) indices: a seeded choice of ``held`` of ``n`` prompts for eval, both sorted."""
    if held >= n:
        raise ValueError(f"eval_prompts={held} leaves no training prompts out of {n}")
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return sorted(idx[held:]), sorted(idx[:held])


def pair_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Fraction of pairs the scorer orders as the gold did (ties count half)."""
    c, r = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    if c.size == 0:
        return math.nan
    return float(((c > r) + 0.5 * (c == r)).mean())


def sample_gold_se(samples: Sequence[dict[str, Any]], gold: str) -> float:
    """Standard error over prompts of the gold's per-prompt mean in one eval's samples file."""
    by_prompt: dict[int, list[float]] = {}
    for s in samples:
        v = s.get("rewards", {}).get(gold)
        if v is not None and math.isfinite(v):
            by_prompt.setdefault(int(s.get("prompt_index", 0)), []).append(float(v))
    means = [float(np.mean(v)) for v in by_prompt.values()]
    return float(np.std(means, ddof=1) / math.sqrt(len(means))) if len(means) > 1 else math.nan


def trained_points(run_dir: Path, gold: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(eval points, β/KL trajectory) of a finished run directory.

    Each eval point: x (the step), kl (eval/kl/exact), sqrt_kl, proxy, gold, gold_se and the
    :data:`POINT_KEYS` metrics (prefix ``eval/`` dropped); the trajectory: step, beta and the
    training KL per logged step.
    """
    from tether.eval.report import read_samples, sample_files

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    files = sample_files(run_dir)
    gold_key = f"eval/gold/{gold}"
    by_step: dict[int, dict[str, Any]] = {}
    traj: list[dict[str, Any]] = []
    for r in records:
        step = int(r.get("step", 0))
        if "eval/kl/exact" in r and gold_key in r:
            point = by_step.setdefault(step, {"x": step})
            point.update(
                kl=max(float(r["eval/kl/exact"]), 0.0),
                proxy=float(r.get("eval/proxy", math.nan)),
                gold=float(r[gold_key]),
            )
            for key in POINT_KEYS:
                if key in r:
                    point[key.removeprefix("eval/")] = float(r[key])
        beta = r.get("beta", r.get("penalty_beta"))
        kl = r.get("kl/exact", r.get("kl/k1", r.get("kl/mean")))
        if beta is not None or (kl is not None and not any(k.startswith("eval/") for k in r)):
            traj.append({"step": step, "beta": beta, "kl": kl})
    points = []
    for step in sorted(by_step):
        p = by_step[step]
        p["sqrt_kl"] = math.sqrt(p["kl"])
        p["gold_se"] = (
            sample_gold_se(read_samples(files[step]), gold) if step in files else math.nan
        )
        points.append(p)
    return points, traj


def fit_points(form: str, points: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Gao's ``form`` fitted to (kl, gold − gold at the first point) of ``points``; None with
    fewer than :data:`MIN_FIT_POINTS` (the first point is (0, 0) by construction, so with three
    points the two coefficients solve two equations exactly: the fit needs a fourth point to say
    anything)."""
    if len(points) < MIN_FIT_POINTS:
        return None
    base = points[0]["gold"]
    fit = fit_gao(form, [p["kl"] for p in points], [p["gold"] - base for p in points])  # type: ignore[arg-type]
    peak_kl = fit.peak_kl
    out = {
        "form": form,
        "alpha": fit.alpha,
        "beta": fit.beta,
        "r2": fit.r2,
        "n": fit.n,
        "peak_kl": peak_kl if math.isfinite(peak_kl) else None,
        "peak_gain": fit.peak_gain if math.isfinite(peak_kl) else None,
    }
    return out


def _finite(x: Any) -> Any:
    """JSON-safe: nan/inf → None, recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(_finite(data), f, indent=1)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------


class Lab:
    """One lab run: ``Lab(cfg).run()``; every stage is a method and is cached."""

    def __init__(self, cfg: LabConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.data = self.out / "data"
        self._policy: Any = None
        self.gold_name = _metric_name(cfg.gold)

    # -- the policy (loaded only when something is sampled) --------------------------------------

    @property
    def policy(self) -> Any:
        if self._policy is None:
            from tether.models import load_policy

            self._policy = load_policy(self.cfg.model, dtype=self.cfg.dtype)
            self._policy.model.eval()
        return self._policy

    def sampling(self) -> Any:
        from tether.models.generation import SamplingConfig

        return SamplingConfig(
            max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature
        )

    # -- 1. prompts ------------------------------------------------------------------------------

    def prompts(self) -> tuple[list[Any], list[Any]]:
        from tether.data import load_prompt_dataset

        examples = list(
            load_prompt_dataset(
                self.cfg.prompts,
                self.policy.tokenizer,
                max_prompt_length=self.cfg.max_prompt_length,
                as_chat=self.cfg.as_chat,
            )
        )
        tr, ev = split_prompts(len(examples), self.cfg.eval_prompts, self.cfg.seed)
        train, held = [examples[i] for i in tr], [examples[i] for i in ev]
        # rendered text: the arms read these files with as_chat=false and see the same tokens
        write_prompts(self.data / "prompts-train.jsonl", [e.prompt for e in train])
        write_prompts(self.data / "prompts-eval.jsonl", [e.prompt for e in held])
        return train, held

    # -- 2. pools --------------------------------------------------------------------------------

    def pool(self, name: str, examples: Sequence[Any], k: int) -> Pool:
        gold = make_reward(self.cfg.gold)
        return sample_pool(
            self.data / f"pool-{name}.json",
            self.policy.model,
            self.policy.tokenizer,
            [e.prompt for e in examples],
            [e.prompt_ids for e in examples],
            k,
            self.sampling(),
            gold,
            seed=self.cfg.seed,
            gold_name=self.cfg.gold,
            model_name=self.cfg.model,
            batch_size=self.cfg.batch_size,
        )

    # -- 3. proxies ------------------------------------------------------------------------------

    def train_proxy(self, name: str, pairs_file: Path, n_pairs: int, seed: int) -> Path:
        """Train (or find) one reward model; return its saved directory."""
        from tether.train.reward_model import REWARD_MODEL_DIR, RewardConfig
        from tether.train.reward_model import train as train_reward

        pc = self.cfg.proxy
        run_dir = self.out / "proxies" / name
        steps = max(1, math.ceil(n_pairs * pc.epochs / pc.batch_size))
        rc = RewardConfig(
            model=pc.backbone,
            train_data=str(pairs_file),
            eval_fraction=0.0,
            as_chat=False,
            max_length=pc.max_length,
            max_prompt_length=min(self.cfg.max_prompt_length, pc.max_length - 1),
            learning_rate=pc.learning_rate,
            batch_size=pc.batch_size,
            gradient_accumulation_steps=1,
            max_steps=steps,
            warmup_steps=max(1, steps // 10),
            logging_steps=max(1, steps // 10),
            eval_steps=steps,
            save_steps=0,
            keep_last=1,
            mixed_precision="no",
            dtype="float32",
            activation_checkpointing="none",
            output_dir=str(run_dir),
            seed=seed,
            resume=True,  # (the request's fingerprint); set below to whether a run is there
            normalization_samples=min(1024, n_pairs),
        )
        request = {"reward_config": config_to_dict(rc), "pairs": fingerprint_file(pairs_file)}
        done = load_cached(run_dir / "proxy.json", request)
        saved = run_dir / REWARD_MODEL_DIR
        if done is not None and saved.is_dir():
            return saved
        _restart_if_changed(run_dir, request)
        rc.resume = _has_run(run_dir)
        say(f"proxy {name}: {pc.backbone} on {n_pairs} gold-labelled pairs, {steps} steps")
        train_reward(rc)
        save_cached(run_dir / "proxy.json", "proxy", request)
        return saved

    def proxies(self, pool: Pool) -> dict[str, Path]:
        """Every proxy of the ladder (and ensembles): name → reward spec directory."""
        pc = self.cfg.proxy
        need = max(pc.pairs)
        pairs = gold_pairs(pool, need, self.cfg.seed, pc.min_gap)
        if len(pairs) < need:
            raise ValueError(
                f"proxy.pairs asks for {need} gold-labelled pairs but the training pool yields "
                f"{len(pairs)} ({len(pool.prompts)} prompts × proxy.samples_per_prompt="
                f"{pc.samples_per_prompt}, ties dropped): raise proxy.samples_per_prompt or "
                "lower proxy.pairs"
            )
        out: dict[str, Path] = {}
        for n in pc.pairs:
            pairs_file = write_pairs(self.data / f"gold-pairs-n{n}.jsonl", pairs[:n])
            members = [
                self.train_proxy(f"n{n}-s{s}", pairs_file, n, self.cfg.seed + s)
                for s in range(pc.ensemble)
            ]
            out[f"n{n}"] = members[0]
            if pc.ensemble > 1:
                for c in pc.combine:
                    path = self.out / "proxies" / f"n{n}-{c}"
                    save_ensemble(path, members, c, pc.uwo_lambda)  # type: ignore[arg-type]
                    out[f"n{n}-{c}"] = path
        return out

    def proxy_quality(self, proxies: dict[str, Path], eval_pool: Pool) -> dict[str, Any]:
        """Held-out agreement of each proxy with the gold (cached)."""
        held = gold_pairs(eval_pool, self.cfg.proxy.heldout_pairs, self.cfg.seed + 1)
        request = {
            "proxies": {k: fingerprint_dir(v) for k, v in proxies.items()},
            "held": [dataclasses.astuple(p) for p in held],
        }
        path = self.data / "proxy-quality.json"
        done = load_cached(path, request)
        if done is not None:
            return done["proxies"]
        flat_prompts, texts = eval_pool.flat()
        gold_flat = [g for row in eval_pool.gold for g in row]
        info: dict[str, Any] = {}
        for name, spec in proxies.items():
            fn = make_reward(str(spec))
            stage = "the lab's proxy quality"
            scores = call_reward(fn, flat_prompts, texts, name, stage=stage).values
            held_prompts = [p.prompt for p in held]
            chosen = call_reward(
                fn, held_prompts, [p.chosen for p in held], name, stage=stage
            ).values
            rejected = call_reward(
                fn, held_prompts, [p.rejected for p in held], name, stage=stage
            ).values
            m = PROXY_NAME.match(name)
            assert m is not None
            info[name] = {
                "pairs": int(m.group(1)),
                "members": self.cfg.proxy.ensemble if m.group(2) else 1,
                "combine": m.group(2),
                "heldout_accuracy": pair_accuracy(chosen, rejected),
                "heldout_pairs": len(held),
                "spearman": spearman(list(scores), gold_flat),
                "path": os.path.relpath(spec, self.out),
            }
            say(
                f"proxy {name}: held-out pair accuracy {info[name]['heldout_accuracy']:.3f}, "
                f"Spearman with the gold {info[name]['spearman']:.3f}"
            )
        save_cached(path, "proxy-quality", request, proxies=_finite(info))
        return info

    def dpo_budget(self, overrides: dict[str, Any]) -> int:
        """The preference pairs a DPO arm can see: max_steps × batch_size ×
        gradient_accumulation_steps (its own fields over the lab's trainer fields over the
        DPO defaults)."""
        from tether.train.dpo import DPOConfig

        vals = {f.name: f.default for f in dataclasses.fields(DPOConfig)}
        vals.update({k: v for k, v in self.cfg.trainer.items() if k in vals})
        vals.update(overrides)
        return (
            int(vals["max_steps"])
            * int(vals["batch_size"])
            * int(vals["gradient_accumulation_steps"])
        )

    def dpo_pairs(self, proxy: str, spec: Path, pool: Pool, limit: int) -> Path:
        """The training pool's pairs labelled by ``proxy`` (cached): the first ``limit`` of the
        seeded round-robin over prompts, so that a DPO arm's precomputed reference covers only
        what it can train on (all 5432 pairs of the full lab's pool took ~30 min to precompute for
        an arm that sees 384)."""
        path = self.data / f"proxy-pairs-{proxy}-{limit}.jsonl"
        request = {"proxy": fingerprint_dir(spec), "pool": pool_fingerprint(pool), "limit": limit}
        meta = self.data / f"proxy-pairs-{proxy}-{limit}.json"
        if load_cached(meta, request) is not None and path.is_file():
            return path
        flat_prompts, texts = pool.flat()
        scores = call_reward(
            make_reward(str(spec)), flat_prompts, texts, proxy, stage="the lab's proxy scoring"
        )
        k = pool.k
        labelled = Pool(
            pool.prompts,
            pool.completions,
            [list(scores.values[i * k : (i + 1) * k]) for i in range(len(pool.prompts))],
        )
        pairs = gold_pairs(labelled, limit, self.cfg.seed, 0.0)
        write_pairs(path, pairs)
        save_cached(meta, "proxy-pairs", request, pairs=len(pairs))
        return path

    # -- 4. arms ---------------------------------------------------------------------------------

    def arm_recipe(
        self,
        method: str,
        overrides: dict[str, Any],
        proxy_spec: Path,
        seed: int,
        run_dir: Path,
        dpo_data: Path | None,
    ) -> Any:
        """The trainer config of one trained arm: the shared ``trainer`` fields the trainer has,
        the arm's own fields, then what the lab fixes (model, data, rewards, eval, run dir)."""
        from tether.runs.config import load_config
        from tether.runs.registry import get_trainer

        cls, _ = get_trainer(method)
        fields = {f.name for f in dataclasses.fields(cls)}
        data: dict[str, Any] = {k: v for k, v in self.cfg.trainer.items() if k in fields}
        data.update(overrides)
        cfg = self.cfg
        n_eval = cfg.eval_prompts
        fixed: dict[str, Any] = {
            "model": cfg.model,
            "dtype": cfg.dtype,
            "as_chat": False,
            "max_prompt_length": cfg.max_prompt_length,
            "max_new_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature,
            "reward": str(proxy_spec.resolve()),
            "eval_prompts": str((self.data / "prompts-eval.jsonl").resolve()),
            "eval_num_prompts": n_eval,
            "eval_samples_per_prompt": cfg.eval_samples_per_prompt,
            "eval_rewards": [cfg.gold],
            "eval_base_cache": str((self.data / "base-eval").resolve()),
            "output_dir": str(run_dir),
            "seed": seed,
            "resume": True,  # set by trained_arm to whether a run is there to resume
        }
        if method == "dpo":
            assert dpo_data is not None
            fixed.update(train_data=str(dpo_data.resolve()), eval_fraction=0.0)
        else:
            fixed["prompts"] = str((self.data / "prompts-train.jsonl").resolve())
        clash = sorted(k for k in overrides if k in fixed)
        if clash:
            raise ValueError(
                f"the lab sets {clash} itself for every arm; set them at the lab's top level"
            )
        data.update({k: v for k, v in fixed.items() if k in fields})
        run_dir.mkdir(parents=True, exist_ok=True)
        recipe = run_dir / "recipe.yaml"
        _write_yaml(recipe, data)
        return load_config(cls, recipe)

    def trained_arm(
        self,
        name: str,
        method: str,
        proxy: str,
        proxy_spec: Path,
        overrides: dict[str, Any],
        seed: int,
        dpo_data: Path | None,
    ) -> dict[str, Any]:
        from tether.runs.registry import get_trainer

        run_dir = self.out / "arms" / name / f"seed{seed}"
        config = self.arm_recipe(method, overrides, proxy_spec, seed, run_dir, dpo_data)
        plain = config_to_dict(config)
        plain.pop("resume", None)
        request = {"method": method, "config": plain, "proxy": fingerprint_dir(proxy_spec)}
        done = load_arm(run_dir, request)
        if done is not None:
            return done
        _restart_if_changed(run_dir, request, keep={"recipe.yaml"})
        config.resume = _has_run(run_dir)
        say(f"arm {name} (seed {seed}): {method} on proxy {proxy}, {config.max_steps} steps")
        _, train_fn = get_trainer(method)
        t0 = time.perf_counter()
        train_fn(config)
        points, traj = trained_points(run_dir, self.gold_name)
        save_arm(
            run_dir,
            "trained",
            request,
            points,
            trajectory=traj,
            seconds=time.perf_counter() - t0,
        )
        if not self.cfg.keep_checkpoints and (run_dir / "final").is_dir():
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        return json.loads((run_dir / ARM_FILE).read_text(encoding="utf-8"))

    # -- the whole lab ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        cfg.check_trainer_fields()
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.out / LAB_CONFIG_FILE)
        say(f"{self.out}: policy {cfg.model}, gold {cfg.gold}")
        train, held = self.prompts()
        say(f"{len(train)} training prompts, {len(held)} held-out eval prompts")
        k_eval = max(cfg.bon.pool if cfg.bon else 0, 2)
        pool_prompts = train[: cfg.proxy.prompts] if cfg.proxy.prompts else train
        train_pool = self.pool("train", pool_prompts, cfg.proxy.samples_per_prompt)
        eval_pool = self.pool("eval", held, k_eval)
        proxies = self.proxies(train_pool)
        quality = self.proxy_quality(proxies, eval_pool)
        arms: list[dict[str, Any]] = []
        if cfg.bon is not None:
            for proxy in cfg.bon.proxies or list(proxies):
                rec = bon_arm(
                    self.out / "arms" / f"bon-{proxy}",
                    eval_pool,
                    make_reward(str(proxies[proxy])),
                    cfg.bon.ns,
                    proxy_name=fingerprint_dir(proxies[proxy]),
                    pool_fingerprint=pool_fingerprint(eval_pool),
                    seed=cfg.seed,
                )
                arms.append(_arm_entry(f"bon-{proxy}", "bon", "bon", proxy, None, {}, rec, "bon"))
                say(_arm_line(arms[-1]))
        self._policy = None  # the trainers load their own copies
        first_proxy = next(iter(proxies))
        for arm in cfg.arms:
            proxy = arm.proxy or first_proxy
            for name, overrides in arm.expand():
                dpo_data = (
                    self.dpo_pairs(proxy, proxies[proxy], train_pool, self.dpo_budget(overrides))
                    if arm.method == "dpo"
                    else None
                )
                for seed in arm.seeds or cfg.seeds:
                    rec = self.trained_arm(
                        name, arm.method, proxy, proxies[proxy], overrides, seed, dpo_data
                    )
                    arms.append(
                        _arm_entry(name, "trained", arm.method, proxy, seed, overrides, rec, "rl")
                    )
                    say(_arm_line(arms[-1]))
        from tether.lab.claims import all_claims

        results = {
            "schema": RESULTS_SCHEMA,
            "tether_version": tether.__version__,
            "config": config_to_dict(cfg),
            "gold": self.gold_name,
            "proxies": quality,
            "arms": arms,
        }
        results["claims"] = all_claims(results)
        validate_results(_finite(results))
        write_json(self.out / RESULTS_FILE, results)
        if cfg.report:
            from tether.lab.report import write_lab_report

            path = write_lab_report(self.out)
            say(f"report: {path}")
        say(f"done in {time.perf_counter() - t0:.0f} s; results: {self.out / RESULTS_FILE}")
        return results


def _arm_entry(
    name: str,
    kind: str,
    method: str,
    proxy: str,
    seed: int | None,
    settings: dict[str, Any],
    rec: dict[str, Any],
    form: str,
) -> dict[str, Any]:
    points = rec["points"]
    if kind == "bon":
        points = [
            {
                "x": p["n"],
                "kl": p["kl_bound"],
                "sqrt_kl": math.sqrt(p["kl_bound"]),
                "kl_mc": p.get("kl_mc"),
                "kl_mc_se": p.get("kl_mc_se"),
                "proxy": p["proxy"],
                "gold": p["gold"],
                "gold_se": p["gold_se"],
            }
            for p in points
        ]
    return {
        "name": name,
        "kind": kind,
        "method": method,
        "proxy": proxy,
        "seed": seed,
        "settings": settings,
        "points": points,
        "trajectory": rec.get("trajectory", []),
        "fit": fit_points(form, points),
        "seconds": rec.get("seconds"),
    }


def _arm_line(arm: dict[str, Any]) -> str:
    last = arm["points"][-1]
    peak = max(arm["points"], key=lambda p: p["gold"])
    return (
        f"arm {arm['name']}: KL {last['kl']:.2f}  proxy {last['proxy']:+.3f}  gold "
        f"{last['gold']:+.3f} (peak {peak['gold']:+.3f} at KL {peak['kl']:.2f})"
    )


def _metric_name(spec: str) -> str:
    from tether.eval.heldout import reward_names

    return reward_names([spec])[0]


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    import yaml

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".yaml")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=True)
    os.replace(tmp, path)


def _has_run(run_dir: Path) -> bool:
    """Whether a trainer started in ``run_dir`` (so the lab resumes it, from its checkpoint)."""
    from tether.runs import list_checkpoints

    return (run_dir / "metrics.jsonl").exists() or bool(list_checkpoints(run_dir))


def _restart_if_changed(
    run_dir: Path, request: dict[str, Any], keep: set[str] = frozenset()
) -> None:  # type: ignore[assignment]
    """A run directory started for a different request is cleared (its checkpoints would resume
    the wrong run); one started for this request is kept, so the trainer resumes it."""
    marker = run_dir / REQUEST_FILE
    fp = fingerprint(request)
    if marker.is_file() and marker.read_text().strip() == fp:
        return
    if run_dir.is_dir():
        for child in run_dir.iterdir():
            if child.name in keep:
                continue
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(fp)


def fingerprint_file(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def fingerprint_dir(path: Path) -> str:
    """A fingerprint of a reward spec directory: the hashes of its small metadata files (a reward
    model's head and json, an ensemble's file) and of the ensemble members they name."""
    path = Path(path)
    parts = []
    for name in ("reward_model.json", "reward_head.safetensors", "ensemble.json"):
        f = path / name
        if f.is_file():
            parts.append(f"{name}:{fingerprint_file(f)}")
    ens = path / "ensemble.json"
    if ens.is_file():
        for m in json.loads(ens.read_text())["members"]:
            parts.append(fingerprint_dir(path / m))
    return fingerprint({"parts": parts})


def pool_fingerprint(pool: Pool) -> str:
    return fingerprint({"p": pool.prompts, "c": pool.completions, "g": pool.gold})


def summary_table(results: dict[str, Any]) -> str:
    """The printed end of a lab: per arm KL, proxy, gold, distinct-2 (final and at peak gold),
    then the claims' verdicts."""
    head = f"{'arm':<28} {'proxy':<10} {'KL':>7} {'proxy':>8} {'gold':>8} {'peak gold':>10} "
    head += f"{'@ KL':>7} {'dist-2':>7}"
    lines = [head, "-" * len(head)]
    for a in results["arms"]:
        last = a["points"][-1]
        peak = max(a["points"], key=lambda p: p["gold"])
        name = a["name"] + (f" s{a['seed']}" if a.get("seed") is not None else "")
        dist = last.get("distinct_2")
        lines.append(
            f"{name:<28} {a['proxy']:<10} {last['kl']:>7.2f} {last['proxy']:>+8.3f} "
            f"{last['gold']:>+8.3f} {peak['gold']:>+10.3f} {peak['kl']:>7.2f} "
            + (f"{dist:>7.3f}" if dist is not None else f"{'–':>7}")
        )
    for key, c in results.get("claims", {}).items():
        lines.append(f"({key}) {c['question']}\n    {c['verdict']}")
    return "\n".join(lines)


def run_lab(cfg: LabConfig) -> dict[str, Any]:
    """Run (or resume) the lab ``cfg`` describes; return ``results.json``'s content."""
    return Lab(cfg).run()
