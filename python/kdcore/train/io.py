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
    """Appends one JSON object per line and flushes it (a crash loses nothing written).

    With ``after_step=n``, an existing file is first cut back: records of
    steps ``> n`` (a run resumed from step ``n`` writes them again) and lines
    that are not JSON (one cut short by a crash) are appended to
    ``<path>.discarded`` rather than lost; other records stay. (The file is
    replaced, so another process still appending to it is not followed.)
    """

    def __init__(self, path: str | os.PathLike, *, after_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if after_step is not None and self.path.exists():
            _cut_back(self.path, after_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: dict[str, Any]) -> None:
        clean = {str(k): _jsonable(v) for k, v in record.items()}
        self._file.write(json.dumps(clean, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _keeps(line: str, last_step: int) -> bool:
    """A JSON line stays unless it is the record of a step after ``last_step``."""
    try:
        record = json.loads(line)
    except ValueError:
        return False
    step = record.get("step") if isinstance(record, dict) else None
    return not (isinstance(step, int) and step > last_step)


def _cut_back(path: Path, last_step: int) -> None:
    """Keeps the lines :func:`_keeps` keeps; the rest go to ``<path>.discarded``."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept, dropped = [], []
    for line in lines:
        (kept if _keeps(line, last_step) else dropped).append(line)
    if not dropped:
        return
    with open(path.with_name(path.name + ".discarded"), "a", encoding="utf-8") as f:
        f.writelines(x if x.endswith("\n") else x + "\n" for x in dropped)
    text = "".join(kept)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
