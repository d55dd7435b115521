"""The trainers' config dataclasses, importable without torch.

``tether train ALGO --help-config`` and ``--print-config`` only need the config class: its fields,
defaults, help and ``__post_init__`` checks. The trainer modules import torch, transformers and
accelerate (≈10 s), so the configs live here, one module per trainer module of
:mod:`tether.train` (``tether.configs.dpo`` holds what ``tether.train.dpo`` trains), and each
trainer module re-exports its config:
``tether.train.dpo.DPOConfig is tether.configs.dpo.DPOConfig``.

* :mod:`tether.configs.literals` — the Literal option types and help strings the configs share
  with the code they configure (that code imports them from here).
* :mod:`tether.configs.checks` — pure-python checks shared the same way (the adaptive
  controller's horizon bound, eval reward names).
* :mod:`tether.configs.eval` — :class:`EvalConfig`, held-out evaluation fields.
* :mod:`tether.configs.common` — :class:`TrainConfig`, :class:`SamplingTrainConfig`,
  :class:`PreferenceDataConfig`.
* :mod:`tether.configs.dpo`, ``rl``, ``ppo``, ``grpo``, ``trpo``, ``reward_model``,
  ``online_dpo`` — one per trainer.

The rule (tested in ``tests/runs/test_startup.py``): a module here imports only the standard
library, ``yaml``, :mod:`tether.errors`, :mod:`tether.runs.config` and other ``tether.configs``
modules. A check that needs torch (e.g. :attr:`DPOConfig.reference_kind` resolving
``mixed_precision=auto``) imports it inside the function that needs it, which only training calls.
:mod:`tether.runs.registry` maps each algorithm to its config here (``CONFIGS``).
"""
