"""The demo's figure, drawn by matplotlib (the ``plot`` extra) on the Agg canvas.

Left: each student's training loss against the step — the mean over seeds as
a line, the range over seeds as a band. Middle: held-out task success per
model — the mean over seeds as a bar, one dot per seed, and the standard
deviation over seeds as an error bar. Then (when the summary has them):
where the failed episodes first go wrong, per student, as a share of all
its held-out episodes over all seeds; and each student's KL from the teacher
on the reasoning and the action spans.

Everything it draws comes from ``summary.json``, so ``kdcore plot`` can draw
the figure of a demo that ran without matplotlib.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._extras import require
from .._files import atomic_write

#: One colour per student, in the order the demo trains them; the teacher is grey.
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
_TEACHER = "#7f7f7f"
_LABELS = {"sft": "SFT", "token_kd": "token-level KD", "span_kd": "span-level KD"}
_TICKS = {"sft": "SFT", "token_kd": "token-level\nKD", "span_kd": "span-level\nKD"}


def _label(name: str) -> str:
    return _LABELS.get(name, name)


def _curve_band(
    runs: Sequence[Sequence[Sequence[float]]],
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Steps, mean, min and max over the runs at the steps every run logged."""
    by_step: dict[float, list[float]] = {}
    for run in runs:
        for step, value in run:
            if math.isfinite(value) and value > 0:  # the loss axis is logarithmic
                by_step.setdefault(float(step), []).append(float(value))
    steps = sorted(s for s, values in by_step.items() if len(values) == len(runs))
    mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
    low = [min(by_step[s]) for s in steps]
    high = [max(by_step[s]) for s in steps]
    return steps, mean, low, high


def draw_demo_figure(summary: Mapping[str, Any]):
    """A matplotlib ``Figure`` of a demo summary (``run_demo``'s return value)."""
    require("matplotlib", extra="plot", feature="the demo's figure")
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    aggregate = list(summary["aggregate"])
    curves = summary.get("curves_by_seed") or {
        name: {"0": curve} for name, curve in summary.get("curves", {}).items()
    }
    seeds = max((len(r.get("success_by_seed", [])) for r in aggregate), default=1)
    errors = [r for r in aggregate if r["model"] != "teacher" and "first_error" in r]
    kl_rows = [r for r in aggregate if r["model"] != "teacher" and _has_span_kl(r)]
    ratios = (3, 2) + ((2,) if errors else ()) + ((2,) if kl_rows else ())
    fig = Figure(figsize=(11 + 4 * (len(ratios) - 2), 4.4), layout="constrained")
    axes = list(fig.subplots(1, len(ratios), width_ratios=ratios))
    loss_ax, success_ax = axes[:2]
    error_ax = axes[2] if errors else None
    kl_ax = axes[-1] if kl_rows else None
    students = [r["model"] for r in aggregate if r["model"] != "teacher"]
    colour = {name: _COLOURS[i % len(_COLOURS)] for i, name in enumerate(students)}
    colour["teacher"] = _TEACHER

    for name in students:
        runs = list(curves.get(name, {}).values())
        if not runs:
            continue
        steps, mean, low, high = _curve_band(runs)
        loss_ax.plot(steps, mean, color=colour[name], label=_label(name), linewidth=1.6)
        if len(runs) > 1:
            loss_ax.fill_between(steps, low, high, color=colour[name], alpha=0.2, linewidth=0)
    loss_ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    loss_ax.yaxis.set_major_formatter(plain)
    low, high = loss_ax.get_ylim()
    # Label the minor ticks only when the axis spans less than a decade (else they collide).
    loss_ax.yaxis.set_minor_formatter(plain if high < 10 * low else NullFormatter())
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("training loss (each student's own objective)")
    band = f"\nline: mean, band: range over {seeds} seeds" if seeds > 1 else ""
    loss_ax.set_title(f"student training loss{band}", fontsize=11)
    loss_ax.grid(True, which="major", alpha=0.3)
    if loss_ax.get_lines():
        loss_ax.legend(frameon=False)

    order = students + [r["model"] for r in aggregate if r["model"] == "teacher"]
    rows = {r["model"]: r for r in aggregate}
    x = list(range(len(order)))
    means = [100 * rows[name]["success_rate"] for name in order]
    spread = [100 * rows[name].get("success_sd", 0.0) for name in order]
    success_ax.bar(
        x,
        means,
        color=[colour[name] for name in order],
        alpha=0.85,
        yerr=spread if seeds > 1 else None,
        capsize=5,
        error_kw={"elinewidth": 1.2},
    )
    for i, name in enumerate(order):
        by_seed = [100 * v for v in rows[name].get("success_by_seed", [])]
        if len(by_seed) > 1:
            success_ax.scatter([i] * len(by_seed), by_seed, s=14, color="black", zorder=3)
        success_ax.annotate(
            f"{means[i]:.1f}%",
            (i, min(means[i] + spread[i], 100)),
            textcoords="offset points",
            xytext=(0, 4),
            ha="center",
            fontsize=9,
        )
    success_ax.set_xticks(x, [_TICKS.get(name, name) for name in order])
    success_ax.set_ylim(0, 110)
    success_ax.set_ylabel("held-out task success (%)")
    what = f"\nbar: mean ± sd over {seeds} seeds, dot: one seed" if seeds > 1 else " (one seed)"
    success_ax.set_title(f"held-out task success{what}", fontsize=11)
    success_ax.grid(True, axis="y", alpha=0.3)
    if errors:
        _draw_first_errors(error_ax, errors, summary)
    if kl_rows:
        _draw_span_kl(kl_ax, kl_rows, colour)
    fig.suptitle("kdcore demo: distilling a calculator agent")
    return fig


def _draw_first_errors(ax, rows: list[Mapping[str, Any]], summary: Mapping[str, Any]) -> None:
    """Stacked bars: per student, the share of held-out episodes (all seeds) whose
    first wrong token is of each kind."""
    kinds = [k for k in rows[0]["first_error"] if any(r["first_error"][k] for r in rows)]
    held_out = summary.get("config", {}).get("held_out") or 1
    x = list(range(len(rows)))
    bottom = [0.0] * len(rows)
    palette = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3")
    for j, kind in enumerate(kinds):
        share = [
            100 * r["first_error"][kind] / (held_out * max(1, len(r.get("success_by_seed", [1]))))
            for r in rows
        ]
        ax.bar(x, share, bottom=bottom, label=kind, color=palette[j % len(palette)])
        bottom = [b + s for b, s in zip(bottom, share, strict=True)]
    ax.set_xticks(x, [_TICKS.get(r["model"], r["model"]) for r in rows])
    ax.set_ylabel("failed held-out episodes (%)")
    ax.set_title("where failed episodes first go wrong\n(all seeds)", fontsize=11)
    ax.grid(True, axis="y", alpha=0.3)
    if kinds:
        ax.legend(frameon=False, fontsize=8)


def _has_span_kl(row: Mapping[str, Any]) -> bool:
    spans = row.get("spans") or {}
    return bool(spans) and all("teacher_kl" in v for v in spans.values())


def _draw_span_kl(ax, rows: list[Mapping[str, Any]], colour: Mapping[str, str]) -> None:
    """Grouped bars: per span, each student's mean KL from the teacher (nats per
    token, teacher-forced on the held-out problems' reference trajectories)."""
    spans = list(rows[0]["spans"])
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        x = [k + (i - (len(rows) - 1) / 2) * width for k in range(len(spans))]
        values = [r["spans"][span]["teacher_kl"] for span in spans]
        ax.bar(x, values, width, color=colour[r["model"]], label=_label(r["model"]), alpha=0.85)
    ax.set_xticks(range(len(spans)), spans)
    ax.set_ylabel("KL(teacher || student), nats per token")
    ax.set_title("how closely each student matches the teacher\n(held-out references)", fontsize=11)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(frameon=False, fontsize=8)


def write_demo_figure(path: str | Path, summary: Mapping[str, Any]) -> Path:
    """Draws :func:`draw_demo_figure` into a PNG at ``path``, replaced atomically."""
    fig = draw_demo_figure(summary)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    data = buffer.getvalue()
    atomic_write(path, lambda f: f.write(data))
    return Path(path)
