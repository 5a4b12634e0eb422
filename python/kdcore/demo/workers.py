"""Trains and evaluates the demo's students side by side.

A student of this size trains faster on one thread than on two, so on a CPU
the students run in forked worker processes, one thread each, one worker per
CPU thread. A forked worker inherits the teacher's trajectories and logits
(nothing is pickled but the task and its result). Elsewhere (a GPU, or a
platform without ``fork``) they run one after another in this process.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._threads import set_num_threads
from .evaluate import Evaluation, evaluate
from .students import STUDENTS, train_student


@dataclass(frozen=True)
class StudentRun:
    """One student to train and evaluate."""

    name: str  # a key of STUDENTS
    seed: int
    lr: float
    log: Path | None  # its JSONL training log (None: none written)
    label: str  # how progress lines name it


@dataclass(frozen=True)
class Trained:
    run: StudentRun
    parameters: int
    evaluation: Evaluation
    fit: dict  # Distiller.fit's summary, the loss curve, the initial loss scale
    seconds: float  # training and evaluation


#: What the workers read: set before the pool forks, cleared after.
_SHARED: dict[str, Any] = {}


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def worker_count(requested: int, tasks: int, device: torch.device) -> int:
    """``requested`` workers (0: one per CPU thread), at most one per task; 1
    off the CPU or where processes cannot be forked."""
    if requested:
        wanted = requested
    elif device.type != "cpu" or "fork" not in multiprocessing.get_all_start_methods():
        wanted = 1
    else:
        wanted = max(1, torch.get_num_threads())
    return max(1, min(wanted, tasks))


def _train_and_evaluate(run: StudentRun) -> Trained:
    cfg, device = _SHARED["cfg"], _SHARED["device"]
    in_worker = multiprocessing.parent_process() is not None
    if in_worker:
        torch.set_num_threads(1)
        set_num_threads(1)
    _say(f"[{run.label}] {STUDENTS[run.name]}, lr {run.lr:g}, {cfg.steps} steps")
    t0 = time.perf_counter()
    model, fit = train_student(
        run.name,
        lr=run.lr,
        config=cfg.student,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        temperature=cfg.temperature,
        seed=run.seed,
        dataset=_SHARED["datasets"][run.name],
        device=device,
        log_path=run.log,
        description=run.label,
        progress=not in_worker,
    )
    result = evaluate(model, _SHARED["problems"], _SHARED["references"], teacher=_SHARED["teacher"])
    seconds = time.perf_counter() - t0
    _say(f"  {run.label}: {seconds:.1f} s, success {100 * result.success_rate:.1f}%")
    return Trained(run, model.num_parameters(), result, fit, seconds)


def train_students(
    runs: list[StudentRun],
    *,
    cfg,
    datasets: dict,
    problems: list,
    references: list,
    teacher: torch.nn.Module | None,
    device: torch.device,
) -> list[Trained]:
    """Trains every run and scores it on ``problems`` (and, given the teacher,
    its per-span KL from it on ``references``); results in the order of ``runs``."""
    workers = worker_count(cfg.workers, len(runs), device)
    _SHARED.update(cfg=cfg, datasets=datasets, problems=problems, references=references)
    _SHARED.update(teacher=teacher, device=device)
    try:
        if workers == 1:
            return [_train_and_evaluate(run) for run in runs]
        _say(f"training {len(runs)} students in {workers} worker processes (one thread each)")
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return pool.map(_train_and_evaluate, runs, chunksize=1)
    finally:
        _SHARED.clear()
