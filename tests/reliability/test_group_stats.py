"""Group statistics over the *valid* members of a group (``reward_on_invalid=skip``), and the
sequence count of the ``seq_sum`` / ``seq_mean`` aggregations.

A sample whose reward is not finite is skipped: GRPO's group mean and std (Shao et al. 2024,
arXiv:2402.03300 §4.1.2) and RLOO's leave-one-out baseline (Ahmadian et al. 2024,
arXiv:2402.14740 eq. 7) are then taken over the n valid members, as TRL's nan-aware statistics
do; a skipped sample has advantage 0 and no weight in the loss or its denominators; a group with
n < 2 has advantage 0 throughout. Checked against hand values, against an independent numpy
computation (nanmean / nanstd with ddof=1, TRL's definition), and end to end through a GRPO update
on the tiny model with a reward function that returns NaN for some completions.
"""

import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tether.core.advantages import group_relative, leave_one_out
from tether.core.masked import aggregate
from tether.data import load_prompt_dataset
from tether.models import load_policy
from tether.reference import CopyReference
from tether.rewards import make_reward
from tether.runs import read_metrics
from tether.train.distributed import Dist
from tether.train.grpo import GRPOConfig, RLOOConfig, group_advantages, group_update
from tether.train.grpo import train as train_group
from tether.train.rl import (
    Experience,
    PolicyWithValue,
    RLSession,
    aggregation_denominator,
    collect,
    sequence_rewards,
)

NAN = float("nan")
G = 4
REWARD = "tests.reliability.test_group_stats:nan_for_some"


# -- a reward function that returns NaN for some completions -------------------------------------


def nan_for_some(prompts: list[str], completions: list[str]) -> list[float]:
    """The completion's mean character code / 255, capped at 1 (spread out even for a random
    model's output), or NaN, by the prompt's number k ("Say k:") and the sample's place j in its
    group: k % 4 == 0: every sample NaN (no valid member); k % 4 == 1: NaN but for j = 0 (one
    valid member); k % 4 == 2: NaN for j = 1 (one skipped member); k % 4 == 3: no NaN."""
    out, j = [], 0
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        j = j + 1 if i and prompts[i - 1] == p else 0
        k = int(re.search(r"Say (\d+):", p).group(1)) % 4
        nan = k == 0 or (k == 1 and j > 0) or (k == 2 and j == 1)
        out.append(NAN if nan else sum(min(ord(ch), 255) for ch in c) / (255 * max(len(c), 1)))
    return out


# -- an independent computation: numpy's nan-aware statistics, as TRL computes them --------------


def _numpy_grpo(scores: np.ndarray, scale: bool, eps: float) -> np.ndarray:
    """(B,) with NaN at skipped samples → (B,) advantages, group by group with numpy."""
    out = np.zeros_like(scores)
    for start in range(0, len(scores), G):
        r = scores[start : start + G]
        if np.count_nonzero(~np.isnan(r)) < 2:
            continue
        a = r - np.nanmean(r)
        if scale:
            a = a / (np.nanstd(r, ddof=1) + eps)
        out[start : start + G] = np.nan_to_num(a, nan=0.0)
    return out


def _numpy_rloo(scores: np.ndarray) -> np.ndarray:
    """baseline_i = (Σ_valid r − r_i)/(n_valid − 1), by an explicit loop over the other members."""
    out = np.zeros_like(scores)
    for start in range(0, len(scores), G):
        r = scores[start : start + G]
        for i in range(G):
            others = [r[j] for j in range(G) if j != i and not np.isnan(r[j])]
            if not np.isnan(r[i]) and others:
                out[start + i] = r[i] - sum(others) / len(others)
    return out


def _random_scores(seed: int, groups: int = 64) -> np.ndarray:
    """(groups·G,) float64 rewards with every count of valid members 0..G represented."""
    rng = np.random.default_rng(seed)
    s = rng.normal(size=groups * G) * rng.uniform(0.1, 10.0, size=groups * G)
    for grp in range(groups):
        n_skip = grp % (G + 1)  # 0, 1, 2, 3, 4 skipped members in turn
        s[grp * G + rng.choice(G, n_skip, replace=False)] = NAN
    s[:G] = [2.0, 2.0, NAN, 2.0]  # equal valid rewards: std 0, eps keeps it 0
    return s


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("scale", [True, False])
def test_grpo_matches_numpy_nanmean_nanstd(seed, scale):
    s = _random_scores(seed)
    t = torch.from_numpy(s)
    valid = ~torch.isnan(t)
    adv = group_relative(t, G, scale=scale, eps=1e-4, valid=valid)
    assert adv.dtype == torch.float64 and bool(torch.isfinite(adv).all())
    np.testing.assert_allclose(adv.numpy(), _numpy_grpo(s, scale, 1e-4), rtol=1e-12, atol=1e-12)
    # float32 scores: the same to float32 precision
    adv32 = group_relative(t.float(), G, scale=scale, eps=1e-4, valid=valid)
    np.testing.assert_allclose(adv32.numpy(), adv.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_rloo_matches_the_loop_over_the_other_valid_members(seed):
    s = _random_scores(seed)
    t = torch.from_numpy(s)
    adv = leave_one_out(t, G, valid=~torch.isnan(t))
    np.testing.assert_allclose(adv.numpy(), _numpy_rloo(s), rtol=1e-12, atol=1e-12)


def test_hand_values_one_skipped_one_valid_none_valid():
    # groups: [1, 3, skip, 5]; [4, skip, skip, skip]; [skip × 4]; [0, 2, 4, 6] (all valid)
    s = torch.tensor(
        [1.0, 3.0, NAN, 5.0, 4.0, NAN, NAN, NAN, NAN, NAN, NAN, NAN, 0.0, 2.0, 4.0, 6.0],
        dtype=torch.float64,
    )
    valid = ~torch.isnan(s)
    # GRPO: valid mean 3, Bessel std 2 over [1, 3, 5]; [0, 2, 4, 6]: mean 3, std √(20/3)
    sd = math.sqrt(20 / 3)
    want = [-1.0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, -3 / sd, -1 / sd, 1 / sd, 3 / sd]
    torch.testing.assert_close(
        group_relative(s, G, eps=0.0, valid=valid), torch.tensor(want, dtype=torch.float64)
    )
    # RLOO: [1, 3, 5] → r − mean of the other two valid = [−3, 0, 3]; all-valid: 4/3·(r − 3)
    want = [-3.0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, -4, -4 / 3, 4 / 3, 4]
    torch.testing.assert_close(
        leave_one_out(s, G, valid=valid), torch.tensor(want, dtype=torch.float64)
    )


# -- group_advantages on an Experience -----------------------------------------------------------


def _experience(scores: torch.Tensor, valid: torch.Tensor, kl: torch.Tensor) -> Experience:
    n, r = kl.shape
    mask = torch.ones(n, r, dtype=torch.bool) & valid[:, None]  # skipped: no response tokens
    return Experience(
        input_ids=torch.zeros(n, 3 + r, dtype=torch.long),
        attention_mask=torch.ones(n, 3 + r, dtype=torch.bool),
        prompt_length=3,
        response_mask=mask,
        old_logprobs=torch.zeros(n, r),
        ref_logprobs=torch.zeros(n, r),
        kl=torch.where(mask, kl, 0.0),
        scores=torch.where(valid, scores, 0.0),
        valid=valid,
        prompts=[""] * n,
        completions=[""] * n,
        finished=torch.ones(n, dtype=torch.bool),
    )


@pytest.mark.parametrize("cls", [GRPOConfig, RLOOConfig])
def test_group_advantages_use_the_valid_members_of_the_shaped_reward(cls):
    s = _random_scores(3, groups=10)
    valid = torch.from_numpy(~np.isnan(s))
    kl = torch.rand(len(s), 5, generator=torch.Generator().manual_seed(0))
    exp = _experience(torch.from_numpy(np.nan_to_num(s)).float(), valid, kl)
    cfg = cls(num_generations=G, batch_size=10)
    beta = 0.3
    adv = group_advantages(exp, beta, cfg)  # (N, R)
    seq = sequence_rewards(exp, beta, cfg.kl_in).double().numpy()  # score − β·Σ KL for RLOO
    seq[~valid.numpy()] = NAN
    want = _numpy_rloo(seq) if cls is RLOOConfig else _numpy_grpo(seq, True, 1e-4)
    assert bool((adv[~exp.response_mask] == 0).all())  # skipped rows: no advantage anywhere
    np.testing.assert_allclose(adv[:, 0].double().numpy(), want, rtol=1e-5, atol=1e-5)
    # all valid: bit for bit the formula without a mask (what tether computed before)
    exp.valid = torch.ones_like(valid)
    exp.response_mask = torch.ones_like(exp.response_mask)
    seq = sequence_rewards(exp, beta, cfg.kl_in)
    plain = leave_one_out(seq, G) if cls is RLOOConfig else group_relative(seq, G)
    assert torch.equal(group_advantages(exp, beta, cfg), plain[:, None].expand(-1, 5))


# -- seq_sum counts sequences like seq_mean ------------------------------------------------------


def test_seq_sum_counts_the_rows_with_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [9.0, 9.0, 9.0]], dtype=torch.float64)
    m = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    # rows: sums 3 and 15, an empty (skipped) row: (3 + 15)/2 = 9, not 18/3 = 6
    assert aggregate(x, m, "seq_sum").item() == pytest.approx(9.0, abs=1e-12)
    # means 1.5 and 5: (1.5 + 5)/2
    assert aggregate(x, m, "seq_mean").item() == pytest.approx(3.25, abs=1e-12)
    for mode in ("seq_sum", "seq_mean"):
        assert aggregation_denominator(mode, m) == 2.0
        # adding skipped rows changes neither the value nor the count
        pad = torch.cat([m, torch.zeros(3, 3, dtype=torch.bool)])
        xp = torch.cat([x, torch.full((3, 3), 7.0, dtype=x.dtype)])
        assert aggregate(xp, pad, mode).item() == aggregate(x, m, mode).item()
        assert aggregation_denominator(mode, pad) == 2.0
    assert aggregation_denominator("token_mean", m) == 5.0
    # a mini-batch of skipped rows only: denominator 1 (not 0), loss 0
    empty = torch.zeros(2, 3, dtype=torch.bool)
    for mode in ("token_mean", "seq_mean", "seq_sum"):
        d = aggregation_denominator(mode, empty)
        assert d == 1.0 and aggregate(x[:2], empty, mode, d).item() == 0.0


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean", "seq_sum"])
def test_micro_batches_with_skipped_rows_add_up_to_the_mini_batch(mode):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    m = torch.rand(8, 5, generator=g) > 0.3
    m[[1, 4, 5]] = False  # skipped rows
    d = aggregation_denominator(mode, m)
    parts = sum(aggregate(x[i : i + 2], m[i : i + 2], mode, d) for i in range(0, 8, 2))
    assert parts.item() == pytest.approx(aggregate(x, m, mode).item(), abs=1e-12)
    assert parts.item() == pytest.approx(aggregate(x[m.any(-1)], m[m.any(-1)], mode).item())


class _TwoRanks(Dist):
    """One of two processes; the other holds ``other`` (its local counts)."""

    def __init__(self, other: float) -> None:
        super().__init__()
        self.world, self.other = 2, other

    def sum_floats(self, *values: float) -> list[float]:
        return [values[0] + self.other]


def test_denominator_sums_over_processes_before_it_clamps():
    m0 = torch.tensor([[True, False], [False, False], [True, True]])  # 2 rows, 3 tokens
    m1 = torch.zeros(3, 2, dtype=torch.bool)  # every sample of this process skipped
    for mode, local0 in (("seq_sum", 2.0), ("seq_mean", 2.0), ("token_mean", 3.0)):
        assert aggregation_denominator(mode, m0, _TwoRanks(0.0)) == local0
        assert aggregation_denominator(mode, m1, _TwoRanks(local0)) == local0  # the same
        assert aggregation_denominator(mode, m1, _TwoRanks(0.0)) == 1.0  # nothing anywhere


def _denominator_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        acc = SimpleNamespace(num_processes=2, process_index=rank, device=torch.device("cpu"))
        masks = [
            torch.tensor([[True, False], [False, False], [True, True]]),
            torch.tensor([[False, False], [True, True], [False, False]]),
        ]
        res = {
            mode: aggregation_denominator(mode, masks[rank], Dist(acc))
            for mode in ("token_mean", "seq_mean", "seq_sum")
        }
        # rank 0: its one row skipped; rank 1: masks[0], 2 non-empty rows → 2 on both
        mine = masks[0][1:2] if rank == 0 else masks[0]
        res["one_empty"] = aggregation_denominator("seq_sum", mine, Dist(acc))
        res["all_empty"] = aggregation_denominator("seq_sum", masks[0][1:2], Dist(acc))
        with open(f"{out}.{rank}", "w") as f:
            json.dump(res, f)
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch and tether: ~30-50 s on a CPU box
def test_denominator_over_two_gloo_processes(tmp_path):
    """Two real processes: the count is the global one (3 non-empty rows of 6, 5 tokens), the
    same on both, and a process whose rows are all skipped still joins the collective."""
    import torch.multiprocessing as mp

    init = "file://" + os.path.join(tempfile.mkdtemp(dir=tmp_path), "rendezvous")
    out = str(tmp_path / "denominators")
    mp.start_processes(_denominator_worker, args=(init, out), nprocs=2, start_method="spawn")
    got = [json.loads((tmp_path / f"denominators.{r}").read_text()) for r in (0, 1)]
    want = {"token_mean": 5.0, "seq_mean": 3.0, "seq_sum": 3.0}
    for res in got:
        assert {k: res[k] for k in want} == want
        assert res["one_empty"] == 2.0  # 0 + 2, not clamped per process
        assert res["all_empty"] == 1.0  # 0 + 0, clamped after the sum


# -- end to end: the rollout, the advantages and the GRPO update on the tiny model ---------------


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Say {i}:"}) for i in range(24)))
    return path


def _cfg(tiny_dir, prompts, out, cls=GRPOConfig, **kw):
    base = dict(
        model=str(tiny_dir),
        prompts=str(prompts),
        reward=REWARD,
        reward_on_invalid="skip",
        output_dir=str(out),
        max_new_tokens=8,
        learning_rate=3e-3,
        lr_scheduler="constant",
        num_generations=G,
        logging_steps=1,
        save_steps=0,
        seed=0,
        mixed_precision="no",
        exact_kl_samples=2,
        eval_steps=0,
    )
    base.update(kw)
    return cls(**base)


def _rows(exp: Experience, rows: torch.Tensor) -> Experience:
    """The rollout restricted to ``rows`` (every per-sample tensor and list)."""
    out = {}
    for f in dataclasses.fields(exp):
        v = getattr(exp, f.name)
        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == exp.size:
            out[f.name] = v[rows]
        elif isinstance(v, list) and len(v) == exp.size:
            out[f.name] = [v[i] for i in rows.tolist()]
    return dataclasses.replace(exp, **out)


def _sgd_session(model, cfg):
    """The session :func:`group_update` runs in, with plain SGD at lr 1 (an update is −gradient:
    Adam's first step would hide a wrong loss scale) and a bare one-process accelerator."""
    module = PolicyWithValue(model)
    opt = torch.optim.SGD(module.parameters(), lr=1.0)
    acc = SimpleNamespace(
        autocast=contextlib.nullcontext,
        backward=lambda loss: loss.backward(),
        clip_grad_norm_=torch.nn.utils.clip_grad_norm_,
        num_processes=1,
        process_index=0,
        device=torch.device("cpu"),
    )
    return RLSession(
        cfg=cfg,
        accelerator=acc,
        model=model,
        module=module,
        value_head=None,
        optimizer=opt,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
        reference=None,
        dist=Dist(),
    )


def _update(model, exp, adv, beta, cfg):
    """The parameter change of one group_update on a copy of ``model``."""
    m = copy.deepcopy(model)
    before = [p.detach().clone() for p in m.parameters()]
    group_update(_sgd_session(m, cfg), copy.deepcopy(exp), adv, beta, cfg, step=0)
    return [p.detach() - b for p, b in zip(m.parameters(), before, strict=True)]


@pytest.fixture(scope="module")
def rollout(tiny_dir, prompts_file):
    """A scored rollout of 4 prompts × G: one skipped member, one valid member, none valid, all
    valid."""
    pol = load_policy(str(tiny_dir))
    reference = CopyReference(pol.model)
    with torch.no_grad():  # the policy has moved from the reference: the KL term has a gradient
        g = torch.Generator().manual_seed(0)
        for p in pol.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    cfg = _cfg(tiny_dir, prompts_file, "unused", batch_size=4)
    data = list(load_prompt_dataset([{"prompt": f"Say {k}:"} for k in (2, 5, 4, 3)], pol.tokenizer))
    exp = collect(pol.model, pol.tokenizer, reference, make_reward(REWARD), data, cfg)
    return pol, exp


def test_collect_drops_the_skipped_samples_and_logs_over_the_valid(rollout):
    _, exp = rollout
    want_valid = [True, False, True, True] + [True] + [False] * 7 + [True] * 4
    assert exp.valid.tolist() == want_valid
    assert not exp.response_mask[~exp.valid].any() and exp.response_mask[exp.valid].any(-1).all()
    assert exp.stats["num_skipped"] == 8
    raw = torch.tensor(nan_for_some(exp.prompts, exp.completions), dtype=torch.float64)
    ok = raw[exp.valid]
    # (the scores are kept in float32)
    assert exp.stats["score"] == pytest.approx(float(ok.mean()), rel=1e-6)
    assert exp.stats["score_std"] == pytest.approx(float(ok.std()), rel=1e-5)  # Bessel, n = 8
    n_tok = float(exp.response_mask.sum())
    assert exp.stats["response_length"] == pytest.approx(n_tok / 8)
    assert math.isfinite(exp.stats["kl/k3"])


@pytest.mark.parametrize("cls", [GRPOConfig, RLOOConfig])
def test_rollout_advantages_are_over_the_valid_members(tiny_dir, prompts_file, rollout, cls):
    _, exp = rollout
    cfg = _cfg(tiny_dir, prompts_file, "unused", cls, batch_size=4)
    adv = group_advantages(exp, 0.05, cfg)
    seq = sequence_rewards(exp, 0.05, cfg.kl_in).double().numpy()
    seq[~exp.valid.numpy()] = NAN
    want = _numpy_rloo(seq) if cls is RLOOConfig else _numpy_grpo(seq, True, 1e-4)
    per_row = adv.sum(-1) / exp.response_mask.sum(-1).clamp(min=1)
    np.testing.assert_allclose(per_row.double().numpy(), want, rtol=1e-5, atol=1e-6)
    assert bool((adv[4:12] == 0).all())  # one valid member, then none: no advantage
    assert bool((adv[[0, 2, 3, 12, 13, 14, 15]].abs().amax(-1) > 0).all())


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "seq_sum"])
def test_skipped_samples_have_no_weight_in_the_grpo_update(
    tiny_dir, prompts_file, rollout, aggregation
):
    """The update on the whole rollout equals the update on its valid rows alone: the skipped
    rows add no loss and no count to the denominators (2 micro-batches of 8 and of 4 rows, the
    KL in the loss)."""
    pol, exp = rollout
    cfg = _cfg(
        tiny_dir,
        prompts_file,
        "unused",
        batch_size=4,
        loss_aggregation=aggregation,
        gradient_accumulation_steps=2,
        max_grad_norm=None,
        kl_coef=0.5,
    )
    adv = group_advantages(exp, cfg.kl_coef, cfg)
    full = _update(pol.model, exp, adv, cfg.kl_coef, cfg)
    keep = exp.valid.nonzero().squeeze(-1)
    valid_only = _update(pol.model, _rows(exp, keep), adv[keep], cfg.kl_coef, cfg)
    size = max(float(d.abs().max()) for d in valid_only)
    assert size > 1e-4  # the update is not trivially zero
    for a, b in zip(full, valid_only, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6 * size)
    # and the skipped rows' content is irrelevant: other tokens there, the same update
    scrambled = copy.deepcopy(exp)
    skipped = (~exp.valid).nonzero().squeeze(-1)
    cols = slice(exp.prompt_length, None)
    scrambled.input_ids[skipped, cols] = (scrambled.input_ids[skipped, cols] + 7) % 256
    for a, b in zip(_update(pol.model, scrambled, adv, cfg.kl_coef, cfg), full, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6 * size)


@pytest.mark.parametrize("cls", [GRPOConfig, RLOOConfig])
def test_training_with_skipped_rewards_stays_finite(tiny_dir, prompts_file, tmp_path, cls):
    out = tmp_path / cls.__name__
    train_group(_cfg(tiny_dir, prompts_file, out, cls, batch_size=3, max_steps=2))
    rows = [r for r in read_metrics(out) if "score" in r]
    assert len(rows) == 2
    assert sum(r["num_skipped"] for r in rows) > 0
    for r in rows:
        for key in ("score", "score_std", "loss/policy", "kl/k1", "kl/k3", "response_length"):
            assert math.isfinite(r[key]), (key, r)
        assert 0 <= r["num_skipped"] <= 3 * G
    from safetensors.torch import load_file

    for name, w in load_file(str(out / "final" / "model.safetensors")).items():
        assert bool(torch.isfinite(w).all()), name
