"""One process vs N processes with the same global batch: DPO and GRPO on SmolLM2-135M-Instruct,
with the whole model on every process (DDP) or sharded (FSDP2).

For each trainer, a run on 1 process with ``batch_size`` N·B and a run on N processes
(``torchrun --nproc_per_node N``, gloo on CPU / NCCL on GPUs) with ``batch_size`` B per process.
tether samples every sequence from its own seed and reduces every batch statistic over processes,
so the two runs must log the same losses, rewards, KLs, β and learning rates (to float summation
order) and end with the same weights; this script prints both curves side by side, the largest
differences and the seconds per step of each run.

    python benchmarks/scaling.py                         # DPO and GRPO, 6 steps each, N = 2
    python benchmarks/scaling.py --trainers grpo --steps 3 --out runs/scaling.json
    python benchmarks/scaling.py --sharding fsdp2 --steps 3   # + DDP vs FSDP2 memory per rank

``--sharding fsdp2`` adds a third run, N processes with ``sharding=fsdp2``, compares it with the
1-process run the same way, and prints per rank the MiB of parameters, gradients (at their peak:
one per trainable parameter) and optimizer state each process holds, and its peak RSS, DDP vs
FSDP2 (the runs' ``memory/*`` metrics), with FSDP2's model state as a fraction of DDP's.

GRPO: the movie-review prompts, VADER reward, G = 4, 32 new tokens, the adaptive β controller
(target 0.05 nats, horizon 64 samples, so β moves every step), lr 1e-5. DPO: synthetic
movie-review pairs (benchmarks/dpo_vs_trl.py), sigmoid loss, β 0.1, lr 5e-6, max length 128,
a precomputed reference. The recipes' LR schedules (warmup + cosine for DPO). fp32 throughout
(``mixed_precision=no``): bf16 autocast rounds a batch of 8 differently from two batches of 4,
and a sampled token can flip. On a 2-core machine the N-process run has one core per process;
the 1-process run gets both (``--threads``). ``--model`` runs another model (the smoke test in
``make test`` uses a tiny random one).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

KEYS = {
    "dpo": ["loss", "rewards/accuracy", "rewards/margin", "kl/chosen_k3", "lr"],
    "grpo": ["score", "kl/k3", "beta", "loss/policy", "grad_norm", "lr"],
}
PARTS = ("params", "grads", "optimizer", "peak_rss")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(
    trainer: str,
    batch: int,
    steps: int,
    out: Path,
    data: Path,
    model: str | None,
    lengths: tuple[int, int] = (128, 64),
) -> list[str]:
    common = [
        *([f"model={model}"] if model else []),
        f"output_dir={out}",
        f"batch_size={batch}",
        f"max_steps={steps}",
        "logging_steps=1",
        "save_steps=0",
        "mixed_precision=no",
        "seed=0",
    ]
    if trainer == "grpo":
        return common + [
            "prompts=data/movie_review_prompts.jsonl",
            "reward=vader",
            "num_generations=4",
            "max_new_tokens=32",
            "learning_rate=1e-5",
            "kl_controller=adaptive",
            "kl_target=0.05",
            "kl_horizon=64",
            "eval_steps=0",
        ]
    return common + [
        f"train_data={data}",
        f"max_length={lengths[0]}",
        f"max_prompt_length={lengths[1]}",
        "beta=0.1",
        "learning_rate=5e-6",
        "reference=precomputed",
        f"eval_steps={steps}",
        "eval_generate=false",
    ]


def run(
    trainer: str,
    nproc: int,
    batch: int,
    steps: int,
    out: Path,
    data: Path,
    threads: int,
    model: str | None = None,
    sharding: str = "none",
    lengths: tuple[int, int] = (128, 64),
) -> list[dict]:
    cmd = ["-m", "tether.cli", "train", trainer, "-c", f"recipes/{trainer}.yaml"]
    cmd += _overrides(trainer, batch, steps, out, data, model, lengths)
    cmd += [f"sharding={sharding}"]
    if nproc == 1:
        argv = [sys.executable, *cmd]
    else:
        argv = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={_port()}",
            *cmd,
        ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    print(f"$ {' '.join(argv[1:])}  (OMP_NUM_THREADS={threads})", flush=True)
    subprocess.run(argv, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    return [r for r in rows if "s_per_step" in r]


def compare(trainer: str, one: list[dict], many: list[dict], a: Path, b: Path) -> dict:
    """max |Δ| of the logged curves and of the final weights of two runs."""
    from safetensors.torch import load_file

    diffs = {
        k: max(abs(x[k] - y[k]) for x, y in zip(one, many, strict=True) if k in x and k in y)
        for k in KEYS[trainer]
        if any(k in x for x in one)
    }
    wa = load_file(str(a / "final" / "model.safetensors"))
    wb = load_file(str(b / "final" / "model.safetensors"))
    diffs["weights (max |Δ|)"] = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    return diffs


def memory(rows: list[dict], nproc: int) -> dict[str, list[float]]:
    """Per rank, the MiB of each part (the run's last row with ``memory/*`` metrics)."""
    last = [r for r in rows if "memory/model_state_mib" in r][-1]
    return {part: [last[f"memory/rank{r}/{part}_mib"] for r in range(nproc)] for part in PARTS}


def markdown(results: dict) -> str:
    """The README's tables from a results file: per trainer and rank, DDP vs FSDP2 MiB, and
    FSDP2 against 1 process."""
    lines = [
        "| trainer | rank | params DDP / FSDP2 | grads DDP / FSDP2 | AdamW state DDP / FSDP2 "
        "| peak RSS DDP / FSDP2 |",
        "|---|---|---|---|---|---|",
    ]
    for trainer, res in results.items():
        if "memory_mib" not in res:
            continue
        ddp, fsdp = res["memory_mib"]["ddp"], res["memory_mib"]["fsdp2"]
        for r in range(len(ddp["params"])):
            cells = [f"{ddp[p][r]:.1f} / {fsdp[p][r]:.1f}" for p in PARTS]
            lines.append(f"| {trainer} | {r} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| trainer | model state per rank, FSDP2 / DDP | FSDP2 vs 1 process, max \\|Δ\\| "
        "| s/step 1 proc / DDP / FSDP2 |",
        "|---|---|---|---|",
    ]
    for trainer, res in results.items():
        if "memory_mib" not in res:
            continue
        diffs = ", ".join(
            f"{k.replace('|', chr(92) + '|')} {v:.1e}" for k, v in res["max_abs_diff_fsdp2"].items()
        )
        speed = " / ".join(
            f"{res[k]:.1f}" for k in ("s_per_step_one", "s_per_step_many", "s_per_step_fsdp2")
        )
        lines.append(f"| {trainer} | {res['model_state_ratio']:.3f}× | {diffs} | {speed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trainers", default="dpo,grpo")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--dpo-batch", type=int, default=4, help="DPO pairs per process")
    ap.add_argument("--grpo-batch", type=int, default=2, help="GRPO prompts per process")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="1-process threads")
    ap.add_argument("--sharding", choices=("none", "fsdp2"), default="none")
    ap.add_argument("--model", default=None, help="default: the recipes' (SmolLM2-135M)")
    ap.add_argument("--dpo-lengths", default="128,64", help="DPO max_length,max_prompt_length")
    ap.add_argument("--out", default="runs/scaling.json")
    ap.add_argument("--table", default=None, help="print the markdown tables of a results file")
    a = ap.parse_args(argv)
    if a.table:
        results = json.loads(Path(a.table).read_text())
        print(markdown(results))
        return results
    lengths = tuple(int(x) for x in a.dpo_lengths.split(","))
    from dpo_vs_trl import write_synthetic_pairs

    work = Path(tempfile.mkdtemp(prefix="tether-scaling-"))
    data = work / "pairs.jsonl"
    write_synthetic_pairs(data, 64, 128, seed=0)
    results = {}
    per_proc = max(1, a.threads // a.nproc)
    for trainer in a.trainers.split(","):
        b = a.dpo_batch if trainer == "dpo" else a.grpo_batch
        single, multi = work / f"{trainer}-1", work / f"{trainer}-{a.nproc}"
        one = run(
            trainer, 1, a.nproc * b, a.steps, single, data, a.threads, a.model, "none", lengths
        )
        many = run(trainer, a.nproc, b, a.steps, multi, data, per_proc, a.model, "none", lengths)
        diffs = compare(trainer, one, many, single, multi)
        res = {
            "global_batch": a.nproc * b,
            "one": one,
            "many": many,
            "max_abs_diff": diffs,
            "s_per_step_one": _median([r["s_per_step"] for r in one[1:]]),
            "s_per_step_many": _median([r["s_per_step"] for r in many[1:]]),
        }
        print(f"\n{trainer}: global batch {a.nproc * b}, 1 vs {a.nproc} processes")
        key = KEYS[trainer][0]
        print(f"step  {key} (1 proc)  {key} ({a.nproc} proc)")
        for x, y in zip(one, many, strict=True):
            nan = float("nan")
            print(f"{x['step']:>4}  {x.get(key, nan):>12.6f}  {y.get(key, nan):>12.6f}")
        print("max |Δ|:", {k: f"{v:.2e}" for k, v in diffs.items()})
        print(
            f"s/step (median after the first): 1 proc {res['s_per_step_one']:.2f}, "
            f"{a.nproc} proc {res['s_per_step_many']:.2f}"
        )
        if a.sharding == "fsdp2":
            sharded = work / f"{trainer}-{a.nproc}-fsdp2"
            rows = run(
                trainer, a.nproc, b, a.steps, sharded, data, per_proc, a.model, "fsdp2", lengths
            )
            res["fsdp2"] = rows
            res["max_abs_diff_fsdp2"] = compare(trainer, one, rows, single, sharded)
            res["s_per_step_fsdp2"] = _median([r["s_per_step"] for r in rows[1:]])
            ddp, fsdp = memory(many, a.nproc), memory(rows, a.nproc)
            res["memory_mib"] = {"ddp": ddp, "fsdp2": fsdp}
            state = [
                max(sum(m[p][r] for p in PARTS[:3]) for r in range(a.nproc)) for m in (ddp, fsdp)
            ]
            res["model_state_ratio"] = state[1] / state[0]
            print(f"\n{trainer}: {a.nproc} processes, DDP vs FSDP2 (MiB per rank)")
            print("rank  part         DDP      FSDP2")
            for r in range(a.nproc):
                for p in PARTS:
                    print(f"{r:>4}  {p:<9} {ddp[p][r]:>9.1f}  {fsdp[p][r]:>9.1f}")
            print(
                f"model state (params + grads + optimizer), largest rank: DDP {state[0]:.1f}, "
                f"FSDP2 {state[1]:.1f} MiB = {res['model_state_ratio']:.3f}× DDP's"
            )
            print(
                "FSDP2 vs 1 process, max |Δ|:",
                {k: f"{v:.2e}" for k, v in res["max_abs_diff_fsdp2"].items()},
            )
            print(f"s/step FSDP2 {res['s_per_step_fsdp2']:.2f}")
        results[trainer] = res
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {a.out}")
    if a.sharding == "fsdp2":
        print(markdown(results))
    return results


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


if __name__ == "__main__":
    main()
