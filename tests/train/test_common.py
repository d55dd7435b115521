"""Shared trainer setup: precision resolution and the optimizer."""

import torch

import tether.train.common as common
from tether.train.common import make_optimizer, resolve_mixed_precision
from tether.train.dpo import DPOConfig


def test_auto_precision_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(common, "bf16_supported", lambda: True)
    assert resolve_mixed_precision("auto") == "bf16"
    monkeypatch.setattr(common, "bf16_supported", lambda: False)
    assert resolve_mixed_precision("auto") == "no"
    for explicit in ("no", "bf16", "fp16"):
        assert resolve_mixed_precision(explicit) == explicit


def test_selective_checkpointing_turns_off_the_autocast_weight_cache(tmp_path):
    cfg = DPOConfig(output_dir=str(tmp_path), train_data="x.jsonl", mixed_precision="bf16")
    assert cfg.activation_checkpointing == "selective"
    acc = common.make_accelerator(cfg)
    with acc.autocast():
        assert torch.is_autocast_enabled("cpu")
        assert not torch.is_autocast_cache_enabled()


def test_optimizer_is_fused_adamw_without_decay_on_norms(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    cfg = DPOConfig(output_dir=str(tmp_path), train_data="x.jsonl", weight_decay=0.1)
    opt = make_optimizer(model, cfg)
    assert opt.defaults["fused"] is True
    decays = sorted((g["weight_decay"], len(g["params"])) for g in opt.param_groups)
    assert decays == [(0.0, 3), (0.1, 1)]  # bias, norm weight, norm bias undecayed


def test_runs_with_different_precisions_share_a_process(tmp_path):
    """accelerate keeps one process-wide state; a second run with another precision must work."""
    for precision in ("bf16", "no", "bf16"):
        cfg = DPOConfig(output_dir=str(tmp_path), train_data="x.jsonl", mixed_precision=precision)
        acc = common.make_accelerator(cfg)
        assert acc.mixed_precision == precision
