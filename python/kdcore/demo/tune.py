"""``kdcore demo --tune``: the learning rate of each objective, chosen on validation problems.

Each student trains at every rate of a grid with the demo's own budget,
trajectories and seeds, and acts on the validation problems (a stream
disjoint from the training problems and from the held-out problems the demo
reports). Per objective the rate with the highest mean validation success
wins (ties: the higher action-token accuracy). The chosen rates are what
:data:`kdcore.demo.students.LEARNING_RATES` holds; the held-out problems play
no part in the choice.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from .data import encode, held_out_problems, student_problems, validation_problems
from .pipeline import DemoConfig, _device, _say, _write_json, teacher_data
from .report import mean_sd
from .students import STUDENTS
from .task import oracle_trajectory
from .teacher import load_teacher
from .workers import StudentRun, train_students

#: The plateau found by a first, wider pass (1e-3 .. 1.6e-2 on one seed; see
#: docs/demo.md): too low leaves a student on the knife edge, too high diverges.
LR_GRID = (2e-3, 4e-3, 8e-3)
VALIDATION_PROBLEMS = 200


def run_tune(
    cfg: DemoConfig,
    *,
    grid: tuple[float, ...] = LR_GRID,
    validation: int = VALIDATION_PROBLEMS,
    students: tuple[str, ...] = tuple(STUDENTS),
) -> dict:
    """Trains each student at each rate of ``grid`` for ``cfg.seeds`` seeds and
    scores it on the validation problems; writes ``tune.json``; returns it."""
    started = time.perf_counter()
    device = _device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teacher, _ = load_teacher(cfg.teacher_path)
    teacher = teacher.to(device)
    problems = student_problems(cfg.student_problems)
    # Disjoint from the held-out problems the demo reports, whatever their count.
    val = validation_problems(validation, exclude=problems, held_out=max(cfg.held_out, 200))
    held = {p.question for p in held_out_problems(cfg.held_out, exclude=problems)}
    if held & {p.question for p in val}:
        raise RuntimeError("validation and held-out problems overlap")
    datasets = teacher_data(teacher, problems, cfg, device)
    references = encode([oracle_trajectory(p) for p in val])
    plan = [
        StudentRun(name, seed, lr, None, f"{name} lr {lr:g} seed {seed}")
        for name in students
        for lr in grid
        for seed in range(cfg.seed, cfg.seed + cfg.seeds)
    ]
    trained = train_students(
        plan,
        cfg=cfg,
        datasets=datasets,
        problems=val,
        references=references,
        teacher=None,
        device=device,
    )
    runs = [
        {
            "model": t.run.name,
            "lr": t.run.lr,
            "seed": t.run.seed,
            "validation_success": t.evaluation.success_rate,
            "action_token_accuracy": t.evaluation.action_token_accuracy,
            "reason_token_accuracy": t.evaluation.reason_token_accuracy,
        }
        for t in trained
    ]
    table, chosen = summarise(runs)
    print(format_tune(table, chosen))
    report = {
        "config": asdict(cfg),
        "grid": list(grid),
        "validation_problems": len(val),
        "runs": runs,
        "table": table,
        "chosen": chosen,
        "total_seconds": time.perf_counter() - started,
    }
    _write_json(out / "tune.json", report)
    _say(f"wrote {out / 'tune.json'} ({report['total_seconds']:.0f} s)")
    return report


def summarise(runs: list[dict]) -> tuple[list[dict], dict[str, float]]:
    """Mean and sd of validation success per (student, rate); the best rate per student."""
    table = []
    for name in dict.fromkeys(r["model"] for r in runs):
        for lr in dict.fromkeys(r["lr"] for r in runs if r["model"] == name):
            cell = [r for r in runs if r["model"] == name and r["lr"] == lr]
            mean, sd = mean_sd([r["validation_success"] for r in cell])
            act = sum(r["action_token_accuracy"] for r in cell) / len(cell)
            table.append({"model": name, "lr": lr, "success": mean, "sd": sd, "action": act})
    chosen = {}
    for name in dict.fromkeys(r["model"] for r in table):
        cells = [r for r in table if r["model"] == name]
        chosen[name] = max(cells, key=lambda r: (r["success"], r["action"]))["lr"]
    return table, chosen


def format_tune(table: list[dict], chosen: dict[str, float]) -> str:
    lines = [f"{'model':<9} {'lr':>7} {'val success':>11} {'sd':>5} {'act-tok':>7}"]
    for r in table:
        mark = "  <- chosen" if chosen.get(r["model"]) == r["lr"] else ""
        lines.append(
            f"{r['model']:<9} {r['lr']:>7g} {100 * r['success']:>10.1f}% {100 * r['sd']:>5.1f} "
            f"{100 * r['action']:>6.1f}%{mark}"
        )
    lines.append("chosen: " + json.dumps(chosen))
    return "\n".join(lines)
