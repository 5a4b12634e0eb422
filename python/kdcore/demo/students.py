"""The demo's three students: one objective each, trained the same way otherwise.

Every student of one seed starts from the same weights and sees the same
batches in the same order (the comparison is paired); only the objective and
its learning rate differ. The learning rates are chosen per objective on the
validation split (``kdcore demo --tune``), never on the held-out problems.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..spans import Span
from ..train import Distiller
from .data import loader
from .diagnostics import loss_scale
from .model import ModelConfig, TinyLM
from .numerics import flush_denormals
from .teacher import STUDENT_CONFIG, cosine_schedule

STUDENTS = {
    "sft": "hard-label CE on thought + action tokens",
    "token_kd": "KL on every token after the prompt",
    "span_kd": "span loss: KL per span (reason, action)",
}
#: Span-level KD's weights: kdcore's defaults. Reasoning and action spans are
#: each averaged over their own tokens, then summed; the prompt and the tool's
#: observations (text the agent never writes) are not learnt.
SPAN_KD_WEIGHTS = {Span.PROMPT: 0.0, Span.REASON: 1.0, Span.ACT: 1.0, Span.OBSERVATION: 0.0}
LOSS_MODE = {"sft": "sft", "token_kd": "token", "span_kd": "span"}

#: Peak learning rate per objective, chosen on the validation split by
#: ``kdcore demo --tune`` (its output is in docs/demo.md).
LEARNING_RATES = {"sft": 4e-3, "token_kd": 4e-3, "span_kd": 4e-3}
WARMUP_STEPS = 20


def train_student(
    name: str,
    *,
    lr: float,
    config: ModelConfig = STUDENT_CONFIG,
    steps: int,
    batch_size: int,
    temperature: float,
    seed: int,
    dataset,
    device,
    log_path: Path | None = None,
    description: str | None = None,
    progress: bool = True,
) -> tuple[TinyLM, dict]:
    """Trains student ``name`` for ``steps`` optimizer steps; returns it (eval
    mode) and the fit summary with its loss curve and initial loss scale."""
    torch.manual_seed(seed)  # the students of one seed start from the same weights
    student = TinyLM(config).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    if log_path is not None:
        log_path.unlink(missing_ok=True)
    distiller = Distiller(
        student,
        None,
        optimizer,
        loss=LOSS_MODE[name],
        span_weights=SPAN_KD_WEIGHTS if name == "span_kd" else None,
        temperature=temperature,
        alpha=0.0,
        max_grad_norm=1.0,
        scheduler=cosine_schedule(optimizer, steps, warmup=WARMUP_STEPS),
        log_path=log_path,
    )
    data = loader(dataset, batch_size, seed)
    # The loss and gradient the objective gives at the initial weights, on the
    # first batch of the seed's order (the same batch for every student).
    first = {k: v.to(device) for k, v in next(iter(loader(dataset, batch_size, seed))).items()}
    scale = loss_scale(student, distiller, first)
    epochs = -(-steps // len(data))
    with flush_denormals():
        summary = distiller.fit(
            data,
            epochs=epochs,
            max_steps=steps,
            description=description or name,
            progress=progress,
        )
    curve = []
    if log_path is not None:
        curve = [(r["step"], r["loss"]) for r in map(json.loads, log_path.read_text().splitlines())]
    return student.eval(), {**summary, "curve": curve, "initial": scale, "lr": lr}
