"""Checkpoints: a resumed run is bit-identical to an uninterrupted one; writes are atomic."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

import tether.runs.checkpoint as ckpt_mod
from tether.core import kl
from tether.core.controllers import AdaptiveKL
from tether.errors import CheckpointError
from tether.runs import RunDir, read_metrics
from tether.runs.checkpoint import (
    LATEST_FILE,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    trainable_state_dict,
)

VOCAB, DIM, HIDDEN = 11, 8, 16
BATCH_SIZES = (3, 4, 5)
TOTAL_STEPS, SPLIT_STEP = 10, 4
WARMUP_STEPS = 3


class TiedMLP(nn.Module):
    """A tiny LM-shaped model: embedding, residual MLP with dropout, head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.mlp = nn.Sequential(
            nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Dropout(0.3), nn.Linear(HIDDEN, DIM)
        )
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)  # (B, T, D)
        return self.head(h + self.mlp(h))  # (B, T, V)


class Trainer:
    """Model, AdamW, warm-up/decay LambdaLR and an adaptive KL controller, built from a seed."""

    def __init__(self, init_seed: int) -> None:
        torch.manual_seed(init_seed)
        self.model = TiedMLP()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: min(1.0, (s + 1) / WARMUP_STEPS) * max(0.1, 1 - s / TOTAL_STEPS),
        )
        self.controller = AdaptiveKL(init_beta=0.5, target=0.05, horizon=20)

    def step(self) -> dict[str, float]:
        """One step; consumes python, numpy and torch RNG (batch size, KL weight, data, dropout)."""
        batch = random.choice(BATCH_SIZES)
        tokens = torch.randint(VOCAB, (batch, 6))
        logits = self.model(tokens[:, :-1])
        nll = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        kl_to_uniform = kl.exact_from_logits(logits, torch.zeros_like(logits)).mean()
        loss = nll + self.controller.beta * kl_to_uniform
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.controller.update(kl_to_uniform.item(), n_steps=1 + int(np.random.randint(4)))
        return {"loss": loss.item(), "kl": kl_to_uniform.item(), "beta": self.controller.beta}

    def models(self) -> dict[str, nn.Module]:
        return {"policy": self.model}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def assert_same_training_state(a: Trainer, b: Trainer) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for index, state in oa["state"].items():
        for name, value in state.items():
            assert torch.equal(value, ob["state"][index][name]), (index, name)
    assert a.scheduler.state_dict() == b.scheduler.state_dict()
    assert a.controller.beta == b.controller.beta
    assert a.controller.state_dict() == b.controller.state_dict()


def test_resume_is_bit_identical(tmp_path):
    seed_everything(0)
    uninterrupted = Trainer(init_seed=1)
    for _ in range(TOTAL_STEPS):
        uninterrupted.step()

    seed_everything(0)
    first = Trainer(init_seed=1)
    with RunDir(tmp_path / "run") as run:
        run.restore(models=first.models())
        for step in range(1, SPLIT_STEP + 1):
            run.log(step, first.step())
        run.save(
            SPLIT_STEP,
            models=first.models(),
            optimizer=first.optimizer,
            scheduler=first.scheduler,
            states={"kl_controller": first.controller.state_dict()},
        )
        run.log(SPLIT_STEP + 1, first.step())  # logged after the checkpoint: dropped on resume
    del first

    seed_everything(12345)  # a fresh process: other RNG states, other initial weights
    resumed = Trainer(init_seed=99)
    with RunDir(tmp_path / "run", resume=True) as run:
        step, states = run.restore(
            models=resumed.models(), optimizer=resumed.optimizer, scheduler=resumed.scheduler
        )
        resumed.controller.load_state_dict(states["kl_controller"])
        assert step == SPLIT_STEP
        for step in range(SPLIT_STEP + 1, TOTAL_STEPS + 1):
            run.log(step, resumed.step())

    assert resumed.model.head.weight is resumed.model.emb.weight  # the tie survives loading
    assert_same_training_state(uninterrupted, resumed)
    steps = [r["step"] for r in read_metrics(tmp_path / "run")]
    assert steps == list(range(1, TOTAL_STEPS + 1))


def test_tied_weights_are_stored_once(tmp_path):
    model = TiedMLP()
    path = save_checkpoint(tmp_path, 1, models={"policy": model})
    with safe_open(str(path / "policy.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
        aliases = json.loads(fh.metadata()["tether_aliases"])
    assert len(keys & {"emb.weight", "head.weight"}) == 1
    assert set(aliases) | keys == set(model.state_dict())


def test_overlapping_views_are_saved_as_copies(tmp_path):
    class Fused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Parameter(torch.arange(12.0).reshape(3, 4))
            self.register_buffer("q", self.qkv.data[0])  # a partial view of the same storage
            self.register_buffer("t", self.qkv.data.t())  # a non-contiguous view

    saved = Fused()
    save_checkpoint(tmp_path, 0, models={"m": saved})
    restored = Fused()
    with torch.no_grad():
        restored.qkv.zero_()
    load_checkpoint(tmp_path, models={"m": restored})
    for key, value in saved.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_states_with_tensors_round_trip(tmp_path):
    states = {
        "kl_controller": AdaptiveKL(0.1, 6.0, 100).state_dict(),
        "reference": {"logprobs": torch.randn(2, 3, dtype=torch.float64), "synced_at": 7},
        "data": {"epoch": 1, "order": [3, 1, 2], "done": None, "mix": (1, "a")},
    }
    save_checkpoint(tmp_path, 3, models={}, states=states)
    step, loaded = load_checkpoint(tmp_path, models={})
    assert step == 3
    assert torch.equal(loaded["reference"]["logprobs"], states["reference"]["logprobs"])
    assert loaded["reference"]["logprobs"].dtype == torch.float64
    assert loaded["kl_controller"] == states["kl_controller"]
    assert loaded["data"] == {"epoch": 1, "order": [3, 1, 2], "done": None, "mix": [1, "a"]}


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ({"data": {"pos": np.int64(3)}}, r"states\['data'\]\['pos'\] is a int64"),
        ({"data": {1: 2}}, r"states\['data'\]: key 1 is a int; use str keys"),
        ({"data": {"s": {1, 2}}}, r"states\['data'\]\['s'\] is a set"),
    ],
)
def test_bad_states_are_rejected(tmp_path, states, expected):
    with pytest.raises(TypeError, match=expected):
        save_checkpoint(tmp_path, 1, models={}, states=states)
    assert latest_checkpoint(tmp_path) is None


def test_crash_midway_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = TiedMLP()
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, 2, models={"policy": model}, optimizer=optimizer, states={"a": 1})
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    real_save_file = ckpt_mod.save_file

    def save_then_crash(*args, **kwargs):
        real_save_file(*args, **kwargs)  # the weights file is half of the checkpoint ...
        raise OSError("disk full")  # ... and then the write dies

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    monkeypatch.setattr(ckpt_mod, "save_file", save_then_crash)
    with pytest.raises(CheckpointError, match="disk full; .*step-000002 is intact"):
        save_checkpoint(tmp_path, 4, models={"policy": model}, optimizer=optimizer)
    monkeypatch.undo()

    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [LATEST_FILE, "step-000002"]
    assert (root / LATEST_FILE).read_text() == "step-000002\n"
    assert latest_checkpoint(tmp_path) == root / "step-000002"
    fresh = TiedMLP()
    step, states = load_checkpoint(
        tmp_path, models={"policy": fresh}, optimizer=torch.optim.AdamW(fresh.parameters())
    )
    assert step == 2 and states == {"a": 1}
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_killed_write_leaves_nothing_visible_and_next_save_succeeds(tmp_path):
    model = TiedMLP()
    save_checkpoint(tmp_path, 1, models={"policy": model})
    stale = tmp_path / "checkpoints" / ".tmp-step-000002"  # what a SIGKILL mid-write leaves
    stale.mkdir()
    (stale / "policy.safetensors").write_bytes(b"\x00" * 10)
    assert latest_checkpoint(tmp_path).name == "step-000001"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"]
    save_checkpoint(tmp_path, 2, models={"policy": model})
    assert latest_checkpoint(tmp_path).name == "step-000002"
    assert not stale.exists()


def test_keep_last_prunes_old_checkpoints(tmp_path):
    model = TiedMLP()
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, models={"policy": model}, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [LATEST_FILE, "step-000004", "step-000005"]
    assert (root / LATEST_FILE).read_text() == "step-000005\n"
    for step in range(6, 9):
        save_checkpoint(tmp_path, step, models={"policy": model}, keep_last=None)
    assert len(list_checkpoints(tmp_path)) == 5
    with pytest.raises(ValueError, match="keep_last must be ≥ 1 or None"):
        save_checkpoint(tmp_path, 9, models={}, keep_last=0)


def test_resaving_a_step_replaces_it(tmp_path):
    model = TiedMLP()
    save_checkpoint(tmp_path, 3, models={}, states={"v": 1})
    save_checkpoint(tmp_path, 3, models={"policy": model}, states={"v": 2})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003"]
    assert load_checkpoint(tmp_path, models={"policy": model})[1] == {"v": 2}
    assert not list((tmp_path / "checkpoints").glob(".*"))


def test_trainable_only_state(tmp_path):
    model = TiedMLP()
    model.emb.weight.requires_grad_(False)  # frozen "base"; the MLP plays the adapter
    partial = trainable_state_dict(model)
    assert set(partial) == {k for k in model.state_dict() if k.startswith("mlp.")}
    save_checkpoint(tmp_path, 1, models={"policy": partial})

    fresh = TiedMLP()
    frozen_before = fresh.emb.weight.clone()
    load_checkpoint(tmp_path, models={"policy": fresh})
    assert torch.equal(fresh.emb.weight, frozen_before)  # left as constructed
    for key, value in partial.items():
        assert torch.equal(fresh.state_dict()[key], value)

    save_checkpoint(tmp_path, 2, models={"policy": {"lora_A.weight": torch.zeros(2)}})
    with pytest.raises(CheckpointError, match=r"keys not in the module: \['lora_A\.weight'\]"):
        load_checkpoint(tmp_path, models={"policy": fresh})


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path, models={})
    model = TiedMLP()
    save_checkpoint(tmp_path, 1, models={"policy": model})
    expected = r"has no model\(s\) \['value'\]; it holds \['policy'\]"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(tmp_path, models={"policy": model, "value": nn.Linear(1, 1)})
    with pytest.raises(CheckpointError, match=r"also holds model\(s\) \['policy'\]"):
        load_checkpoint(tmp_path, models={})
    with pytest.raises(CheckpointError, match="has no optimizer state"):
        load_checkpoint(
            tmp_path, models={"policy": model}, optimizer=torch.optim.SGD(model.parameters())
        )
    one = tmp_path / "checkpoints" / "step-000001"
    expected = "cannot load model 'policy' from .*policy.safetensors"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(one, models={"policy": nn.Linear(1, 1)})
    with pytest.raises(ValueError, match=r"model name 'a/b' must match"):
        save_checkpoint(tmp_path, 2, models={"a/b": model})
    with pytest.raises(ValueError, match="step must be an int ≥ 0"):
        save_checkpoint(tmp_path, -1, models={})
