"""Atomic checkpoint files and the JSONL training log."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from .._files import atomic_write


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same directory, then rename:
    a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | os.PathLike, map_location=None) -> dict:
    """Loads a checkpoint written by :func:`atomic_save` (tensors and plain data only)."""
    # Optimizer and RNG states are plain containers of tensors and numbers.
    return torch.load(path, map_location=map_location, weights_only=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


class JsonlLog:
    """Appends one JSON object per line and flushes it (a crash loses nothing written)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: dict[str, Any]) -> None:
        clean = {str(k): _jsonable(v) for k, v in record.items()}
        self._file.write(json.dumps(clean, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
