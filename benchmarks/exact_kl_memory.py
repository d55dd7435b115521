"""Peak memory and time of tether's chunked exact KL vs the naive full-tensor computation.

Shape: the SmolLM2 vocabulary V = 49152 at B·T = 4096 positions (e.g. 8 sequences × 512 tokens).
Each (method, mode) runs in a fresh subprocess so peaks don't mix. On CPU the peak is the growth of
the process's peak RSS over its RSS once the inputs exist; on CUDA it is
torch.cuda.max_memory_allocated over the allocated bytes once the inputs exist.

    python benchmarks/exact_kl_memory.py                       # fp32 logits, CPU
    python benchmarks/exact_kl_memory.py --dtype bf16 --device cuda

"naive" is what peers do: log_softmax of both full (B,T,V) tensors in fp32, then
Σ p·(log p − log q), differentiated by autograd.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _child(method: str, mode: str, dtype: str, device: str, n: int, vocab: int) -> dict:
    import torch
    import torch.nn.functional as F

    from tether.core.kl import exact_from_logits

    torch.manual_seed(0)
    dt = getattr(torch, DTYPES[dtype])
    logits = torch.randn(n, vocab, device=device, dtype=dt)
    ref = torch.randn(n, vocab, device=device, dtype=dt)
    if mode == "fwd+bwd":
        logits.requires_grad_(True)
    mask = torch.ones(n, dtype=torch.bool, device=device)

    def run():
        if method == "tether":
            out = exact_from_logits(logits, ref, mask)
        else:
            lp = F.log_softmax(logits.float(), dim=-1)
            lq = F.log_softmax(ref.float(), dim=-1)
            out = torch.where(mask, (lp.exp() * (lp - lq)).sum(-1), 0.0)
        if mode == "fwd+bwd":
            out.sum().backward()
        return out

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
    t0 = time.perf_counter()
    if mode == "fwd+bwd":
        out = run()
    else:
        with torch.no_grad():
            out = run()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"peak_bytes": peak, "seconds": seconds, "kl_mean": out.float().mean().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--positions", type=int, default=4096, help="B·T")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", nargs=2, metavar=("METHOD", "MODE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(_child(*a.child, a.dtype, a.device, a.positions, a.vocab)))
        return

    input_bytes = a.positions * a.vocab * (4 if a.dtype == "fp32" else 2)
    print(
        f"exact KL, B·T={a.positions}, V={a.vocab}, {a.dtype} logits on {a.device}; "
        f"one logits tensor = {input_bytes / 2**20:.0f} MiB"
    )
    print(f"{'mode':8s} {'method':7s} {'peak extra MiB':>15s} {'seconds':>8s} {'mean KL':>10s}")
    results: dict[tuple[str, str], dict] = {}
    for mode in ("fwd", "fwd+bwd"):
        for method in ("naive", "tether"):
            cmd = [sys.executable, __file__, "--child", method, mode, "--dtype", a.dtype]
            cmd += ["--device", a.device, "--positions", str(a.positions), "--vocab", str(a.vocab)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            results[(mode, method)] = r
            print(
                f"{mode:8s} {method:7s} {r['peak_bytes'] / 2**20:15.0f} {r['seconds']:8.2f} "
                f"{r['kl_mean']:10.6f}"
            )
    for mode in ("fwd", "fwd+bwd"):
        naive, ours = results[(mode, "naive")], results[(mode, "tether")]
        assert abs(naive["kl_mean"] - ours["kl_mean"]) < 1e-4, "the two computations disagree"
        mem = ours["peak_bytes"] / naive["peak_bytes"]
        t = ours["seconds"] / naive["seconds"]
        print(f"{mode}: peak extra memory ratio tether/naive {mem:.3f}, time ratio {t:.2f}")
    grad = input_bytes * 2**-20
    fb_n, fb_t = (
        results[("fwd+bwd", m)]["peak_bytes"] * 2**-20 - grad for m in ("naive", "tether")
    )
    print(
        f"fwd+bwd beyond the {grad:.0f} MiB gradient itself: "
        f"naive {fb_n:.0f} MiB, tether {fb_t:.0f} MiB"
    )


if __name__ == "__main__":
    main()
