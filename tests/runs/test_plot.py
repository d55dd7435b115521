"""``tether plot``: which panel each metric goes in, and the figure it draws."""

from __future__ import annotations

import json
import math

import pytest

from tether.cli import build_parser, main
from tether.runs.plot import (
    MAX_LINES_PER_PANEL,
    PANEL_NAMES,
    PANELS,
    PlotError,
    base_name,
    build_figure,
    constant_value,
    is_heldout,
    line_label,
    metric_panel,
    plan_panels,
    plot_run,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Every key the trainers log (tether/train, tether/control, tether/eval/heldout.py) and every key
# in the runs under runs/lab-full, with the panel it belongs in.
PANEL_OF = {
    # reward / score / return
    "score": "reward",
    "score_std": "reward",
    "rewards/chosen": "reward",
    "rewards/rejected": "reward",
    "rewards/margin": "reward",
    "rewards/mean": "reward",
    "rewards/std": "reward",
    "margin": "reward",
    "episode_return": "reward",
    "eval_return": "reward",
    "eval_return_std": "reward",
    "eval/proxy": "reward",
    "eval/gold/vader": "reward",
    "eval/gold/afinn": "reward",
    "eval/proxy_gold_gap": "reward",
    "eval/proxy_gold_gap/vader": "reward",
    "eval/rewards/chosen": "reward",
    "eval/margin": "reward",
    # accuracies, fractions, rates, 0/1 flags
    "accuracy": "fraction",
    "rewards/accuracy": "fraction",
    "eval/accuracy": "fraction",
    "eval/rewards/accuracy": "fraction",
    "clip_fraction": "fraction",
    "value_clip_fraction": "fraction",
    "finished_fraction": "fraction",
    "trpo/step_fraction": "fraction",
    "trpo/accepted": "fraction",
    "kl_max/rolled_back": "fraction",
    "early_stop": "fraction",
    "win_rate": "fraction",
    "policy/clipfrac": "fraction",
    "val_acc": "fraction",
    # diversity of the held-out samples
    "eval/distinct_1": "diversity",
    "eval/distinct_4": "diversity",
    "eval/ead_1": "diversity",
    "eval/ead_4": "diversity",
    "eval/self_bleu": "diversity",
    "eval/semantic_similarity": "diversity",
    # KL to the reference
    "kl/k1": "kl",
    "kl/k3": "kl",
    "kl/exact": "kl",
    "kl/k3_minus_exact": "kl",
    "kl/after_update": "kl",
    "kl/chosen_logratio": "kl",
    "kl/chosen_k3": "kl",
    "kl/chosen_exact": "kl",
    "eval/kl/k1": "kl",
    "eval/kl/k3": "kl",
    "eval/kl/exact": "kl",
    "eval/kl/offtask": "kl",
    "eval/kl/chosen_k3": "kl",
    # KL between successive policies, sampler and trainer
    "kl_old_new": "kl_update",
    "kl_old_new/after": "kl_update",
    "kl/sampler_trainer": "kl_update",
    "approx_kl": "kl_update",
    "trpo/kl": "kl_update",
    "trpo/line_search_kl": "kl_update",
    # β and other coefficients
    "beta": "beta",
    "penalty_beta": "beta",
    "penalty_beta_next": "beta",
    "clip_range": "beta",
    "objective/kl_coef": "beta",
    # losses
    "loss": "loss",
    "loss/policy": "loss",
    "loss/value": "loss",
    "policy_loss": "loss",
    "value_loss": "loss",
    "bt_loss": "loss",
    "center_penalty": "loss",
    "eval/loss": "loss",
    # entropy / NLL
    "entropy": "entropy",
    "eval/entropy": "entropy",
    "eval/nll": "entropy",
    "eval/ref_nll": "entropy",
    "eval/nll_tax": "entropy",
    # sequence log-probs
    "logps/chosen": "logp",
    "logps/rejected": "logp",
    "eval/logps/chosen": "logp",
    # learning rate
    "lr": "lr",
    "learning_rate": "lr",
    # norms
    "grad_norm": "norm",
    "trpo/grad_norm": "norm",
    "trpo/step_norm": "norm",
    # time (seconds)
    "gen_s": "time",
    "reward_s": "time",
    "kl_s": "time",
    "rollout_s": "time",
    "update_s": "time",
    "s_per_step": "time",
    "eval/seconds": "time",
    # throughput
    "tokens_per_s": "throughput",
    "examples_per_s": "throughput",
    "fps": "throughput",
    # counts and lengths
    "response_length": "count",
    "eval/response_length": "count",
    "episode_length": "count",
    "num_skipped": "count",
    "bad_steps": "count",
    "epochs": "count",
    "pairs": "count",
    "ties": "count",
    "n_updates": "count",
    "skipped_updates": "count",
    "trpo/backtracks": "count",
    "num_tokens": "count",
    # cumulative progress
    "env_steps": "progress",
    "episodes": "progress",
    # other
    "ratio": "other",
    "tis/weight": "other",
    "explained_variance": "other",
    "trpo/improvement": "other",
    "trpo/expected_improvement": "other",
}


@pytest.mark.parametrize(("key", "panel"), sorted(PANEL_OF.items()))
def test_metric_panel(key, panel):
    assert metric_panel(key) == panel


def test_every_panel_is_reachable_and_named_once():
    assert len(set(PANEL_NAMES)) == len(PANELS)
    assert set(PANEL_OF.values()) == set(PANEL_NAMES)


@pytest.mark.parametrize(
    ("key", "heldout", "base"),
    [
        ("eval/kl/k1", True, "kl/k1"),
        ("eval_return", True, "return"),
        ("val_loss", True, "loss"),
        ("kl/k1", False, "kl/k1"),
        ("value_loss", False, "value_loss"),
        ("eval", False, "eval"),
        ("evaluation_score", False, "evaluation_score"),
    ],
)
def test_heldout_and_base_name(key, heldout, base):
    assert is_heldout(key) is heldout
    assert base_name(key) == base


def test_constant_value():
    assert constant_value([0.5]) is None  # logged once: drawn, not "constant"
    assert constant_value([0.5, math.nan, 0.5]) == 0.5
    assert constant_value([0.5, 0.6]) is None
    assert constant_value([math.nan, 0.5]) is None


def test_line_label():
    assert line_label(["kl/k1"]) == "kl/k1"
    assert line_label(["eval/gap", "eval/gap/vader"]) == "eval/gap (= …/vader)"
    assert line_label(["a", "b", "a_2"]) == "a (= b, …_2)"


def _series(steps, values):
    return (list(steps), [float(v) for v in values])


def test_plan_panels_order_constants_duplicates_and_split():
    many = {f"eval/distinct_{i}": _series([0, 5], [0.1 * i, 0.1 * i + 0.01]) for i in range(1, 11)}
    series = {
        "loss": _series(range(1, 6), [3, 2, 1, 1, 0.5]),
        "gen_s": _series(range(1, 6), [1, 2, 1, 2, 1]),
        "score": _series(range(1, 6), [0, 1, 2, 3, 4]),
        "eval/proxy": _series([0, 5], [0, 2]),
        "eval/gap": _series([0, 5], [0, 1]),
        "eval/gap/vader": _series([0, 5], [0, 1]),  # identical to eval/gap: one line
        "accuracy": _series(range(1, 6), [0.5, 0.6, 0.7, 0.7, 0.8]),
        "beta": _series(range(1, 6), [0.1] * 5),  # constant: listed, not drawn
        "eval/nll": _series([5], [2.5]),  # once: drawn
        "eval/proxy_once": _series([5], [2.5]),  # equal to eval/nll by chance: not merged
        "eval/nll_once": _series([5], [2.5]),
        **many,
    }
    plans, constants = plan_panels(series)
    assert constants == {"beta": 0.1}
    assert [p.title for p in plans] == [
        "reward / score / return",
        "accuracy / rate / fraction",
        "diversity (distinct-n, EAD, self-BLEU, similarity) (1/2)",
        "diversity (distinct-n, EAD, self-BLEU, similarity) (2/2)",
        "loss",
        "entropy / NLL",
        "time",
    ]
    assert plans[0].lines == (
        ("score",),
        ("eval/gap", "eval/gap/vader"),
        ("eval/proxy",),
        ("eval/proxy_once",),
    )
    assert plans[5].lines == (("eval/nll",), ("eval/nll_once",))
    assert len(plans[2].lines) == MAX_LINES_PER_PANEL
    assert [k for p in plans[2:4] for (k,) in p.lines] == [
        f"eval/distinct_{i}" for i in range(1, 11)
    ]

    # --keys draws exactly those (a constant one too); --panels keeps those panels
    plans, constants = plan_panels(series, keys=["beta", "loss"])
    assert [p.lines for p in plans] == [(("beta",),), (("loss",),)] and constants == {}
    plans, constants = plan_panels(series, panels=["beta", "reward"])
    assert [p.panel.name for p in plans] == ["reward"] and constants == {"beta": 0.1}
    # panels that hold only constants (a 2-step run's flat β) are drawn, not refused
    plans, constants = plan_panels(series, panels=["beta"])
    assert [p.lines for p in plans] == [(("beta",),)] and constants == {}


def test_plan_panels_errors():
    series = {"kl/k1": _series([1, 2], [0, 1]), "loss": _series([1, 2], [1, 0])}
    with pytest.raises(PlotError, match=r"no numeric metric 'kl/k2' in r; did you mean 'kl/k1'"):
        plan_panels(series, keys=["kl/k2"], where="in r")
    with pytest.raises(PlotError, match=r"no panel 'rewards' \(--panels\); did you mean 'reward'"):
        plan_panels(series, panels=["rewards"])
    with pytest.raises(PlotError, match="goes in the panels lr, time; its panels are kl, loss"):
        plan_panels(series, panels=["lr", "time"], where="in r")
    with pytest.raises(PlotError, match="holds no numeric metrics"):
        plan_panels({})


def write_metrics(run, records):
    run.mkdir(parents=True, exist_ok=True)
    with (run / "metrics.jsonl").open("w") as fh:
        for r in records:
            fh.write(json.dumps({"time": 0.0, **r}) + "\n")


@pytest.fixture
def run(tmp_path):
    """Three training steps (so a default locator would tick at 1.5, 2.5), evaluations at steps
    0 and 3, a metric logged once, a null (a gap), a constant and a non-numeric metric."""
    run = tmp_path / "runs" / "ppo"
    write_metrics(
        run,
        [
            {"step": 0, "eval/proxy": 0.1, "eval/kl/k1": 0.0},
            {"step": 1, "score": 0.2, "kl/k1": 0.5, "loss/policy": 1.0, "beta": 0.1, "lr": 1e-5},
            {"step": 2, "score": None, "kl/k1": 0.7, "loss/policy": 0.8, "beta": 0.1, "lr": 2e-5},
            {"step": 3, "score": 0.6, "kl/k1": 0.9, "loss/policy": 0.7, "beta": 0.1, "lr": 3e-5},
            {"step": 3, "eval/proxy": 0.5, "eval/kl/k1": 1.1, "eval/nll": 2.5, "phase": "eval"},
        ],
    )
    return run


def _visible_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def test_build_figure(run):
    fig = build_figure(run)
    axes = _visible_axes(fig)
    assert [ax.get_title() for ax in axes] == [
        "reward / score / return",
        "KL to the reference",
        "loss: loss/policy",
        "entropy / NLL: eval/nll",
        "learning rate: lr",
    ]
    reward, kl, loss, nll, _ = axes
    # held-out series: dashed with markers, in the colour of their training counterpart
    train_kl, eval_kl = kl.get_lines()
    assert (train_kl.get_label(), eval_kl.get_label()) == ("kl/k1", "eval/kl/k1")
    assert train_kl.get_linestyle() == "-" and eval_kl.get_linestyle() == "--"
    assert eval_kl.get_marker() not in (None, "None", "")
    assert train_kl.get_color() == eval_kl.get_color()
    # every panel with several lines has a legend naming them; single-line panels say it in
    # the title
    for ax in (reward, kl):
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [
            line.get_label() for line in ax.get_lines()
        ]
    assert loss.get_legend() is None
    # the null stays a gap; the metric logged once is a visible marker
    score = reward.get_lines()[0]
    assert score.get_label() == "score" and math.isnan(score.get_ydata()[1])
    (single,) = nll.get_lines()
    assert list(single.get_xdata()) == [3] and single.get_marker() not in (None, "None", "")
    # integer step ticks, the same step range on every panel
    for ax in axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
        assert ax.get_xlim() == axes[0].get_xlim()
    # the constant β is listed under the figure; the title names the run and the line styles
    assert "constant (not drawn): beta = 0.1" in fig.get_supxlabel()
    title = fig.get_suptitle()
    assert title.startswith(f"{run.parent.parent.name}/runs/ppo\n") and "dashed" in title


def test_build_figure_many_series_split(tmp_path):
    run = tmp_path / "run"
    keys = [f"eval/distinct_{i}" for i in range(1, 12)]
    write_metrics(
        run, [{"step": s, **{k: s * (i + 1) for i, k in enumerate(keys)}} for s in (0, 1)]
    )
    axes = _visible_axes(build_figure(run))
    assert [len(ax.get_lines()) for ax in axes] == [8, 3]
    assert axes[0].get_title().endswith("(1/2)") and axes[1].get_title().endswith("(2/2)")
    assert all(ax.get_legend() is not None for ax in axes)


def test_plot_run_and_cli(run, tmp_path, capsys):
    out = plot_run(run)
    assert out == run / "metrics.png" and out.read_bytes().startswith(PNG_MAGIC)

    png = tmp_path / "figs" / "kl.png"
    assert main(["plot", str(run), "--out", str(png), "--keys", "kl/k1, eval/kl/k1, lr"]) == 0
    assert capsys.readouterr().out.strip() == str(png)
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert main(["plot", str(run), "--out", str(png), "--panels", "kl, reward"]) == 0
    capsys.readouterr()

    assert main(["plot", str(run), "--keys", "kl/k2"]) == 2
    assert "did you mean 'kl/k1'?" in capsys.readouterr().err
    assert main(["plot", str(run), "--panels", "kll"]) == 2
    assert "no panel 'kll' (--panels); did you mean 'kl'?" in capsys.readouterr().err
    assert main(["plot", str(run), "--panels", "throughput"]) == 2
    assert "its panels are reward, kl, beta, loss, entropy, lr" in capsys.readouterr().err


def test_cli_help_lists_every_panel():
    sub = build_parser()._subparsers._group_actions[0].choices["plot"]
    help_text = " ".join(sub.format_help().split())
    listed = help_text.split("panels to draw:", 1)[1]
    assert all(name in listed for name in PANEL_NAMES)
