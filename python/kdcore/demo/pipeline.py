"""``kdcore demo``: distil a small calculator-using agent three ways and compare.

1. The teacher (shipped checkpoint) acts on the students' problems; its
   trajectories that solve the problem without a tool error are the training
   data, and its logits on them are computed once. Every student of every
   seed learns from these same trajectories.
2. Three students of the same size train for the same number of steps, for
   each seed from the same initial weights on the same batches in the same
   order (a paired comparison): hard-label SFT on the thought and action
   tokens; token-level KD (KL on every token after the prompt, tool
   observations included — what KD on the raw trajectory does); span-level
   KD (kdcore's span loss: KL on reasoning and action spans, each span type
   averaged over its own tokens, observations and prompt excluded). Each
   objective has its own learning rate, chosen on the validation split.
3. Every model — teacher included — acts on held-out problems (its actions
   executed by the calculator, observations fed back): task success rate,
   action- and reasoning-token accuracy and the KL from the teacher on the
   oracle trajectories, where each failed episode first goes wrong, training
   time.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .._extras import MissingExtraError
from .._files import atomic_write
from .._threads import get_num_threads, set_num_threads
from .data import (
    ALL_AFTER_PROMPT,
    TOKENIZER,
    TrajectoryDataset,
    encode,
    held_out_problems,
    student_problems,
    teacher_logits,
)
from .diagnostics import first_error, first_error_counts
from .evaluate import Evaluation, evaluate
from .model import ModelConfig, TinyLM
from .report import aggregate, format_seed_table, format_table, paired_gaps
from .rollout import run_agent
from .students import LEARNING_RATES, STUDENTS
from .task import oracle_trajectory
from .teacher import STUDENT_CONFIG, TeacherRecipe, load_teacher, train_teacher
from .workers import StudentRun, train_students

__all__ = ["STUDENTS", "DemoConfig", "aggregate", "format_table", "run_demo"]

ROLLOUT_BATCH = 256
#: The comparisons the demo reports seed by seed.
PAIRS = [("span_kd", "token_kd"), ("span_kd", "sft"), ("token_kd", "sft")]


@dataclass(frozen=True)
class DemoConfig:
    student_problems: int = 1000
    held_out: int = 200
    steps: int = 800
    batch_size: int = 16
    learning_rates: dict[str, float] = field(default_factory=lambda: dict(LEARNING_RATES))
    student: ModelConfig = STUDENT_CONFIG
    temperature: float = 1.0
    rollout_temperature: float = 1.0  # the teacher's sampling of the students' trajectories
    seed: int = 0
    seeds: int = 3  # students trained and evaluated for seeds seed, seed+1, ...
    workers: int = 0  # processes training the seeds side by side; 0: one per CPU thread
    out_dir: str = "kdcore-demo"
    teacher_path: str | None = None  # None: the shipped teacher
    device: str = "auto"

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A smoke-test size: well under a minute on two CPU cores."""
        return replace(cls(student_problems=128, held_out=32, steps=30), **overrides)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished workers."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def teacher_data(
    teacher: TinyLM, problems: list, cfg: DemoConfig, device: torch.device
) -> dict[str, TrajectoryDataset]:
    """The teacher acts on ``problems`` (sampling at ``cfg.rollout_temperature``,
    seeded by ``cfg.seed``); its clean successful trajectories become each
    student's dataset (the teacher's logits computed once, shared)."""
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    episodes = []
    for start in range(0, len(problems), ROLLOUT_BATCH):  # bounded KV cache per batch
        episodes += run_agent(
            teacher,
            problems[start : start + ROLLOUT_BATCH],
            tokenizer=TOKENIZER,
            temperature=cfg.rollout_temperature,
            generator=generator,
        )
    # Solved without a tool error: a malformed action is not something to imitate.
    kept = [e.text for e in episodes if e.success and not e.errors]
    if len(kept) < cfg.batch_size:
        raise RuntimeError(
            f"the teacher solved only {len(kept)} training problems without a tool error; "
            f"at least one batch ({cfg.batch_size}) is needed"
        )
    default_items = encode(kept)
    logits = teacher_logits(teacher, default_items, device=device)
    # Observations labelled: token-level KD learns them; the span loss weighs them 0.
    all_items = encode(kept, ALL_AFTER_PROMPT)
    return {
        "sft": TrajectoryDataset(default_items),
        "token_kd": TrajectoryDataset(all_items, logits),
        "span_kd": TrajectoryDataset(all_items, logits),
    }


def _row(name: str, parameters: int, result: Evaluation, seconds: float | None, what: str) -> dict:
    failed = [e for e in result.episodes if not e.success]
    return {
        "model": name,
        "objective": what,
        "parameters": parameters,
        "train_seconds": seconds,
        "success_rate": result.success_rate,
        "action_token_accuracy": result.action_token_accuracy,
        "reason_token_accuracy": result.reason_token_accuracy,
        "spans": result.spans,
        "mean_actions": result.mean_actions,
        "tool_errors": result.tool_errors,
        "first_error": first_error_counts(failed),
        "episodes": [
            {
                "question": e.problem.question,
                "answer": e.problem.answer,
                "text": e.text,
                "success": e.success,
                "first_error": first_error(e),
            }
            for e in result.episodes
        ],
    }


def run_demo(cfg: DemoConfig, *, threads: int | None = None) -> dict[str, Any]:
    """Runs the whole demo; returns the summary that is also written as JSON."""
    started = time.perf_counter()
    cpu_started = _cpu_seconds()
    if threads is not None:
        set_num_threads(threads)
        torch.set_num_threads(threads)
    device = _device(cfg.device)
    out = Path(cfg.out_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}

    def phase(name: str, t0: float) -> None:
        phases[name] = time.perf_counter() - t0
        _say(f"  {name}: {phases[name]:.1f} s")

    t0 = time.perf_counter()
    teacher, meta = load_teacher(cfg.teacher_path)
    teacher = teacher.to(device)
    problems = student_problems(cfg.student_problems)
    test = held_out_problems(cfg.held_out, exclude=problems)
    _say(
        f"[teacher] ({teacher.num_parameters() / 1e3:.0f}k parameters) acts on "
        f"{len(problems)} training problems"
    )
    datasets = teacher_data(teacher, problems, cfg, device)
    kept = len(datasets["sft"])
    phase("teacher trajectories + logits", t0)
    _say(f"      kept {kept}/{len(problems)} successful teacher trajectories")

    references = encode([oracle_trajectory(p) for p in test])
    t0 = time.perf_counter()
    rows = [
        _row(
            "teacher",
            teacher.num_parameters(),
            evaluate(teacher, test, references),
            None,
            "SFT on oracle trajectories (shipped)",
        )
    ]
    phase("teacher on held-out problems", t0)
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    curves: dict[str, dict[str, list]] = {}
    initial: dict[str, dict[str, dict]] = {}
    runs = [
        StudentRun(
            name,
            seed,
            cfg.learning_rates[name],
            out / "logs" / (f"{name}.jsonl" if cfg.seeds == 1 else f"{name}_seed{seed}.jsonl"),
            f"student {i}/3, seed {seed}: {name}",
        )
        for seed in seeds
        for i, name in enumerate(STUDENTS, start=1)
    ]
    trained = train_students(
        runs,
        cfg=cfg,
        datasets=datasets,
        problems=test,
        references=references,
        teacher=teacher,
        device=device,
    )
    for t in trained:  # in the order of runs: seed by seed
        name, seed = t.run.name, t.run.seed
        row = _row(name, t.parameters, t.evaluation, t.fit["seconds"], STUDENTS[name])
        row.update(seed=seed, lr=t.run.lr, initial_loss_scale=t.fit["initial"])
        rows.append(row)
        curves.setdefault(name, {})[str(seed)] = t.fit["curve"]
        initial.setdefault(name, {})[str(seed)] = t.fit["initial"]
        phases[f"train + evaluate {name} (seed {seed})"] = t.seconds

    agg = aggregate(rows)
    gaps = paired_gaps(rows, PAIRS) if cfg.seeds > 1 else []
    print(format_table(rows) if cfg.seeds == 1 else format_seed_table(agg, gaps))
    summary = {
        "config": asdict(cfg),
        "teacher": {
            "meta": meta,
            "training_trajectories": kept,
            "training_problems": len(problems),
        },
        "rows": rows,
        "aggregate": agg,
        "paired_gaps": gaps,
        "initial_loss_scale": initial,
        "curves_by_seed": curves,
        "phases_seconds": phases,
        "total_seconds": time.perf_counter() - started,
        "cpu_seconds": _cpu_seconds() - cpu_started,
        "environment": {
            "kdcore": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": str(device),
            "threads": get_num_threads(),
            "torch_threads": torch.get_num_threads(),
        },
    }
    _write_json(out / "summary.json", summary)
    figure = _write_figure(out / "demo.png", summary, out / "summary.json")
    _say(
        f"wrote {out / 'summary.json'}{figure} and logs/ ({summary['total_seconds']:.0f} s in all, "
        f"{summary['cpu_seconds']:.0f} s of CPU time)"
    )
    return summary


def _write_figure(path: Path, summary: dict, summary_path: Path) -> str:
    """Writes the figure if matplotlib is installed; says how to get it otherwise."""
    from .plot import write_demo_figure

    try:
        write_demo_figure(path, summary)
    except MissingExtraError:
        path.unlink(missing_ok=True)  # a figure left by an earlier run would not match
        _say(
            f'no figure: matplotlib is not installed (pip install "kdcore[plot]", '
            f"then `kdcore plot {summary_path}` draws it)"
        )
        return ""
    return f", {path}"


def _write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, default=str) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def retrain_teacher(steps: int, save_to: str, *, progress: bool = True) -> None:
    """``kdcore demo --train-teacher``: rebuilds the shipped teacher checkpoint."""
    from .teacher import save_teacher

    recipe = TeacherRecipe(steps=steps)
    _say(f"training the demo teacher for {steps} steps (SFT on oracle trajectories)")
    model = train_teacher(recipe, progress=progress)
    save_teacher(model, save_to, recipe)
    test = held_out_problems(200)
    result = evaluate(model, test, encode([oracle_trajectory(p) for p in test]))
    _say(
        f"wrote {save_to}: held-out success {100 * result.success_rate:.1f}%, "
        f"action-token accuracy {100 * result.action_token_accuracy:.1f}%"
    )
