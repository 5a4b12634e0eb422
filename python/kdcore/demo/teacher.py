"""The demo's teacher: shipped as a small checkpoint, reproducible by one command.

``kdcore demo --train-teacher --save-teacher PATH`` trains it from the oracle
trajectories of the teacher's problem stream with hard-label SFT (through
:class:`kdcore.train.Distiller`, ``loss="sft"``) and writes the checkpoint
the package ships (``kdcore/demo/teacher.pt``, fp16 weights).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..train import Distiller, atomic_save, load_checkpoint
from .data import TrajectoryDataset, encode, loader, teacher_problems
from .model import ModelConfig, TinyLM
from .numerics import flush_denormals
from .task import oracle_trajectory

TEACHER_CONFIG = ModelConfig(d_model=128, n_layers=4, n_heads=4)
STUDENT_CONFIG = ModelConfig(d_model=64, n_layers=2, n_heads=4)
SHIPPED = "teacher.pt"


@dataclass(frozen=True)
class TeacherRecipe:
    steps: int = 2500
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 50):
    """Linear warm-up, then cosine decay to 10% of the peak rate."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_teacher(recipe: TeacherRecipe, *, progress: bool = True, log_path=None) -> TinyLM:
    """Hard-label SFT of the teacher on oracle trajectories (deterministic given the seed)."""
    torch.manual_seed(recipe.seed)
    model = TinyLM(TEACHER_CONFIG)
    items = encode([oracle_trajectory(p) for p in teacher_problems()])
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    distiller = Distiller(
        model,
        None,
        optimizer,
        loss="sft",
        max_grad_norm=1.0,
        scheduler=cosine_schedule(optimizer, recipe.steps),
        log_path=log_path,
    )
    data = loader(TrajectoryDataset(items), recipe.batch_size, recipe.seed)
    epochs = math.ceil(recipe.steps / len(data))
    with flush_denormals():
        distiller.fit(
            data, epochs=epochs, max_steps=recipe.steps, progress=progress, description="teacher"
        )
    return model.eval()


def save_teacher(model: TinyLM, path: str | os.PathLike, recipe: TeacherRecipe) -> None:
    state = {k: v.half() for k, v in model.state_dict().items()}
    meta = {
        "config": model.cfg.to_dict(),
        "recipe": recipe.__dict__,
        "created": time.time(),
        "command": f"kdcore demo --train-teacher --teacher-steps {recipe.steps} "
        f"--save-teacher {Path(path).name}",
    }
    atomic_save({"state": state, "meta": meta}, path)


def load_teacher(path: str | os.PathLike | None = None) -> tuple[TinyLM, dict]:
    """The shipped teacher (or the checkpoint at ``path``) in fp32, eval mode."""
    if path is None:
        ref = resources.files("kdcore.demo").joinpath(SHIPPED)
        with resources.as_file(ref) as shipped:
            if not shipped.exists():
                raise FileNotFoundError(
                    f"the shipped teacher {shipped} is missing; rebuild it with "
                    "`kdcore demo --train-teacher --save-teacher teacher.pt`"
                )
            blob = load_checkpoint(shipped, map_location="cpu")
    else:
        blob = load_checkpoint(path, map_location="cpu")
    cfg = ModelConfig(**blob["meta"]["config"])
    model = TinyLM(cfg)
    model.load_state_dict({k: v.float() for k, v in blob["state"].items()})
    return model.eval(), blob["meta"]
