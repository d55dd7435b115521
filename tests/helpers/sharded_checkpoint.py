"""Sharded (FSDP2) checkpoints through :mod:`tether.runs.checkpoint`, in a process of its own
(it creates a process group; ``python -m tests.helpers.sharded_checkpoint DIR``, under torchrun
or alone as a world of one). Exits non-zero with the failed check.

1. a sharded tiny model and its AdamW state saved at step 1 (DCP, every rank its shards);
2. a save of step 2 that fails inside the collective write leaves step 1 whole and no partial
   directory;
3. step 1 loaded into a freshly sharded model and optimizer restores the weights and the AdamW
   moments exactly (then one more identical update gives identical weights);
4. non-finite weights on one rank make every rank refuse the save (no hang).
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tether.errors import NumericalError
from tether.models import tiny_causal_lm
from tether.models.sharding import ensure_process_group, shard_model
from tether.runs.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint


class Processes:
    """The few accelerator attributes tether.runs.checkpoint uses, over torch.distributed."""

    @property
    def is_main_process(self):
        return dist.get_rank() == 0

    @property
    def process_index(self):
        return dist.get_rank()

    @property
    def num_processes(self):
        return dist.get_world_size()

    def wait_for_everyone(self):
        dist.barrier()


def _setup():
    model = tiny_causal_lm(seed=0).model
    shard_model(model, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _step(model, opt, seed):
    g = torch.Generator().manual_seed(seed + dist.get_rank())
    ids = torch.randint(3, 200, (2, 10), generator=g)
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def _local(model):
    return {n: p.to_local().clone() for n, p in model.named_parameters()}


def main(root: str) -> int:
    if "RANK" in __import__("os").environ:
        dist.init_process_group("gloo")
    ensure_process_group(torch.device("cpu"))
    run = Path(root)
    acc = Processes()
    model, opt = _setup()
    _step(model, opt, 0)
    save_checkpoint(
        run, 1, models={"policy": model}, optimizer=opt, states={"x": 1}, accelerator=acc
    )
    saved = _local(model)
    moments = {
        k: v["exp_avg"].to_local().clone() for k, v in zip(saved, opt.state.values(), strict=True)
    }
    _step(model, opt, 1)
    after = _local(model)

    import torch.distributed.checkpoint as dcp

    real = dcp.save

    def failing(*args, **kwargs):
        raise OSError(28, "No space left on device")

    dcp.save = failing
    try:
        save_checkpoint(run, 2, models={"policy": model}, optimizer=opt, accelerator=acc)
        raise AssertionError("the failing save did not raise")
    except Exception as exc:  # CheckpointError (an OSError inside)
        assert "step 2" in str(exc), exc
    finally:
        dcp.save = real
    dist.barrier()
    names = [p.name for p in list_checkpoints(run)]
    assert names == ["step-000001"], names
    assert not list((run / "checkpoints").glob(".tmp-*")), "a partial checkpoint was left"

    fresh, fresh_opt = _setup()
    step, states = load_checkpoint(
        run, models={"policy": fresh}, optimizer=fresh_opt, accelerator=acc
    )
    assert step == 1 and states == {"x": 1}, (step, states)
    for name, value in _local(fresh).items():
        assert torch.equal(value, saved[name]), name
    for (name, m), st in zip(moments.items(), fresh_opt.state.values(), strict=True):
        assert torch.equal(st["exp_avg"].to_local(), m), name
    _step(fresh, fresh_opt, 1)
    for name, value in _local(fresh).items():
        assert torch.equal(value, after[name]), name

    with torch.no_grad():  # one rank's shard goes bad: every rank refuses
        if dist.get_rank() == dist.get_world_size() - 1:
            p = next(fresh.parameters())
            assert isinstance(p, DTensor)
            p.to_local().view(-1)[0] = float("nan")
    try:
        save_checkpoint(run, 3, models={"policy": fresh}, optimizer=fresh_opt, accelerator=acc)
        raise AssertionError("non-finite weights were saved")
    except NumericalError as exc:
        assert "non-finite" in str(exc), exc
    assert [p.name for p in list_checkpoints(run)] == ["step-000001"]

    # final/: the whole weights are gathered first (every process), the main process writes;
    # saving a sharded model without gathering is an error, not a file of shards
    from tether.models import tiny_tokenizer
    from tether.models.sharding import ModelSaver, collect_for_save

    model2, _ = _setup()
    saver = ModelSaver(model2, tiny_tokenizer(), after=lambda path: None)
    try:
        saver(run / "ungathered")
        raise AssertionError("an ungathered sharded model was saved")
    except ValueError as exc:
        assert "collect()" in str(exc), exc
    collect_for_save(saver)
    if dist.get_rank() == 0:
        saver(run / "whole")
        from transformers import AutoModelForCausalLM

        whole = AutoModelForCausalLM.from_pretrained(run / "whole").state_dict()
        expected = tiny_causal_lm(seed=0).model.state_dict()
        for key, value in expected.items():
            assert torch.equal(whole[key], value), key
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
