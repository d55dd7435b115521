"""Disk use of a run: save_optimizer (last | all | none), a resume without optimizer state, and
final/ sharing one copy of the weights with the end-of-run checkpoint (a hard link)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from tether.errors import TetherWarning
from tether.runs import RunDir
from tether.runs.checkpoint import (
    MANIFEST_FILE,
    drop_optimizer_states,
    link_identical_weights,
    list_checkpoints,
    read_checkpoint,
)

LR = 0.1
STEPS = 6


def _schedule(step: int) -> float:
    return 1.0 / (1 + step)  # a decaying LR: a fresh optimizer must pick up its value


def _trainer(
    seed: int,
) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    return model, opt, LambdaLR(opt, _schedule)


def _step(model: nn.Module, opt: torch.optim.Optimizer, sched: object) -> None:
    loss = model(torch.randn(5, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()  # type: ignore[attr-defined]


def _has_optimizer(run: Path) -> list[bool]:
    """Per checkpoint (oldest first): optimizer.pt present; checked against the manifest."""
    out = []
    for ckpt in list_checkpoints(run):
        manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
        present = (ckpt / "optimizer.pt").is_file()
        assert manifest["optimizer"] == present, ckpt
        out.append(present)
    return out


def _run(path: Path, mode: str, save_steps: int, saves: list[int]) -> None:
    model, opt, sched = _trainer(0)
    with RunDir(path, save_optimizer=mode, save_steps=save_steps, keep_last=None) as run:
        run.restore(models={"m": model})
        for step in range(1, max(saves) + 1):
            _step(model, opt, sched)
            if step in saves:
                run.save(step, models={"m": model}, optimizer=opt, scheduler=sched)


@pytest.mark.parametrize(
    "mode, expected",
    [("last", [False, False, True]), ("all", [True, True, True]), ("none", [False, False, False])],
)
def test_save_optimizer_modes_after_three_checkpoints(tmp_path, mode, expected):
    _run(tmp_path / mode, mode, save_steps=1, saves=[1, 2, 3])
    assert [c.name for c in list_checkpoints(tmp_path / mode)] == [
        "step-000001",
        "step-000002",
        "step-000003",
    ]
    assert _has_optimizer(tmp_path / mode) == expected
    for ckpt in list_checkpoints(tmp_path / mode):  # every one stays readable
        read_checkpoint(ckpt)


@pytest.mark.parametrize("mode, expected", [("last", [False, False]), ("all", [True, True])])
def test_an_end_of_run_checkpoint_between_save_steps(tmp_path, mode, expected):
    """save_steps=2, run ends at 3: under last the end checkpoint has no optimizer state (and
    step 2's is dropped once it is written); under all both keep theirs."""
    _run(tmp_path / mode, mode, save_steps=2, saves=[2, 3])
    assert _has_optimizer(tmp_path / mode) == expected


def test_resume_without_optimizer_state_warns_and_follows_the_schedule(tmp_path):
    """A checkpoint without optimizer state resumes with a warning: weights and scheduler
    restored, AdamW's moments empty, the LR the schedule's value at the restored step."""
    model, opt, sched = _trainer(0)
    with RunDir(tmp_path / "run", save_optimizer="none") as run:
        run.restore(models={"m": model})
        for _ in range(2):
            _step(model, opt, sched)
        run.save(2, models={"m": model}, optimizer=opt, scheduler=sched)
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    fresh, fresh_opt, fresh_sched = _trainer(7)
    with RunDir(tmp_path / "run", resume=True) as run:
        with pytest.warns(TetherWarning, match="no optimizer state.*restarts fresh"):
            step, _ = run.restore(models={"m": fresh}, optimizer=fresh_opt, scheduler=fresh_sched)
        assert step == 2
        for k, v in fresh.state_dict().items():
            assert torch.equal(v, saved[k]), k
        assert fresh_opt.state_dict()["state"] == {}
        assert fresh_opt.param_groups[0]["lr"] == pytest.approx(LR * _schedule(2), rel=1e-12)
        for _ in range(STEPS - 2):  # and it trains on, along the schedule
            _step(fresh, fresh_opt, fresh_sched)
        assert fresh_opt.param_groups[0]["lr"] == pytest.approx(LR * _schedule(STEPS), rel=1e-12)


def test_dropping_rewrites_the_manifest_before_deleting(tmp_path, monkeypatch):
    """A failure between the two (here: the delete) leaves a readable checkpoint that says it
    has no optimizer state, a stray optimizer.pt and a warning, never a manifest naming a
    missing file."""
    _run(tmp_path / "run", "all", save_steps=1, saves=[1, 2])
    real_unlink = Path.unlink

    def failing_unlink(self: Path, missing_ok: bool = False) -> None:
        if self.name == "optimizer.pt":
            raise PermissionError(13, "Permission denied", str(self))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", failing_unlink)
    with pytest.warns(TetherWarning, match="could not drop the optimizer state"):
        drop_optimizer_states(tmp_path / "run", before=2)
    first = list_checkpoints(tmp_path / "run")[0]
    assert json.loads((first / MANIFEST_FILE).read_text())["optimizer"] is False
    assert (first / "optimizer.pt").is_file()
    assert "optimizer" not in read_checkpoint(first)


def test_link_identical_weights_only_links_equal_tensors(tmp_path):
    """Equal tensors (and the target's metadata a subset of the source's): linked, atomically;
    one bit different, another key or another metadata value: left alone."""
    torch.manual_seed(0)
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    model, _, _ = _trainer(0)
    with RunDir(tmp_path / "run") as run:
        run.restore(models={"m": model})
        ckpt = run.save(1, models={"m": tensors})
    out = tmp_path / "final"
    out.mkdir()
    save_file(tensors, str(out / "same.safetensors"), metadata={"format": "pt"})
    flipped = {"a": tensors["a"].clone(), "b": tensors["b"]}
    flipped["a"].view(torch.int32)[0, 0] ^= 1  # one bit of one float
    save_file(flipped, str(out / "bit.safetensors"), metadata={"format": "pt"})
    save_file({"a": tensors["a"]}, str(out / "fewer.safetensors"), metadata={"format": "pt"})
    save_file(tensors, str(out / "meta.safetensors"), metadata={"format": "np"})
    assert link_identical_weights(out, ckpt) == ["same.safetensors"]
    source = ckpt / "m.safetensors"
    assert os.stat(out / "same.safetensors").st_ino == os.stat(source).st_ino
    for name in ("bit", "fewer", "meta"):
        assert os.stat(out / f"{name}.safetensors").st_ino != os.stat(source).st_ino
    assert not list(out.glob(".*"))  # no temporary link left behind
    loaded = load_file(str(out / "same.safetensors"))
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


# ------------------------------------------------------------------------------------------------
# A real (tiny) trainer: the footprint of a 2-step run
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    rng = random.Random(0)
    rows = [
        {
            "prompt": f"Review {i}: it was",
            "chosen": " good good",
            "rejected": f" bad {rng.random()}",
        }
        for i in range(24)
    ]
    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _dpo(tiny_dir: Path, prefs: Path, out: Path, **kw: object) -> dict:
    from tether.train.dpo import DPOConfig, train

    base = dict(
        model=str(tiny_dir),
        train_data=str(prefs),
        output_dir=str(out),
        learning_rate=3e-3,
        lr_scheduler="constant",
        batch_size=4,
        max_steps=2,  # save_steps keeps its default (500): only the end-of-run checkpoint
        logging_steps=1,
        eval_steps=100,
        max_length=48,
        max_prompt_length=24,
        eval_generate=False,
        reference="copy",
        exact_kl_samples=0,
        mixed_precision="no",
        report_to=[],
    )
    base.update(kw)
    return train(DPOConfig(**base))


def _footprint(run: Path) -> tuple[int, int, dict[tuple[int, int], list[str]]]:
    """(sum of file sizes, sum over unique inodes, unique inode → its names)."""
    total, inodes = 0, {}
    for path in run.rglob("*"):
        if path.is_file() and not path.is_symlink():
            st = path.stat()
            total += st.st_size
            inodes.setdefault((st.st_dev, st.st_ino), [st.st_size, []])[1].append(
                str(path.relative_to(run))
            )
    unique = sum(size for size, _ in inodes.values())
    return total, unique, {k: names for k, (_, names) in inodes.items()}


@pytest.mark.parametrize("mode", ["last", "all"])
def test_a_two_step_run_keeps_one_copy_of_the_weights(tiny_dir, prefs, tmp_path, monkeypatch, mode):
    """Default (last): the end checkpoint (step 2; save_steps=500 never hit) and final/ share
    one weights file, and no optimizer state is written: the only large file on disk is that
    one copy. save_optimizer=all adds AdamW's state, 2× the weights (exp_avg, exp_avg_sq)."""
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    run = tmp_path / mode
    _dpo(tiny_dir, prefs, run, save_optimizer=mode)
    ckpt = run / "checkpoints" / "step-000002"
    weights = ckpt / "policy.safetensors"
    size = weights.stat().st_size
    assert os.stat(run / "final" / "model.safetensors").st_ino == weights.stat().st_ino
    total, unique, names = _footprint(run)
    assert total - unique == size  # the link saved exactly one copy of the weights
    big = sorted(
        (os.stat(run / n[0]).st_size, sorted(n))
        for n in names.values()
        if os.stat(run / n[0]).st_size > size // 4
    )
    if mode == "last":
        assert big == [
            (size, ["checkpoints/step-000002/policy.safetensors", "final/model.safetensors"])
        ]
        assert not (ckpt / "optimizer.pt").exists()
    else:
        opt_size = (ckpt / "optimizer.pt").stat().st_size
        assert 1.9 * size < opt_size < 2.2 * size  # two fp32 moments per (tied-once) parameter
        assert unique - opt_size < 1.6 * size  # one copy of the weights besides small files

    from transformers import AutoModelForCausalLM  # final/ still loads as a model

    model = AutoModelForCausalLM.from_pretrained(run / "final")
    state = load_file(str(weights))
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_extending_a_finished_run_without_optimizer_state(tiny_dir, prefs, tmp_path, monkeypatch):
    """The default end checkpoint (no optimizer state) still extends the run: resume=true with
    a larger max_steps warns that the optimizer restarts fresh, trains on and writes final/."""
    from tether.runs import read_metrics

    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    _dpo(tiny_dir, prefs, run)
    first = load_file(str(run / "final" / "model.safetensors"))
    with pytest.warns(TetherWarning, match="no optimizer state.*restarts fresh"):
        _dpo(tiny_dir, prefs, run, max_steps=4, resume=True)
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert [c.name for c in list_checkpoints(run)] == ["step-000002", "step-000004"]
    last = load_file(str(run / "final" / "model.safetensors"))
    assert any(not torch.equal(first[k], last[k]) for k in first)  # it trained on
