"""Tiny finished run directories, written by the trainers' own save path, without training."""

import json
from pathlib import Path

import torch

from tether.models import load_policy, tiny_causal_lm
from tether.runs.rundir import RunDir
from tether.train.common import model_state_for_checkpoint, save_policy_to
from tether.train.grpo import GRPOConfig

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
REWARD = "tests.helpers.rewards:vowel_fraction"


def write_prompts(path: Path, n: int = 12) -> Path:
    path.write_text("\n".join(json.dumps({"prompt": f"Say {i}:"}) for i in range(n)) + "\n")
    return path


def save_tiny(path: Path, seed: int = 0) -> Path:
    pol = tiny_causal_lm(seed=seed)
    pol.model.save_pretrained(path)
    pol.tokenizer.save_pretrained(path)
    return path


def _perturb(model: torch.nn.Module, seed: int, scale: float) -> None:
    """Move every trainable weight by seeded noise (a LoRA B starts at 0: the adapter is then
    a no-op, and a merge would be trivially right)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def make_run(root: Path, *, peft: dict | None = LORA) -> Path:
    """``root/run``: a GRPO run of ``root/tiny`` (LoRA unless ``peft`` is None) with checkpoints
    at steps 1 and 2 and ``final/`` = step 2, as the trainers write them; the weights differ
    from step to step. Returns the run directory."""
    tiny = save_tiny(root / "tiny")
    prompts = write_prompts(root / "prompts.jsonl")
    cfg = GRPOConfig(
        model=str(tiny),
        prompts=str(prompts),
        reward=REWARD,
        output_dir=str(root / "run"),
        peft=peft,
        max_new_tokens=6,
        eval_num_prompts=4,
        eval_steps=0,
    )
    policy = load_policy(cfg.model, dtype="float32", peft=cfg.peft)
    run = RunDir.from_config(cfg)
    try:
        for step in (1, 2):
            _perturb(policy.model, step, 0.2 if peft else 0.02)
            run.save(step, models={"policy": model_state_for_checkpoint(policy.model)})
        run.write_final(
            save_policy_to(policy.model, policy.tokenizer), models={"policy": policy.model}
        )
    finally:
        run.close()
    return root / "run"
