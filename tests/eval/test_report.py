"""The HTML run report: self-contained page, charts, √KL points, token KL colouring, errors."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tether.cli import main
from tether.eval.report import (
    KL_HIGH_RGB,
    SQRT_KL_LABEL,
    kl_colour,
    kl_scale,
    load_run,
    metric_series,
    read_samples,
    select_samples,
    sqrt_kl_series,
    svg_line_chart,
    token_spans,
    write_report,
)

CHROMIUM = Path("/usr/bin/chromium")
SATURATED = "#" + "".join(f"{c:02x}" for c in KL_HIGH_RGB)
EVAL_STEPS = (0, 40, 80)
KL_EXACT = {0: 0.0, 40: 4.0, 80: 9.0}
"""Hand-set eval/kl/exact: √KL is 0, 2, 3."""
KNOWN_TIP = "log π = -1.00, log π_ref = -2.00, KL = 0.50"
SCRIPT = "<script>alert('x')</script>"


def _sample(step: int, prompt_index: int, sample_index: int, completion: str, tokens: bool = True):
    record = {
        "step": step,
        "prompt_index": prompt_index,
        "sample_index": sample_index,
        "prompt": f"Review {prompt_index}: the film was",
        "completion": completion,
        "rewards": {"proxy": 0.5 + 0.01 * step, "sentiment": 0.4 - 0.001 * step},
        "kl": {"k1": 0.1 * step, "k3": 0.09 * step, "exact": 0.11 * step},
    }
    if tokens:
        pieces = re.findall(r"\s*\S+|\s+", completion) or [completion]
        record["tokens"] = pieces
        record["logp"] = [-1.0] * len(pieces)
        record["ref_logp"] = [-2.0] * len(pieces)
        # token 0 has KL 0.5, the others rise to 2.0 (the 99th percentile is the scale)
        record["token_kl"] = [0.5] + [2.0 * (i + 1) / len(pieces) for i in range(len(pieces) - 1)]
    return record


def make_run(
    root: Path,
    name: str = "ppo-run",
    gold_peak: float = 0.6,
    samples: bool = True,
    kl_speed: float = 1.0,
):
    """A run dir with training lines every 10 steps, eval lines at 0/40/80 (sharing steps with
    training lines) and samples at steps 0 and 80; ``kl_speed`` scales every KL."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        "algorithm: ppo\nlr: 1.0e-05\nbeta: 0.05\nmax_steps: 80\nsampling:\n  top_k: 0\n",
        encoding="utf-8",
    )
    lines = []
    for step in range(0, 81, 10):
        lines.append(
            {
                "step": step,
                "time": 1.7e9 + step,
                "score": 0.2 + 0.01 * step,
                "kl/k1": 0.02 * step * kl_speed,
                "kl/k3": 0.018 * step * kl_speed,
                "beta": 0.05 + 0.0005 * step,
                "entropy": 2.0 - 0.01 * step,
                "loss": 1.0 / (step + 1),
                "lr": 1e-5,
            }
        )
        if step in EVAL_STEPS:
            x = math.sqrt(KL_EXACT[step] * kl_speed)
            lines.append(
                {
                    "step": step,
                    "time": 1.7e9 + step + 0.5,
                    "eval/proxy": 0.3 + 0.2 * x,
                    "eval/gold/sentiment": 0.3 + gold_peak * x - 0.15 * x * x,
                    "eval/proxy_gold_gap": 0.1 * x,
                    "eval/kl/exact": KL_EXACT[step] * kl_speed,
                    "eval/kl/k1": KL_EXACT[step] * kl_speed * 1.1,
                    "eval/kl/offtask": None,
                    "eval/entropy": 2.0 - 0.1 * x,
                    "eval/distinct_1": 0.6 - 0.05 * x,
                    "eval/distinct_2": 0.8 - 0.05 * x,
                    "eval/ead_1": 0.7 - 0.05 * x,
                    "eval/self_bleu": 0.2 + 0.05 * x,
                    "eval/nll": 3.0 + 0.02 * x,
                    "eval/ref_nll": 3.0,
                    "eval/nll_tax": 0.02 * x,
                    "eval/response_length": 20 + x,
                }
            )
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8"
    )
    if samples:
        folder = run / "samples"
        folder.mkdir()
        for step in (0, 80):
            records = [
                _sample(step, p, s, f"a truly great movie\nwith {SCRIPT} {p}-{s}")
                for s in range(2)
                for p in range(5)
            ]
            (folder / f"step-{step:06d}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8"
            )
    return run


@pytest.fixture
def run_dir(tmp_path):
    return make_run(tmp_path)


def _svgs(text: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", text, flags=re.S)


def _svg_titled(text: str, title: str) -> str:
    found = [s for s in _svgs(text) if f'aria-label="{title}"' in s]
    assert len(found) == 1, f"expected one chart titled {title!r}, found {len(found)}"
    return found[0]


def test_report_is_self_contained_with_every_chart(run_dir):
    out = write_report([run_dir])
    assert out == run_dir / "report.html"
    text = out.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"<(script|link|img|iframe)\b", text, flags=re.I)
    assert not re.search(r"""(src|href)\s*=\s*["'](?!#)""", text, flags=re.I)
    for title in (
        "Rewards",
        "Proxy and gold reward vs √KL",
        "KL during training",
        "KL on held-out prompts",
        "β (KL coefficient)",
        "Distinct-n",
        "Expectation-adjusted distinct-n",
        "Similarity between samples",
        "Entropy",
        "NLL of held-out text",
        "NLL tax (nll − ref_nll)",
        "loss",
        "eval/proxy_gold_gap",
    ):
        _svg_titled(text, title)
    rewards = _svg_titled(text, "Rewards")
    for key in ("score", "eval/proxy", "eval/gold/sentiment"):
        assert f">{key}</text>" in rewards  # legend entries
    assert "<details>" in text and "1e-05" in text  # config table
    assert "constant: lr" in text.lower()
    # sections in the order of the brief
    order = ["summary", "rewards", "sqrt-kl", "kl", "diversity", "capability", "samples"]
    positions = [text.index(f'<section id="{a}">') for a in order]
    assert positions == sorted(positions)


def test_summary_first_and_last_eval(run_dir):
    text = write_report([run_dir]).read_text(encoding="utf-8")
    summary = text[text.index('<section id="summary">') : text.index('<section id="rewards">')]
    assert ">ppo<" in summary  # the algorithm from config.yaml
    assert "0.3 → <b>0.9</b>" in summary  # eval/proxy at step 0 and 80
    gold_last = 0.3 + 0.6 * 3 - 0.15 * 9
    assert f"0.3 → <b>{gold_last:.4g}</b>" in summary
    assert '<span title="step 80">9</span>' in summary  # eval/kl/exact at the last eval


def test_metric_lines_sharing_a_step_merge():
    records = [
        {"step": 0, "time": 1.0, "score": 1.0, "eval/proxy": None},
        {"step": 0, "time": 2.0, "eval/proxy": 0.5},
        {"step": 10, "time": 3.0, "score": 2.0, "note": "text", "flag": True},
    ]
    assert metric_series(records) == {"eval/proxy": [(0, 0.5)], "score": [(0, 1.0), (10, 2.0)]}


def test_sqrt_kl_x_values_are_sqrt_of_exact_kl(run_dir):
    run = load_run(run_dir)
    points = sqrt_kl_series(run.metrics)
    assert list(points) == ["eval/proxy", "eval/gold/sentiment"]
    for key, rows in points.items():
        assert [s for _, _, s in rows] == list(EVAL_STEPS)
        assert [x for x, _, _ in rows] == pytest.approx([0.0, 2.0, 3.0], abs=1e-12)
        expected = dict(run.metrics[key])
        assert [y for _, y, _ in rows] == [expected[s] for s in EVAL_STEPS]
    negative = {"eval/kl/exact": [(0, -0.01)], "eval/proxy": [(0, 1.0)]}
    assert sqrt_kl_series(negative) == {"eval/proxy": [(0.0, 1.0, 0)]}
    text = write_report([run_dir]).read_text(encoding="utf-8")
    chart = _svg_titled(text, "Proxy and gold reward vs √KL")
    assert SQRT_KL_LABEL in chart
    assert "√KL = 2 (KL = 4 nats)" in chart


def test_token_spans_tooltip_and_colour():
    sample = {
        "completion": "Hi <b>\n",
        "tokens": ["Hi", " <b>", "\n"],
        "logp": [-1.0, -1.5, -0.25],
        "ref_logp": [-2.0, -1.5, -0.5],
        "token_kl": [0.5, 2.0, 0.0],
    }
    spans = token_spans(sample, scale=2.0)
    assert spans.count('<span class="tok"') == 3
    assert f'title="{KNOWN_TIP}"' in spans
    assert f"background:{SATURATED};color:#fff" in spans  # KL at the scale: saturated
    assert "background:#ffffff" in spans  # KL 0: white
    assert "&lt;b&gt;" in spans and "<b>" not in spans
    assert "↵" in spans
    plain = token_spans({"completion": "x < y"}, scale=1.0)
    assert plain == "x &lt; y"


def test_kl_colour_white_at_zero_and_monotone():
    assert kl_colour(0.0, 1.0) == "#ffffff"
    assert kl_colour(-1.0, 1.0) == "#ffffff"
    assert kl_colour(1.0, 1.0) == SATURATED
    assert kl_colour(5.0, 1.0) == SATURATED
    channels = [[int(kl_colour(v / 20, 1.0)[i : i + 2], 16) for i in (1, 3, 5)] for v in range(21)]
    for before, after in zip(channels, channels[1:], strict=False):
        assert all(a <= b for a, b in zip(after, before, strict=True))
        assert sum(after) < sum(before)
    with pytest.raises(ValueError, match="scale"):
        kl_colour(1.0, 0.0)


def test_scale_is_99th_percentile_of_shown_tokens():
    samples = [{"tokens": ["a"] * 101, "logp": [0] * 101, "ref_logp": [0] * 101,
                "token_kl": [float(i) for i in range(101)]}]  # fmt: skip
    assert kl_scale(samples) == pytest.approx(99.0)
    assert kl_scale([{"completion": "no tokens"}]) == 1.0


def test_report_samples_section(run_dir):
    text = write_report([run_dir]).read_text(encoding="utf-8")
    samples = text[text.index('<section id="samples">') :]
    assert f'title="{KNOWN_TIP}"' in samples
    assert f"background:{SATURATED}" in samples  # the largest token KL is at the 99th pct
    assert SCRIPT not in text
    assert html_escaped(SCRIPT) in samples
    assert "<h4>step 0 " in samples and "<h4>step 80 " in samples  # default: first/middle/last
    assert samples.count('<div class="sample">') == 2 * 8
    assert "exact KL <b>8.8</b>" in samples  # the sample's exact KL at step 80
    assert "token KL(π_θ‖π_ref)" in samples  # the colour legend


def html_escaped(text: str) -> str:
    import html

    return html.escape(text)


def test_first_sample_of_each_prompt_comes_first():
    records = [{"prompt_index": p, "sample_index": s} for p in range(3) for s in range(4)]
    chosen = select_samples(records, limit=5)
    assert [(r["prompt_index"], r["sample_index"]) for r in chosen] == [
        (0, 0),
        (1, 0),
        (2, 0),
        (0, 1),
        (1, 1),
    ]


def test_plain_samples_without_token_fields(tmp_path):
    run = make_run(tmp_path, samples=False)
    (run / "samples").mkdir()
    record = _sample(40, 0, 0, "plain <i>text</i>", tokens=False)
    (run / "samples" / "step-000040.jsonl").write_text(json.dumps(record) + "\n")
    text = write_report([run]).read_text(encoding="utf-8")
    assert '<div class="completion plain">plain &lt;i&gt;text&lt;/i&gt;</div>' in text
    assert 'class="tok"' not in text


def test_two_runs_overlay(tmp_path):
    a = make_run(tmp_path, "beta-0.05")
    b = make_run(tmp_path, "beta-0.20", gold_peak=0.9, kl_speed=0.5)
    out = write_report([a, b], out=tmp_path / "both" / "cmp.html")
    text = out.read_text(encoding="utf-8")
    for chart in (_svg_titled(text, "Rewards"), _svg_titled(text, "Proxy and gold reward vs √KL")):
        legend = chart[chart.index('<g class="legend">') :]
        for entry in ("beta-0.05", "beta-0.20", "eval/proxy", "eval/gold/sentiment"):
            assert f">{entry}</text>" in legend
        assert "<title>beta-0.05 · eval/proxy</title>" in chart  # each line names run and key
        assert "<title>beta-0.20 · eval/proxy</title>" in chart
    assert "√KL = 1.414 (KL = 2 nats)" in _svg_titled(text, "Proxy and gold reward vs √KL")
    assert '<h3 class="run-name">beta-0.05</h3>' in text
    assert '<h3 class="run-name">beta-0.20</h3>' in text
    assert not (a / "report.html").exists()


def test_missing_run_dir_is_named(tmp_path):
    missing = tmp_path / "not-a-run"
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match="not-a-run"):
        write_report([missing])


def test_bad_steps_list_available(run_dir):
    with pytest.raises(ValueError, match=r"step 40 .*available steps: 0, 80"):
        write_report([run_dir], steps=[40])
    out = write_report([run_dir], steps=[80])
    assert "<h4>step 0 " not in out.read_text(encoding="utf-8")


def test_malformed_samples_line_names_file_and_line(run_dir):
    path = run_dir / "samples" / "step-000080.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"step-000080\.jsonl:3: malformed samples line"):
        read_samples(path)
    record = json.loads(lines[0])
    record["token_kl"] = record["token_kl"][:-1]
    lines[2] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r":3: .*differ in length"):
        write_report([run_dir])


def test_svg_line_chart_empty_and_ticks():
    assert svg_line_chart({"a": []}, "t", "x", "y") == ""
    assert svg_line_chart({"a": [(0.0, math.nan)]}, "t", "x", "y") == ""
    svg = svg_line_chart({"a": [(0, 0.0), (10, 1.0)]}, "Title", "step", "value", integer_x=True)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count("<circle") == 2 and svg.count("<title>") == 3  # series + two points
    assert ">10</text>" in svg and ">1.0</text>" in svg


def test_cli_report(run_dir, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(run_dir), "--out", str(out), "--steps", "0,80"]) == 0
    assert out.is_file() and capsys.readouterr().out.strip() == str(out)
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.html").is_file()


def test_cli_report_errors(run_dir, tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tether report: error:") and "nowhere" in err
    assert "Traceback" not in err
    assert main(["report", str(run_dir), "--steps", "40"]) == 2
    assert "available steps: 0, 80" in capsys.readouterr().err
    assert main(["report", str(run_dir), "--steps", "x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err


@pytest.mark.slow
def test_chromium_renders_report(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium) so nothing can render")
    runs = [make_run(tmp_path, "beta-0.05"), make_run(tmp_path, "beta-0.20", 0.9, kl_speed=0.5)]
    out = write_report(runs)
    png = tmp_path / "report.png"
    profile = tmp_path / "profile"
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1280,2400",
        f"--screenshot={png}",
        out.resolve().as_uri(),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    assert png.is_file() and png.stat().st_size > 20_000
    shutil.rmtree(profile, ignore_errors=True)
