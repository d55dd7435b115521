"""tether.control vs Stable-Baselines3 ``PPO`` and sb3-contrib ``TRPO`` on gymnasium control tasks.

Same environments, same hyper-parameters (RL-Zoo's tuned settings where they exist, without gSDE,
which tether does not have), same network (separate 64-64 tanh policy and value MLPs, orthogonal
init), same normalisation (SB3 ``VecNormalize`` ↔ tether ``normalize_obs``/``normalize_reward``
where the zoo normalises), same seeds, same budget of environment steps; both libraries run with
one torch thread, each run in a fresh subprocess, one after another.

Both libraries' environments are wrapped by the same episode recorder, so "time to threshold" is
measured identically: the wall-clock seconds (and environment steps) from the start of training
to the end of the first episode at which the mean return of the last ``--window`` episodes reaches
the threshold (CartPole-v1 475, Acrobot-v1 −100, Pendulum-v1 −200); a seed that never reaches it
counts as its whole budget (steps and seconds) in the medians over seeds. The final return is the
mean of 10 deterministic evaluation episodes after the budget.

    python benchmarks/control_vs_sb3.py                       # 3 envs × {ppo, trpo} × 3 seeds
    python benchmarks/control_vs_sb3.py --envs CartPole-v1 --seeds 0 --algos ppo   # one pair

Prints a row per (env, algorithm, library) with medians over seeds, then per (env, algorithm)
the ratio tether/SB3 of the median wall-clock to threshold. The last line is
``wall-clock to threshold: <X>x SB3 (geometric mean over env × algorithm), final return
tether <a> vs SB3 <b> (mean)``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

THRESHOLDS = {"CartPole-v1": 475.0, "Acrobot-v1": -100.0, "Pendulum-v1": -200.0}

# Shared hyper-parameters per (env, algorithm), in SB3's names; tether's names are mapped below.
SETTINGS: dict[tuple[str, str], dict] = {
    ("CartPole-v1", "ppo"): dict(
        steps=100_000,
        n_envs=8,
        n_steps=32,
        batch_size=256,
        n_epochs=20,
        gamma=0.98,
        gae_lambda=0.8,
        learning_rate=1e-3,
        linear=True,
        normalize=False,
    ),
    ("CartPole-v1", "trpo"): dict(
        steps=100_000,
        n_envs=2,
        n_steps=512,
        batch_size=512,
        gamma=0.99,
        gae_lambda=0.98,
        n_critic_updates=20,
        learning_rate=1e-3,
        normalize=False,
    ),
    ("Acrobot-v1", "ppo"): dict(
        steps=100_000,
        n_envs=16,
        n_steps=256,
        batch_size=64,
        n_epochs=4,
        gamma=0.99,
        gae_lambda=0.94,
        learning_rate=3e-4,
        linear=False,
        normalize=True,
    ),
    ("Acrobot-v1", "trpo"): dict(
        steps=100_000,
        n_envs=2,
        n_steps=1024,
        batch_size=128,
        gamma=0.99,
        gae_lambda=0.95,
        n_critic_updates=10,
        learning_rate=1e-3,
        normalize=True,
    ),
    ("Pendulum-v1", "ppo"): dict(
        steps=100_000,
        n_envs=4,
        n_steps=1024,
        batch_size=64,
        n_epochs=10,
        gamma=0.9,
        gae_lambda=0.95,
        learning_rate=1e-3,
        linear=False,
        normalize=False,
    ),
    ("Pendulum-v1", "trpo"): dict(
        steps=100_000,
        n_envs=2,
        n_steps=1024,
        batch_size=128,
        gamma=0.9,
        gae_lambda=0.95,
        n_critic_updates=20,
        learning_rate=1e-3,
        normalize=False,
    ),
}


def _first_crossing(episodes: list[list[float]], threshold: float, window: int):
    """(env_steps, wall_s) at the first episode end where the rolling mean ≥ threshold."""
    rets: list[float] = []
    for ret, steps, wall in episodes:
        rets.append(ret)
        if len(rets) >= window and statistics.fmean(rets[-window:]) >= threshold:
            return steps, wall
    return None, None


def child_tether(spec: dict) -> dict:
    import tempfile

    from tether.control import PPOControlConfig, TRPOControlConfig, evaluate_policy, fit

    s = spec["settings"]
    common = dict(
        env=spec["env"],
        n_envs=s["n_envs"],
        n_steps=s["n_steps"],
        gamma=s["gamma"],
        gae_lambda=s["gae_lambda"],
        learning_rate=s["learning_rate"],
        total_timesteps=s["steps"],
        seed=spec["seed"],
        eval_episodes=0,
        logging_steps=10_000,
        normalize_obs=s["normalize"],
        normalize_reward=s["normalize"],
        torch_threads=1,
    )
    with tempfile.TemporaryDirectory() as tmp:
        if spec["algo"] == "ppo":
            cfg = PPOControlConfig(
                output_dir=tmp + "/run",
                batch_size=s["batch_size"],
                n_epochs=s["n_epochs"],
                vf_coef=1.0,  # SB3's 0.5·(V−R)² = tether's 1.0·½(V−R)²
                lr_schedule="linear" if s["linear"] else "constant",
                clip_schedule="linear" if s["linear"] else "constant",
                **common,
            )
        else:
            cfg = TRPOControlConfig(
                output_dir=tmp + "/run",
                vf_batch_size=s["batch_size"],
                vf_iters=s["n_critic_updates"],
                **common,
            )
        run = fit(cfg)
        train_s = run.train_s  # the loop, as SB3's learn(): no setup
    episodes = [[e.ret, e.env_steps, e.wall_s] for e in run.episodes]
    returns = evaluate_policy(run.policy, run.obs_norm, spec["env"], 10, 10_000 + spec["seed"])
    return {"episodes": episodes, "train_s": train_s, "eval_return": statistics.fmean(returns)}


def child_sb3(spec: dict) -> dict:
    import gymnasium as gym
    import numpy as np
    import torch
    from sb3_contrib import TRPO
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    torch.set_num_threads(1)
    s = spec["settings"]
    clock = {"t0": None, "steps": 0}
    episodes: list[list[float]] = []

    class Recorder(gym.Wrapper):
        """Records (raw return, total env steps, wall seconds) at every episode end."""

        def reset(self, **kwargs):
            self._ret = 0.0
            return self.env.reset(**kwargs)

        def step(self, action):
            obs, r, term, trunc, info = self.env.step(action)
            clock["steps"] += 1
            self._ret += float(r)
            if (term or trunc) and clock["t0"] is not None:
                episodes.append([self._ret, clock["steps"], time.perf_counter() - clock["t0"]])
            return obs, r, term, trunc, info

    venv = make_vec_env(spec["env"], n_envs=s["n_envs"], seed=spec["seed"], wrapper_class=Recorder)
    if s["normalize"]:
        venv = VecNormalize(venv, gamma=s["gamma"])
    if spec["algo"] == "ppo":

        def lin(v):
            return (lambda p: p * v) if s["linear"] else v

        model = PPO(
            "MlpPolicy",
            venv,
            n_steps=s["n_steps"],
            batch_size=s["batch_size"],
            n_epochs=s["n_epochs"],
            gamma=s["gamma"],
            gae_lambda=s["gae_lambda"],
            learning_rate=lin(s["learning_rate"]),
            clip_range=lin(0.2),
            ent_coef=0.0,
            seed=spec["seed"],
            device="cpu",
            verbose=0,
        )
    else:
        model = TRPO(
            "MlpPolicy",
            venv,
            n_steps=s["n_steps"],
            batch_size=s["batch_size"],
            gamma=s["gamma"],
            gae_lambda=s["gae_lambda"],
            n_critic_updates=s["n_critic_updates"],
            learning_rate=s["learning_rate"],
            seed=spec["seed"],
            device="cpu",
            verbose=0,
        )
    clock["t0"] = time.perf_counter()
    clock["steps"] = 0
    model.learn(total_timesteps=s["steps"])
    train_s = time.perf_counter() - clock["t0"]
    env = gym.make(spec["env"])
    returns = []
    for i in range(10):
        obs, _ = env.reset(seed=10_000 + spec["seed"] + i)
        total, done = 0.0, False
        while not done:
            o = venv.normalize_obs(obs[None]) if s["normalize"] else obs[None]
            a, _ = model.predict(np.asarray(o), deterministic=True)
            obs, r, term, trunc, _ = env.step(a[0])
            total += float(r)
            done = term or trunc
        returns.append(total)
    return {"episodes": episodes, "train_s": train_s, "eval_return": statistics.fmean(returns)}


def run_child(spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if out.returncode != 0:
        raise RuntimeError(
            f"child {spec['lib']} {spec['env']} {spec['algo']} failed:\n{out.stderr}"
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--envs", nargs="*", default=list(THRESHOLDS))
    ap.add_argument("--algos", nargs="*", default=["ppo", "trpo"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--window", type=int, default=20, help="episodes in the rolling mean")
    ap.add_argument("--steps", type=int, help="override every budget (env steps)")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        spec = json.loads(a.child)
        fn = child_tether if spec["lib"] == "tether" else child_sb3
        print(json.dumps(fn(spec)))
        return
    results = []
    for env in a.envs:
        for algo in a.algos:
            settings = dict(SETTINGS[(env, algo)])
            if a.steps:
                settings["steps"] = a.steps
            for seed in a.seeds:
                for lib in ("tether", "sb3"):
                    spec = {
                        "lib": lib,
                        "env": env,
                        "algo": algo,
                        "seed": seed,
                        "settings": settings,
                    }
                    r = run_child(spec)
                    steps, wall = _first_crossing(r["episodes"], THRESHOLDS[env], a.window)
                    row = {
                        "lib": lib,
                        "env": env,
                        "algo": algo,
                        "seed": seed,
                        "steps_to_threshold": steps,
                        "wall_to_threshold": wall,
                        "train_s": r["train_s"],
                        "eval_return": r["eval_return"],
                        "budget": settings["steps"],
                    }
                    results.append(row)
                    print(
                        f"  {env:12s} {algo:5s} seed {seed} {lib:6s}: threshold at "
                        f"{steps if steps is not None else '—'} steps / "
                        f"{f'{wall:.1f} s' if wall is not None else '—'}; "
                        f"train {r['train_s']:.1f} s; eval {r['eval_return']:.1f}",
                        flush=True,
                    )
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))

    def med(xs):
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None

    print()
    header = (
        f"{'env':12s} {'algo':5s} {'lib':6s} {'solved':>6s} {'steps→thr':>10s} "
        f"{'s→thr':>7s} {'train s':>8s} {'final return':>13s}"
    )
    print(header)
    print("-" * len(header))
    ratios, finals = [], {"tether": [], "sb3": []}
    for env in a.envs:
        for algo in a.algos:
            walls = {}
            for lib in ("tether", "sb3"):
                rows = [r for r in results if (r["env"], r["algo"], r["lib"]) == (env, algo, lib)]
                solved = sum(r["wall_to_threshold"] is not None for r in rows)
                st, wl = (
                    med([r["steps_to_threshold"] for r in rows]),
                    med([r["wall_to_threshold"] for r in rows]),
                )
                tr = statistics.median(r["train_s"] for r in rows)
                fin = statistics.fmean(r["eval_return"] for r in rows)
                finals[lib].append(fin)
                walls[lib] = (wl, tr)
                print(
                    f"{env:12s} {algo:5s} {lib:6s} {solved:>3d}/{len(rows):<2d} "
                    f"{(f'{st:.0f}' if st is not None else '—'):>10s} "
                    f"{(f'{wl:.1f}' if wl is not None else '—'):>7s} {tr:8.1f} {fin:13.1f}"
                )
            (wt, tt), (ws, ts) = walls["tether"], walls["sb3"]
            if wt is not None and ws is not None:
                ratio, what = wt / ws, "wall-clock to threshold"
            else:
                ratio, what = tt / ts, "training wall-clock (threshold not reached by both)"
            ratios.append(ratio)
            print(f"  → {env} {algo}: tether/SB3 {what}: {ratio:.2f}x")
    geo = math.exp(statistics.fmean(math.log(r) for r in ratios))
    print(
        f"wall-clock to threshold: {geo:.2f}x SB3 (geometric mean over env × algorithm), final "
        f"return tether {statistics.fmean(finals['tether']):.1f} vs SB3 "
        f"{statistics.fmean(finals['sb3']):.1f} (mean)"
    )


if __name__ == "__main__":
    main()
