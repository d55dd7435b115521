"""Offline DPO, tether vs TRL: seconds per optimizer step, peak RSS and the step-0 loss.

Same model (SmolLM2-135M-Instruct, from the local checkpoint tether converts; no hub access), same
preference pairs, same batch size, number of steps, max length, learning rate, β and loss
(sigmoid), same machine, one invocation. Each configuration runs in its own fresh subprocess, so
the peak RSS (``ru_maxrss`` of that process) belongs to that run alone.

    python benchmarks/dpo_vs_trl.py                              # 30 steps, batch 8, length 256
    python benchmarks/dpo_vs_trl.py --steps 3 --batch-size 2 --max-length 64   # a smoke run
    python benchmarks/dpo_vs_trl.py --data runs/dpo-vader/prefs_train.jsonl --out results.json

Rows:

* ``tether``: tether at its defaults (precomputed reference computed under the training
  precision, ``mixed_precision="auto"`` = bf16 autocast where the hardware has bf16 kernels,
  selective activation checkpointing, padding-free packing, fused LM-head log-probs, fused AdamW;
  fp32 weights), except ``exact_kl_samples=0``: with ``logging_steps=1`` (needed to read the
  step-0 loss) the exact-KL diagnostic would run an extra forward (and keep a live copy of the
  model) every step, and TRL computes no such metric. ``--with-exact-kl`` adds a row
  ``tether+exactkl`` with tether's default ``exact_kl_samples=2`` to show that cost.
* ``tether-fp32``: the same with ``mixed_precision="no"``: fp32 throughout. Selective
  checkpointing stays on: it recomputes only elementwise ops (no matmul), so it is part of how
  tether runs a step, not a precision/recompute trade like TRL's full gradient checkpointing.
* ``trl-default``: TRL's recommended defaults for this hardware: bf16 autocast (``use_cpu=True``
  on CPU), gradient checkpointing, a live reference model (``precompute_ref_log_probs=False``).
* ``trl-fp32``: fp32, no gradient checkpointing, live reference (TRL's default). The matched pair
  with ``tether-fp32``; its numbers make the last line.
* ``trl-fp32-pre``: as ``trl-fp32`` with ``precompute_ref_log_probs=True``, tether's trick.

Both sides see the same batches in the same order: TRL gets the rows in the order tether's
``DataCursor`` draws them (epoch 0) and samples them sequentially. (With more steps than one epoch
holds, later epochs are shuffled differently by the two; a warning says so.)

Measured per run: s/step (median over the steps after ``--warmup``; tether's from the
``s_per_step`` it logs, TRL's from the time between consecutive ``on_step_end`` callbacks), the
one-time reference precompute seconds (tether: ``PrecomputedReference.build``; TRL: the model hash
and ``_precompute_ref_logps``), setup seconds (imports, model load, tokenisation, precompute), the
end-to-end wall time of the subprocess (tether's includes its final checkpoint and
``save_pretrained``, which it always writes; TRL runs with ``save_strategy="no"``), the peak RSS,
and the first logged loss (``logging_steps=1``: the loss of the first batch, before any update,
where policy = reference, so log 2 = 0.693147 in exact arithmetic).

Before the runs, a check process tokenises the data with both libraries and compares every row's
token ids and completion mask, and the per-sequence log-probs of pair 0 computed by each
library's own code on the same weights.

The last line is
``speedup: <X>x steps/s vs TRL, peak RSS ratio <Y>, step-0 |Δloss| <Z>`` for the matched fp32
pair ``tether-fp32`` vs ``trl-fp32`` (X = TRL s/step ÷ tether s/step, Y = tether peak RSS ÷
TRL peak RSS, Z = |Δ first loss|);
the line before gives the same for the defaults-vs-defaults pair.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "data" / "movie_review_prompts.jsonl"
MODEL = "smollm2-135m-instruct"

# name -> how the run is configured. "lib": which library; the rest are that library's settings.
CONFIGS: dict[str, dict] = {
    "tether": {"lib": "tether", "exact_kl_samples": 0, "mixed_precision": "auto"},
    "tether-fp32": {"lib": "tether", "exact_kl_samples": 0, "mixed_precision": "no"},
    "trl-default": {"lib": "trl", "bf16": True, "grad_ckpt": True, "precompute": False},
    "trl-fp32": {"lib": "trl", "bf16": False, "grad_ckpt": False, "precompute": False},
    "trl-fp32-pre": {"lib": "trl", "bf16": False, "grad_ckpt": False, "precompute": True},
}
EXACT_KL_CONFIG = {
    "tether+exactkl": {"lib": "tether", "exact_kl_samples": 2, "mixed_precision": "auto"}
}
MATCHED = ("tether-fp32", "trl-fp32")
DEFAULTS = ("tether", "trl-default")

POSITIVE = [
    "a triumph from start to finish",
    "beautifully shot and wonderfully acted",
    "the kind of film that stays with you for days",
    "funny, warm and genuinely moving",
    "the best thing I have seen all year",
    "a sharp script carried by a brilliant cast",
    "every scene is a pleasure to watch",
    "the score is gorgeous and the pacing is perfect",
    "I left the cinema smiling",
    "a heartfelt story told with real skill",
    "the performances are superb across the board",
    "clever, charming and full of surprises",
]
NEGATIVE = [
    "a tedious mess from start to finish",
    "badly shot and woodenly acted",
    "the kind of film you forget before the credits end",
    "dull, cold and painfully slow",
    "the worst thing I have seen all year",
    "a clumsy script sunk by a bored cast",
    "every scene drags on far too long",
    "the score is grating and the pacing is awful",
    "I left the cinema annoyed",
    "a hollow story told without any care",
    "the performances are flat across the board",
    "predictable, joyless and full of clichés",
]
WORDS_PER_TOKEN = 0.75  # rough English average, only used to size the synthetic responses


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def _response(rng: random.Random, pool: list[str], target_tokens: int) -> str:
    """Sentences drawn from ``pool`` until roughly ``target_tokens`` tokens; starts with a space
    so that tokenising prompt and response apart or together gives the same ids."""
    sentences: list[str] = []
    words = 0
    while words < target_tokens * WORDS_PER_TOKEN or not sentences:
        s = rng.choice(pool)
        sentences.append(s[0].upper() + s[1:] + ".")
        words += len(s.split())
    return " " + " ".join(sentences)


def write_synthetic_pairs(path: Path, n: int, max_length: int, seed: int) -> None:
    """``n`` standard-format pairs: movie-review prompts, a positive (chosen) and a negative
    (rejected) continuation of 1/4 to 1 × ``max_length`` tokens (some get truncated)."""
    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines() if line]
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            rows = {
                "prompt": prompts[i % len(prompts)],
                "chosen": _response(rng, POSITIVE, rng.randint(max_length // 4, max_length)),
                "rejected": _response(rng, NEGATIVE, rng.randint(max_length // 4, max_length)),
            }
            f.write(json.dumps(rows) + "\n")


def read_rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def tether_order(n: int, seed: int) -> list[int]:
    """The epoch-0 order of ``tether.train.common.DataCursor`` (the check process asserts it)."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


# ------------------------------------------------------------------------------------------------
# Child processes
# ------------------------------------------------------------------------------------------------


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _step_times(marks: list[tuple[float, float]]) -> dict[str, list[float]]:
    """Wall and CPU seconds of each step, from marks at loop start and after each step."""
    pairs = list(zip(marks, marks[1:], strict=False))
    return {
        "step_s": [b[0] - a[0] for a, b in pairs],
        "step_cpu_s": [b[1] - a[1] for a, b in pairs],
    }


def _tether_config(a: dict, out_dir: str, spec: dict):
    from tether.train.dpo import DPOConfig

    return DPOConfig(
        model=a["model"],
        train_data=a["data"],
        output_dir=out_dir,
        seed=a["seed"],
        max_steps=a["steps"],
        logging_steps=1,
        save_steps=0,
        batch_size=a["batch_size"],
        max_length=a["max_length"],
        max_prompt_length=a["max_length"] - 1,
        eval_fraction=0.0,
        eval_generate=False,  # no held-out pairs to sample from (TRL: eval_strategy="no")
        beta=a["beta"],
        loss_type="sigmoid",
        learning_rate=a["lr"],
        exact_kl_samples=spec["exact_kl_samples"],
        dtype="float32",
        mixed_precision=spec["mixed_precision"],
    )


def child_tether(spec: dict, a: dict, t_start: float) -> dict:
    import torch

    import tether.train.common as common_mod
    import tether.train.dpo as dpo_mod
    from tether.reference import PrecomputedReference
    from tether.runs import read_metrics
    from tether.train.common import resolve_mixed_precision

    t_imported = time.perf_counter()
    marks: list[tuple[float, float]] = []  # (wall, cpu) at loop start, then after each step

    class MarkedCursor(dpo_mod.DataCursor):  # built right before the training loop starts
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            marks.append(_now())

    def marked_optimizer(*args, **kwargs):
        optimizer = make_optimizer(*args, **kwargs)
        optimizer.register_step_post_hook(lambda *_: marks.append(_now()))
        return optimizer

    # the trainers build their optimizer in tether.train.common.prepare_training
    make_optimizer = common_mod.make_optimizer
    dpo_mod.DataCursor = MarkedCursor
    common_mod.make_optimizer = marked_optimizer
    precompute_s = []
    build = PrecomputedReference.build.__func__

    def timed_build(cls, *args, **kwargs):
        t = time.perf_counter()
        try:
            return build(cls, *args, **kwargs)
        finally:
            precompute_s.append(time.perf_counter() - t)

    PrecomputedReference.build = classmethod(timed_build)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _tether_config(a, str(Path(tmp) / "run"), spec)
        t0 = time.perf_counter()
        dpo_mod.train(cfg)
        train_s = time.perf_counter() - t0
        records = [r for r in read_metrics(cfg.output_dir) if "s_per_step" in r]
    first = records[0]
    return {
        "settings": {
            "weights": "float32",
            "mixed_precision": resolve_mixed_precision(cfg.mixed_precision),
            "activation_checkpointing": cfg.activation_checkpointing,
            "packing": "auto",
            "reference": cfg.reference_kind,
            "exact_kl_samples": cfg.exact_kl_samples,
            "optimizer": "torch.optim.AdamW(fused=True)",
            "torch_threads": torch.get_num_threads(),
        },
        **_step_times(marks),
        "logged_s_per_step": [r["s_per_step"] for r in records],
        "first_loss": first["loss"],
        "first_logps_chosen": first["logps/chosen"],
        "first_logps_rejected": first["logps/rejected"],
        "import_s": t_imported - t_start,
        "precompute_s": sum(precompute_s),
        "setup_s": marks[0][0] - t_start,
        "train_call_s": train_s,
        "steps_logged": len(records),
    }


def _trl_args(spec: dict, a: dict, out_dir: str) -> tuple[object, list[str]]:
    """TRL's DPOConfig for ``spec``; falls back (and says why) where TRL refuses a setting."""
    from trl import DPOConfig

    notes: list[str] = []
    kwargs = dict(
        output_dir=out_dir,
        seed=a["seed"],
        max_steps=a["steps"],
        per_device_train_batch_size=a["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=a["lr"],
        beta=a["beta"],
        loss_type=["sigmoid"],
        max_length=a["max_length"],
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        push_to_hub=False,
        use_cpu=True,
        bf16=spec["bf16"],
        gradient_checkpointing=spec["grad_ckpt"],
        precompute_ref_log_probs=spec["precompute"],
        train_sampling_strategy="sequential",  # the rows come in tether's order
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    try:
        return DPOConfig(**kwargs), notes
    except ValueError as e:
        if not spec["bf16"]:
            raise
        notes.append(f"TRL refused bf16=True with use_cpu=True ({e}); fell back to bf16=False")
        kwargs["bf16"] = False
        return DPOConfig(**kwargs), notes


def child_trl(spec: dict, a: dict, t_start: float) -> dict:
    import torch
    import trl.trainer.dpo_trainer as dpo_mod
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOTrainer

    t_imported = time.perf_counter()
    precompute_s: dict[str, float] = {"hash_module": 0.0, "_precompute_ref_logps": 0.0}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                precompute_s[key] += time.perf_counter() - t

        return wrapper

    DPOTrainer._precompute_ref_logps = timed(
        DPOTrainer._precompute_ref_logps, "_precompute_ref_logps"
    )
    dpo_mod.hash_module = timed(dpo_mod.hash_module, "hash_module")  # the precompute cache key

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, float]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [_now()]

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(_now())

    rows = read_rows(a["data"])
    order = tether_order(len(rows), a["seed"])
    dataset = Dataset.from_list([rows[i] for i in order])
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        args, notes = _trl_args(spec, a, tmp)
        tok = AutoTokenizer.from_pretrained(a["model"])
        trainer = DPOTrainer(
            model=a["model"],  # the local path: TRL loads it (fp32) and its reference from it
            args=args,
            train_dataset=dataset,
            processing_class=tok,
            callbacks=[timer],
        )
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
        logs = [h for h in trainer.state.log_history if "loss" in h]
        model_dtype = str(trainer.model.dtype)
        ref_model = "none (precomputed)" if trainer.ref_model is None else "live copy"
    first = min(logs, key=lambda h: h["step"])
    return {
        "settings": {
            "weights": model_dtype,
            "bf16_autocast": args.bf16,
            "use_cpu": args.use_cpu,
            "gradient_checkpointing": args.gradient_checkpointing,
            "precompute_ref_log_probs": args.precompute_ref_log_probs,
            "reference": ref_model,
            "optimizer": str(args.optim),
            "torch_threads": torch.get_num_threads(),
            "notes": notes,
        },
        **_step_times(timer.marks),
        "first_loss": first["loss"],
        "first_logps_chosen": first.get("logps/chosen"),
        "first_logps_rejected": first.get("logps/rejected"),
        "import_s": t_imported - t_start,
        "precompute_s": sum(precompute_s.values()),
        "precompute_parts_s": precompute_s,
        "setup_s": timer.marks[0][0] - t_start,
        "train_call_s": train_s,
        "steps_logged": len(logs),
    }


def child_check(a: dict) -> dict:
    """Token ids per row (tether vs TRL) and pair-0 log-probs by each library's own code."""
    import torch
    from transformers import AutoTokenizer

    from tether.data import collate_preferences, load_preference_dataset
    from tether.models import forward_logprobs, load_policy
    from tether.train.common import DataCursor

    n_rows = len(read_rows(a["data"]))
    cursor = DataCursor(n_rows, a["batch_size"], a["seed"])
    drawn = [i for _ in range(n_rows // a["batch_size"]) for i in cursor.next_indices()]
    order = tether_order(n_rows, a["seed"])
    order_ok = drawn == order[: len(drawn)]

    # tether
    policy = load_policy(a["model"], dtype="float32")
    tok = policy.tokenizer
    ds = load_preference_dataset(
        a["data"], tok, max_length=a["max_length"], max_prompt_length=a["max_length"] - 1
    )
    examples = list(ds)
    batch = collate_preferences([examples[0]], tok.pad_token_id)
    resp = batch["response_mask"][:, 1:]
    model = policy.model.eval()
    with torch.no_grad():
        lp = forward_logprobs(model, batch["input_ids"], batch["attention_mask"], mask=resp)
    tether_logps = (lp.logprobs * resp).sum(-1).tolist()  # [chosen, rejected]

    # TRL: its own preprocessing, collator and log-prob path (fused LM head), same weights
    from datasets import Dataset
    from trl import DPOTrainer

    spec = {"bf16": False, "grad_ckpt": False, "precompute": False}
    with tempfile.TemporaryDirectory() as tmp:
        args, _ = _trl_args(spec, a, tmp)
        trainer = DPOTrainer(
            model=a["model"],
            args=args,
            train_dataset=Dataset.from_list(read_rows(a["data"])),
            processing_class=AutoTokenizer.from_pretrained(a["model"]),
        )
    trl_rows = list(trainer.train_dataset)
    mismatches = []
    for ex, row in zip(examples, trl_rows, strict=False):
        for name, resp_ids in (("chosen", ex.chosen_ids), ("rejected", ex.rejected_ids)):
            t_ids = ex.prompt_ids + resp_ids
            t_mask = [0] * len(ex.prompt_ids) + [1] * len(resp_ids)
            r_ids = (row["prompt_ids"] + row[f"{name}_ids"])[: a["max_length"]]
            r_mask = ([0] * len(row["prompt_ids"]) + [1] * len(row[f"{name}_ids"]))[
                : a["max_length"]
            ]
            if t_ids != r_ids or t_mask != r_mask:
                at = next(
                    (k for k, (x, y) in enumerate(zip(t_ids, r_ids, strict=False)) if x != y),
                    min(len(t_ids), len(r_ids)),
                )
                mismatches.append(
                    {
                        "row": ex.index,
                        "field": name,
                        "tether_len": len(t_ids),
                        "trl_len": len(r_ids),
                        "first_diff_at": at,
                        "tether_tail": tok.decode(t_ids[at : at + 8]),
                        "trl_tail": tok.decode(r_ids[at : at + 8]),
                        "mask_differs": t_mask != r_mask,
                    }
                )
    trl_batch = trainer.data_collator([trainer.train_dataset[0]])
    trainer.model.eval()
    with torch.no_grad():
        chosen, rejected = trainer.compute_ref_log_probs(trainer.ref_model, trl_batch)
    trl_logps = [chosen.item(), rejected.item()]
    n_tokens = [len(ex.prompt_ids) + len(ex.chosen_ids) for ex in examples]
    n_tokens += [len(ex.prompt_ids) + len(ex.rejected_ids) for ex in examples]
    return {
        "rows": len(examples),
        "trl_rows": len(trl_rows),
        "cursor_order_matches": order_ok,
        "token_mismatches": len(mismatches),
        "first_mismatches": mismatches[:3],
        "pair0_logps_tether": tether_logps,
        "pair0_logps_trl": trl_logps,
        "pair0_max_abs_diff": max(abs(x - y) for x, y in zip(tether_logps, trl_logps, strict=True)),
        "mean_seq_tokens": sum(n_tokens) / len(n_tokens),
        "truncated_rows": ds.num_truncated,
    }


def run_child(argv: list[str]) -> None:
    t_start = time.perf_counter()
    name, a, result_path = argv[0], json.loads(argv[1]), argv[2]
    if a["threads"]:
        import torch

        torch.set_num_threads(a["threads"])
    if name == "check":
        out = child_check(a)
    else:
        spec = {**CONFIGS, **EXACT_KL_CONFIG}[name]
        out = (child_tether if spec["lib"] == "tether" else child_trl)(spec, a, t_start)
    out["peak_rss_mib"] = _peak_rss_mib()
    Path(result_path).write_text(json.dumps(out))


# ------------------------------------------------------------------------------------------------
# Parent
# ------------------------------------------------------------------------------------------------


def spawn(name: str, a: dict, work: Path) -> dict:
    """Run one configuration in a fresh process; its output goes to ``<work>/<name>.log``."""
    result = work / f"{name}.json"
    log = work / f"{name}.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(work / f"hf-datasets-{name}"),  # cold TRL precompute cache
        "TETHER_CACHE": str(work / f"tether-cache-{name}"),  # cold tether reference cache
        "TOKENIZERS_PARALLELISM": "false",
        **({"OMP_NUM_THREADS": str(a["threads"])} if a["threads"] else {}),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, json.dumps(a)]
    print(f"[{name}] running ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run([*cmd, str(result)], stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        print(f"[{name}] FAILED (exit {proc.returncode}); last lines of {log}:\n{tail}", flush=True)
        return {"error": f"exit {proc.returncode}", "end_to_end_s": wall}
    out = json.loads(result.read_text())
    out["end_to_end_s"] = wall
    print(f"[{name}] done in {wall:.1f} s", file=sys.stderr, flush=True)
    return out


def summarise(r: dict, warmup: int) -> dict:
    steps = r.get("step_s") or []
    skip = min(warmup, max(len(steps) - 1, 0))
    r["s_per_step"] = statistics.median(steps[skip:]) if steps else math.nan
    # after the loop: tether's final checkpoint + save_pretrained, interpreter exit (both)
    r["teardown_s"] = r["end_to_end_s"] - r["setup_s"] - sum(steps)
    cpu = r.get("step_cpu_s") or []
    r["cpu_s_per_step"] = statistics.median(cpu[skip:]) if cpu else math.nan
    r["steps_in_median"] = len(steps) - skip
    return r


def pair_line(results: dict, tether: str, trl: str) -> tuple[str, dict]:
    t, o = results.get(tether, {}), results.get(trl, {})
    if "s_per_step" not in t or "s_per_step" not in o:
        return "n/a (a run is missing or failed)", {}
    x = o["s_per_step"] / t["s_per_step"]
    y = t["peak_rss_mib"] / o["peak_rss_mib"]
    z = abs(t["first_loss"] - o["first_loss"])
    line = f"{x:.2f}x steps/s vs TRL, peak RSS ratio {y:.2f}, step-0 |Δloss| {z:.2e}"
    w = abs(t["first_logps_chosen"] - o["first_logps_chosen"])
    return line, {"speedup": x, "rss_ratio": y, "abs_dloss": z, "abs_dlogps_chosen": w}


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        run_child(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--max-length", type=int, default=256, help="max prompt+response tokens")
    p.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (both default)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO β (both default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    p.add_argument("--threads", type=int, help="torch threads per run (default: torch's)")
    p.add_argument(
        "--data", help="preference JSONL (prompt/chosen/rejected) instead of synthetic pairs"
    )
    p.add_argument("--only", choices=["tether", "trl"], help="run one library's rows only")
    p.add_argument("--configs", help="comma-separated rows to run (default: all)")
    p.add_argument("--with-exact-kl", action="store_true", help="add tether+exactkl row")
    p.add_argument("--skip-check", action="store_true", help="skip the tokenisation check")
    p.add_argument("--out", help="write all results as JSON here")
    p.add_argument(
        "--model", help="a local HF model directory (default: the embedded SmolLM2-135M-Instruct)"
    )
    args = p.parse_args()
    if args.steps < 1 or args.batch_size < 1 or args.max_length < 8:
        p.error("need --steps ≥ 1, --batch-size ≥ 1, --max-length ≥ 8")

    sys.path.insert(0, str(REPO))
    from tether.models import embedded_model_path

    model_path = args.model or str(embedded_model_path(MODEL))
    configs = dict(CONFIGS)
    if args.with_exact_kl:
        configs.update(EXACT_KL_CONFIG)
    if args.only:
        configs = {k: v for k, v in configs.items() if v["lib"] == args.only}
    if args.configs:
        names = [c.strip() for c in args.configs.split(",") if c.strip()]
        unknown = [c for c in names if c not in {**CONFIGS, **EXACT_KL_CONFIG}]
        if unknown:
            p.error(f"--configs: unknown {unknown}")
        configs = {k: v for k, v in configs.items() if k in names}

    with tempfile.TemporaryDirectory(prefix="dpo_vs_trl-") as tmp:
        work = Path(tmp)
        if args.data:
            data = str(Path(args.data).resolve())
        else:
            data = str(work / "pairs.jsonl")
            n = max(args.steps * args.batch_size, args.batch_size)
            write_synthetic_pairs(Path(data), n, args.max_length, args.seed)
        n_rows = len(read_rows(data))
        if args.steps * args.batch_size > n_rows:
            print(
                f"warning: {args.steps} steps × {args.batch_size} pairs > {n_rows} rows: after "
                "the first epoch tether and TRL shuffle differently (batches differ)",
                file=sys.stderr,
            )
        a = {
            "model": model_path,
            "data": data,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "lr": args.lr,
            "beta": args.beta,
            "seed": args.seed,
            "threads": args.threads,
        }
        check = None if args.skip_check else spawn("check", a, work)
        results = {name: spawn(name, a, work) for name in configs}

    for r in results.values():
        if "error" not in r:
            summarise(r, args.warmup)

    print()
    print(
        f"DPO (sigmoid, β={args.beta}, lr={args.lr:g}), {MODEL}, {n_rows} pairs "
        f"({'--data ' + args.data if args.data else 'synthetic'}), batch {args.batch_size}, "
        f"max length {args.max_length}, {args.steps} steps, median over steps > {args.warmup}"
    )
    if check and "error" not in check:
        print(
            f"check: {check['rows']} rows (TRL kept {check['trl_rows']}), token-id mismatches "
            f"{check['token_mismatches']}, mean seq tokens {check['mean_seq_tokens']:.1f}, "
            f"truncated rows {check['truncated_rows']}, batch order matches DataCursor: "
            f"{check['cursor_order_matches']}"
        )
        lt, lr_ = check["pair0_logps_tether"], check["pair0_logps_trl"]
        print(
            f"check: pair 0 log π(chosen), log π(rejected): tether {lt[0]:.5f}, {lt[1]:.5f}; "
            f"TRL {lr_[0]:.5f}, {lr_[1]:.5f}; max |Δ| {check['pair0_max_abs_diff']:.2e}"
        )
        for m in check["first_mismatches"]:
            print(f"check: mismatch {m}")
        if check["token_mismatches"] or check["pair0_max_abs_diff"] > 1e-3:
            print(
                "WARNING: tether and TRL do not train on the same tokens (see the mismatches); "
                "the step-0 loss is log 2 on both regardless, the timings are not like for like"
            )
    header = (
        f"{'configuration':<16}{'s/step':>9}{'CPU s/step':>12}{'peak RSS MiB':>14}"
        f"{'step-0 loss':>13}{'logps/chosen@0':>16}{'precompute s':>14}{'setup s':>9}"
        f"{'teardown s':>12}{'end-to-end s':>14}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<16}{'FAILED: ' + r['error']:>30}")
            continue
        print(
            f"{name:<16}{_fmt(r['s_per_step'], '.3f'):>9}{_fmt(r['cpu_s_per_step'], '.3f'):>12}"
            f"{_fmt(r['peak_rss_mib'], '.0f'):>14}"
            f"{_fmt(r['first_loss'], '.6f'):>13}{_fmt(r.get('first_logps_chosen'), '.3f'):>16}"
            f"{_fmt(r['precompute_s'], '.2f'):>14}{_fmt(r['setup_s'], '.1f'):>9}"
            f"{_fmt(r['teardown_s'], '.1f'):>12}{_fmt(r['end_to_end_s'], '.1f'):>14}"
        )
    for name, r in results.items():
        if "settings" in r:
            print(f"  {name}: {json.dumps(r['settings'])}")

    ratios = {}
    for label, (t, o) in (
        ("fp32, TRL precomputed reference", ("tether-fp32", "trl-fp32-pre")),
        ("defaults vs defaults", DEFAULTS),
        ("matched fp32", MATCHED),
    ):
        line, ratios[label] = pair_line(results, t, o)
        if ratios[label]:
            line += f"; step-0 logps/chosen |Δ| {ratios[label]['abs_dlogps_chosen']:.2e}"
        print(f"tether/TRL, {label} ({t} vs {o}): {line}")
    if args.out:
        Path(args.out).write_text(
            json.dumps({"args": vars(args), "check": check, "results": results, "ratios": ratios})
        )
    print(f"defaults-vs-defaults speedup: {pair_line(results, *DEFAULTS)[0]}")
    print(f"speedup: {pair_line(results, *MATCHED)[0]}")


if __name__ == "__main__":
    main()
