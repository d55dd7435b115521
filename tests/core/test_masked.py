"""Masked reductions: hand-computed values, the empty-mask convention, padding isolation."""

import pytest
import torch

from tether.core.masked import (
    aggregate,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

X = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 0.0, 0.0]], dtype=torch.float64)
M = torch.tensor([[True, True, True, False], [True, True, False, False]])


def test_sum_mean_var_hand_values():
    assert masked_sum(X, M).item() == 36.0  # 1+2+3+10+20
    assert masked_mean(X, M).item() == pytest.approx(7.2, abs=1e-12)
    vals = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0], dtype=torch.float64)
    assert masked_var(X, M).item() == pytest.approx(vals.var(unbiased=True).item(), abs=1e-12)
    assert masked_var(X, M, unbiased=False).item() == pytest.approx(
        vals.var(unbiased=False).item(), abs=1e-12
    )
    torch.testing.assert_close(masked_sum(X, M, dim=-1), torch.tensor([6.0, 30.0], dtype=X.dtype))
    torch.testing.assert_close(masked_mean(X, M, dim=-1), torch.tensor([2.0, 15.0], dtype=X.dtype))
    torch.testing.assert_close(masked_var(X, M, dim=-1), torch.tensor([1.0, 50.0], dtype=X.dtype))


def test_padding_values_never_leak():
    poisoned = X.clone()
    poisoned[~M] = float("nan")
    poisoned[0, 3] = float("inf")
    assert masked_sum(poisoned, M).item() == 36.0
    assert torch.isfinite(masked_var(poisoned, M))
    w = masked_whiten(poisoned, M)
    assert torch.isfinite(w).all()
    assert (w[~M] == 0).all()


def test_empty_mask_is_defined():
    empty = torch.zeros_like(M)
    assert masked_sum(X, empty).item() == 0.0
    assert masked_mean(X, empty).item() == 0.0
    assert masked_var(X, empty).item() == 0.0
    one = torch.zeros_like(M)
    one[0, 0] = True
    assert masked_var(X, one).item() == 0.0  # unbiased variance of one element: defined as 0
    assert masked_var(X, one, unbiased=False).item() == 0.0
    assert (masked_whiten(X, empty) == 0).all()
    for mode in ("token_mean", "seq_mean", "seq_sum"):
        assert aggregate(X, empty, mode).item() == 0.0
    # per-row: the empty row gives 0, the other row its own mean
    row_mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    torch.testing.assert_close(
        masked_mean(X, row_mask, dim=-1), torch.tensor([1.5, 0.0], dtype=X.dtype)
    )


def test_whiten_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, generator=g, dtype=torch.float64) * 3 + 2
    m = torch.rand(6, 9, generator=g) > 0.3
    w = masked_whiten(x, m, eps=0.0)
    sel = x[m]
    expected = (sel - sel.mean()) / sel.std(unbiased=True)
    torch.testing.assert_close(w[m], expected)
    assert w[m].mean().abs().item() < 1e-12
    assert w[m].std().item() == pytest.approx(1.0, abs=1e-12)
    scaled = masked_whiten(x, m, shift_mean=False, eps=0.0)
    torch.testing.assert_close(scaled[m], sel / sel.std() + sel.mean() - sel.mean() / sel.std())


def test_aggregation_modes_hand_values():
    # token_mean: 36/5; seq_mean: mean(2, 15); seq_sum: mean(6, 30)
    assert aggregate(X, M, "token_mean").item() == pytest.approx(7.2, abs=1e-12)
    assert aggregate(X, M, "seq_mean").item() == pytest.approx(8.5, abs=1e-12)
    assert aggregate(X, M, "seq_sum").item() == pytest.approx(18.0, abs=1e-12)
    # A row with no counted token: left out of seq_mean and seq_sum alike (B' = 2, not 3).
    x3 = torch.cat([X, torch.full((1, 4), 99.0, dtype=X.dtype)])
    m3 = torch.cat([M, torch.zeros(1, 4, dtype=torch.bool)])
    assert aggregate(x3, m3, "seq_mean").item() == pytest.approx(8.5, abs=1e-12)
    assert aggregate(x3, m3, "seq_sum").item() == pytest.approx(18.0, abs=1e-12)
    assert aggregate(x3, m3, "token_mean").item() == pytest.approx(7.2, abs=1e-12)


def test_denominator_makes_microbatches_add_up():
    """Summing micro-batch aggregates with the global denominator equals the full-batch value."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    m = torch.rand(8, 5, generator=g) > 0.4
    full = aggregate(x, m, "token_mean")
    n_tokens = m.sum().item()
    parts = sum(
        aggregate(x[i : i + 2], m[i : i + 2], "token_mean", denominator=n_tokens)
        for i in range(0, 8, 2)
    )
    assert parts.item() == pytest.approx(full.item(), abs=1e-12)
    full_seq = aggregate(x, m, "seq_sum")
    parts_seq = sum(aggregate(x[i : i + 4], m[i : i + 4], "seq_sum", denominator=8) for i in (0, 4))
    assert parts_seq.item() == pytest.approx(full_seq.item(), abs=1e-12)


def test_gradients_flow_only_through_counted_positions():
    x = X.clone().requires_grad_(True)
    aggregate(x, M, "token_mean").backward()
    expected = M.to(X.dtype) / 5.0
    torch.testing.assert_close(x.grad, expected)


def test_low_precision_inputs_accumulate_in_fp32():
    x = torch.full((1, 4096), 1.001, dtype=torch.bfloat16)
    m = torch.ones(1, 4096, dtype=torch.bool)
    s = masked_sum(x, m)
    assert s.dtype == torch.float32
    assert s.item() == pytest.approx(4096 * x[0, 0].float().item(), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(mask=torch.ones(2, 4)), TypeError, "BoolTensor"),
        (dict(mask=torch.ones(2, 3, dtype=torch.bool)), ValueError, "does not match"),
        (dict(mask=M, mode="mean"), ValueError, "token_mean"),
        (dict(mask=M, denominator=0), ValueError, "denominator"),
    ],
)
def test_bad_inputs_raise_named_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        aggregate(X, **kwargs)
