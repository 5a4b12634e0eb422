"""``kdcore demo``: distil a small calculator-using agent three ways and compare.

1. The teacher (shipped checkpoint) acts on the students' problems; its
   successful trajectories are the training data, and its logits on them are
   computed once.
2. Three students of the same size and initial weights train for the same
   number of steps on the same batches: hard-label SFT on the thought and
   action tokens; token-level KD (KL on every token after the prompt, tool
   observations included — what KD on the raw trajectory does); span-level
   KD (kdcore's span loss: KL on reasoning and action spans, each span type
   averaged over its own tokens, observations and prompt excluded).
3. Every model — teacher included — acts on held-out problems (its actions
   executed by the calculator, observations fed back): task success rate,
   action-token accuracy on the oracle trajectories, training time.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .._extras import MissingExtraError
from .._files import atomic_write
from .._threads import get_num_threads, set_num_threads
from ..train import Distiller
from .data import (
    ALL_AFTER_PROMPT,
    TOKENIZER,
    TrajectoryDataset,
    encode,
    held_out_problems,
    loader,
    student_problems,
    teacher_logits,
)
from .evaluate import Evaluation, evaluate
from .model import TinyLM
from .rollout import run_agent
from .task import oracle_trajectory
from .teacher import STUDENT_CONFIG, TeacherRecipe, cosine_schedule, load_teacher, train_teacher

ROLLOUT_BATCH = 256
STUDENTS = {
    "sft": "hard-label CE on thought + action tokens",
    "token_kd": "KL on every token after the prompt",
    "span_kd": "span loss: KL per span (reason, action)",
}


@dataclass(frozen=True)
class DemoConfig:
    student_problems: int = 1000
    held_out: int = 200
    steps: int = 800
    batch_size: int = 16
    lr: float = 3e-3
    temperature: float = 1.0
    rollout_temperature: float = 1.0  # the teacher samples the students' trajectories
    seed: int = 0
    seeds: int = 1  # students trained and evaluated for seeds seed, seed+1, ...
    out_dir: str = "kdcore-demo"
    teacher_path: str | None = None  # None: the shipped teacher
    device: str = "auto"

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A smoke-test size: well under a minute on two CPU cores."""
        return replace(cls(student_problems=160, held_out=40, steps=40), **overrides)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _train_student(
    name: str, cfg: DemoConfig, seed: int, dataset, out: Path, device
) -> tuple[TinyLM, dict]:
    torch.manual_seed(seed)  # the students of one seed start from the same weights
    student = TinyLM(STUDENT_CONFIG).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.01)
    loss = {"sft": "sft", "token_kd": "token", "span_kd": "span"}[name]
    log = out / "logs" / (f"{name}.jsonl" if cfg.seeds == 1 else f"{name}_seed{seed}.jsonl")
    log.unlink(missing_ok=True)
    distiller = Distiller(
        student,
        None,
        optimizer,
        loss=loss,
        temperature=cfg.temperature,
        alpha=0.0,
        max_grad_norm=1.0,
        scheduler=cosine_schedule(optimizer, cfg.steps, warmup=20),
        log_path=log,
    )
    data = loader(dataset, cfg.batch_size, seed)
    epochs = -(-cfg.steps // len(data))
    label = name if cfg.seeds == 1 else f"{name} seed {seed}"
    summary = distiller.fit(data, epochs=epochs, max_steps=cfg.steps, description=label)
    curve = [(r["step"], r["loss"]) for r in map(json.loads, log.read_text().splitlines())]
    return student.eval(), {**summary, "curve": curve}


def _row(name: str, model: TinyLM, result: Evaluation, seconds: float | None, what: str) -> dict:
    return {
        "model": name,
        "objective": what,
        "parameters": model.num_parameters(),
        "train_seconds": seconds,
        "success_rate": result.success_rate,
        "action_token_accuracy": result.action_token_accuracy,
        "mean_actions": result.mean_actions,
        "tool_errors": result.tool_errors,
        "episodes": [
            {
                "question": e.problem.question,
                "answer": e.problem.answer,
                "text": e.text,
                "success": e.success,
            }
            for e in result.episodes
        ],
    }


def format_table(rows: list[dict]) -> str:
    head = f"{'model':<9} {'params':>7}  {'objective':<42} {'train s':>7} {'success':>8} "
    head += f"{'act-tok acc':>11} {'actions':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        secs = "-" if r["train_seconds"] is None else f"{r['train_seconds']:.1f}"
        lines.append(
            f"{r['model']:<9} {r['parameters'] / 1e3:>6.0f}k  {r['objective']:<42} {secs:>7} "
            f"{100 * r['success_rate']:>7.1f}% {100 * r['action_token_accuracy']:>10.1f}% "
            f"{r['mean_actions']:>7.2f}"
        )
    return "\n".join(lines)


def aggregate(rows: list[dict]) -> list[dict]:
    """Per model over seeds: mean and spread of success, mean of the rest."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        runs = [r for r in rows if r["model"] == name]
        rates = [r["success_rate"] for r in runs]
        mean = sum(rates) / len(rates)
        sd = (sum((x - mean) ** 2 for x in rates) / max(1, len(rates) - 1)) ** 0.5
        secs = [r["train_seconds"] for r in runs if r["train_seconds"] is not None]
        out.append(
            {
                "model": name,
                "objective": runs[0]["objective"],
                "parameters": runs[0]["parameters"],
                "seeds": [r.get("seed") for r in runs],
                "success_rate": mean,
                "success_sd": sd,
                "success_by_seed": rates,
                "action_token_accuracy": sum(r["action_token_accuracy"] for r in runs) / len(runs),
                "mean_actions": sum(r["mean_actions"] for r in runs) / len(runs),
                "train_seconds": sum(secs) / len(secs) if secs else None,
            }
        )
    return out


def format_seed_table(agg: list[dict]) -> str:
    lines = [format_table(agg), "", "success by seed:"]
    for r in agg:
        values = " ".join(f"{100 * x:5.1f}%" for x in r["success_by_seed"])
        lines.append(f"  {r['model']:<9} {values}   (sd {100 * r['success_sd']:.1f})")
    return "\n".join(lines)


def run_demo(cfg: DemoConfig, *, threads: int | None = None) -> dict[str, Any]:
    """Runs the whole demo; returns the summary that is also written as JSON."""
    started = time.perf_counter()
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
    kept = [e.text for e in episodes if e.success]
    if len(kept) < cfg.batch_size:
        raise RuntimeError(f"the teacher solved only {len(kept)} training problems")
    default_items = encode(kept)
    all_items = encode(kept, ALL_AFTER_PROMPT)
    logits = teacher_logits(teacher, default_items, device=device)
    phase("teacher trajectories + logits", t0)
    _say(f"      kept {len(kept)}/{len(problems)} successful teacher trajectories")

    datasets = {
        "sft": TrajectoryDataset(default_items),
        "token_kd": TrajectoryDataset(all_items, logits),
        "span_kd": TrajectoryDataset(default_items, logits),
    }
    references = encode([oracle_trajectory(p) for p in test])
    t0 = time.perf_counter()
    rows = [
        _row(
            "teacher",
            teacher,
            evaluate(teacher, test, references),
            None,
            "SFT on oracle trajectories (shipped)",
        )
    ]
    phase("teacher on held-out problems", t0)
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    curves: dict[str, dict[str, list]] = {}
    for seed in seeds:
        for i, name in enumerate(STUDENTS, start=1):
            _say(f"[student {i}/3, seed {seed}] {name}: {STUDENTS[name]}, {cfg.steps} steps")
            t0 = time.perf_counter()
            model, trained = _train_student(name, cfg, seed, datasets[name], out, device)
            curves.setdefault(name, {})[str(seed)] = trained["curve"]
            row = _row(
                name, model, evaluate(model, test, references), trained["seconds"], STUDENTS[name]
            )
            rows.append({**row, "seed": seed})
            phase(f"train + evaluate {name} (seed {seed})", t0)

    agg = aggregate(rows)
    print(format_table(rows) if cfg.seeds == 1 else format_seed_table(agg))
    summary = {
        "config": asdict(cfg),
        "teacher": {
            "meta": meta,
            "training_trajectories": len(kept),
            "training_problems": len(problems),
        },
        "rows": rows,
        "aggregate": agg,
        "curves_by_seed": curves,
        "phases_seconds": phases,
        "total_seconds": time.perf_counter() - started,
        "environment": {
            "kdcore": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": str(device),
            "threads": get_num_threads(),
        },
    }
    _write_json(out / "summary.json", summary)
    figure = _write_figure(out / "demo.png", summary, out / "summary.json")
    _say(
        f"wrote {out / 'summary.json'}{figure} and logs/ ({summary['total_seconds']:.0f} s in all)"
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
