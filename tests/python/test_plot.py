"""The demo's figure (matplotlib, the ``plot`` extra) and ``kdcore plot``."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from conftest import png_info
from kdcore.demo.plot import draw_demo_figure, write_demo_figure

STUDENTS = ("sft", "token_kd", "span_kd")


def make_summary(seeds=(0, 1, 2), steps=20):
    """A summary shaped like run_demo's, with distinct made-up numbers per seed."""
    curves, aggregate = (
        {},
        [{"model": "teacher", "success_rate": 1.0, "success_sd": 0.0, "success_by_seed": [1.0]}],
    )
    for i, name in enumerate(STUDENTS):
        curves[name] = {
            str(seed): [(step, 3.0 / (step + i + seed)) for step in range(1, steps + 1)]
            for seed in seeds
        }
        rates = [0.2 * i + 0.05 * seed for seed in seeds]
        aggregate.append(
            {
                "model": name,
                "success_rate": statistics.fmean(rates),
                "success_sd": statistics.stdev(rates) if len(rates) > 1 else 0.0,
                "success_by_seed": rates,
            }
        )
    return {"aggregate": aggregate, "curves_by_seed": curves}


def bar_container(ax):
    from matplotlib.container import BarContainer

    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    return bars


def test_figure_shows_mean_curves_success_bars_and_seed_spread():
    summary = make_summary()
    fig = draw_demo_figure(summary)
    loss_ax, success_ax = fig.axes
    assert loss_ax.get_yscale() == "log"
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    assert set(lines) == {"SFT", "token-level KD", "span-level KD"}
    for i, label in enumerate(("SFT", "token-level KD", "span-level KD")):
        x, y = lines[label].get_data()
        assert list(x) == list(range(1, 21))
        expected = [statistics.fmean(3.0 / (s + i + seed) for seed in (0, 1, 2)) for s in x]
        assert list(y) == pytest.approx(expected, rel=1e-12)
    assert len(loss_ax.collections) == 3  # one band (range over seeds) per student

    bars = success_ax.patches
    assert len(bars) == 4  # three students, then the teacher
    rows = {r["model"]: r for r in summary["aggregate"]}
    for bar, name in zip(bars, (*STUDENTS, "teacher"), strict=True):
        assert bar.get_height() == pytest.approx(
            100 * statistics.fmean(rows[name]["success_by_seed"])
        )
    # Error bars: one vertical segment per bar, mean +- sample standard deviation.
    (errorbar,) = bar_container(success_ax).errorbar.lines[2]
    for (low, high), name in zip(
        [seg[:, 1] for seg in errorbar.get_segments()], (*STUDENTS, "teacher"), strict=True
    ):
        rates = [100 * r for r in rows[name]["success_by_seed"]]
        sd = statistics.stdev(rates) if len(rates) > 1 else 0.0
        assert (high - low) / 2 == pytest.approx(sd, abs=1e-9)
    ticks = [t.get_text() for t in success_ax.get_xticklabels()]
    assert ticks == ["SFT", "token-level\nKD", "span-level\nKD", "teacher"]


def test_single_seed_figure_has_no_error_bars_or_bands():
    fig = draw_demo_figure(make_summary(seeds=(0,)))
    loss_ax, success_ax = fig.axes
    assert len(loss_ax.collections) == 0
    assert bar_container(success_ax).errorbar is None


def test_curves_keep_only_steps_every_seed_logged_and_drop_non_positive_losses():
    summary = make_summary(seeds=(0, 1))
    summary["curves_by_seed"]["sft"]["1"] = summary["curves_by_seed"]["sft"]["1"][:5]
    summary["curves_by_seed"]["sft"]["0"][2] = (3, float("nan"))
    summary["curves_by_seed"]["sft"]["0"][3] = (4, 0.0)
    line = draw_demo_figure(summary).axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [1, 2, 5]


def test_write_demo_figure_writes_a_matplotlib_png_atomically(tmp_path):
    path = tmp_path / "demo.png"
    path.write_bytes(b"old")
    write_demo_figure(path, make_summary())
    (width, height), text = png_info(path)
    assert width >= 800 and height >= 300
    assert text["Software"].startswith("Matplotlib")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.png"]  # no temp file left


def test_figure_reads_the_old_single_curve_summary_format():
    summary = make_summary(seeds=(0,))
    summary["curves"] = {k: v["0"] for k, v in summary.pop("curves_by_seed").items()}
    assert len(draw_demo_figure(summary).axes[0].get_lines()) == 3


_NO_MATPLOTLIB = "import sys; sys.modules['matplotlib'] = None; "


def test_without_matplotlib_the_figure_is_a_clear_import_error():
    code = _NO_MATPLOTLIB + (
        "from kdcore.demo.plot import draw_demo_figure\n"
        "try:\n    draw_demo_figure({'aggregate': []})\n"
        "except ImportError as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("MissingExtraError the demo's figure needs matplotlib")
    assert 'pip install "kdcore[plot]"' in out.stdout


def test_demo_without_matplotlib_says_how_to_get_the_figure(tmp_path):
    (tmp_path / "demo.png").write_bytes(b"figure of an earlier run")
    code = _NO_MATPLOTLIB + (
        "from pathlib import Path; from kdcore.demo.pipeline import _write_figure\n"
        f"out = Path({str(tmp_path)!r})\n"
        "print(repr(_write_figure(out / 'demo.png', {'aggregate': []}, out / 'summary.json')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "''"
    message = out.stderr.strip()
    assert message.count("\n") == 0, "one line"
    assert 'pip install "kdcore[plot]"' in message and "kdcore plot" in message
    assert not (tmp_path / "demo.png").exists(), "a stale figure would not match this run"


def test_kdcore_plot_draws_the_figure_of_a_summary(tmp_path):
    from kdcore.cli import main

    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps(make_summary()))
    assert main(["plot", str(summary)]) == 0
    assert png_info(tmp_path / "demo.png")[1]["Software"].startswith("Matplotlib")
    assert main(["plot", str(summary), "--out", str(tmp_path / "other.png")]) == 0
    assert (tmp_path / "other.png").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "cannot read"),
        ('{"rows": []}', "is not a summary.json of `kdcore demo`"),
        ('{"aggregate": [{"model": "sft"}]}', "is not a well-formed demo summary"),
    ],
)
def test_kdcore_plot_rejects_bad_summaries(tmp_path, capsys, content, message):
    from kdcore.cli import main

    summary = tmp_path / "summary.json"
    summary.write_text(content)
    with pytest.raises(SystemExit) as exc:
        main(["plot", str(summary)])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "demo.png").exists()


def test_kdcore_plot_needs_an_existing_summary(tmp_path, capsys):
    from kdcore.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["plot", str(tmp_path / "missing.json")])
    assert exc.value.code == 2 and "no such file" in capsys.readouterr().err


def test_figure_shows_where_failed_episodes_first_go_wrong():
    summary = make_summary()
    summary["config"] = {"held_out": 50}
    counts = {"sft": (10, 5), "token_kd": (3, 0), "span_kd": (0, 6)}  # reason, answer
    for row in summary["aggregate"][1:]:
        reason, answer = counts[row["model"]]
        row["first_error"] = {"reason": reason, "action:tool": 0, "answer": answer}
    fig = draw_demo_figure(summary)
    assert len(fig.axes) == 3
    error_ax = fig.axes[2]
    from matplotlib.container import BarContainer

    stacks = [c for c in error_ax.containers if isinstance(c, BarContainer)]
    assert [c.get_label() for c in stacks] == ["reason", "answer"]  # kinds never seen: left out
    # Share of all held-out episodes over the 3 seeds (150 per student), stacked.
    reason_bars, answer_bars = stacks
    want_reason = [100 * counts[n][0] / 150 for n in STUDENTS]
    want_answer = [100 * counts[n][1] / 150 for n in STUDENTS]
    assert [b.get_height() for b in reason_bars] == pytest.approx(want_reason)
    assert [b.get_height() for b in answer_bars] == pytest.approx(want_answer)
    assert [b.get_y() for b in answer_bars] == pytest.approx(want_reason)
