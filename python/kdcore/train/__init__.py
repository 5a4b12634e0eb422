"""kdcore.train: a thin training layer over kdcore's losses.

>>> distiller = Distiller(student, teacher, optimizer, loss="span", temperature=2.0)
>>> distiller.step(batch)             # inside your own loop
>>> distiller.fit(loader, epochs=1)   # or a loop with progress, JSONL log, checkpoints
"""

from __future__ import annotations

from .distiller import Distiller, TrainState, model_logits
from .io import CheckpointError, JsonlLog, atomic_save, load_checkpoint, verify_checkpoint
from .objective import MODES, Objective
from .offline import topk_logprobs

__all__ = [
    "MODES",
    "CheckpointError",
    "Distiller",
    "JsonlLog",
    "Objective",
    "TrainState",
    "atomic_save",
    "load_checkpoint",
    "model_logits",
    "topk_logprobs",
    "verify_checkpoint",
]
