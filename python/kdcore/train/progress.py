"""The Distiller's view of one optimizer step: the records of its micro-batches
summed into one log record, and the progress bar."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from . import distributed as dist


class StepWindow:
    """Averages the micro-batch records of one optimizer step."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.start = time.perf_counter()
        self.last_loss = float("nan")

    def add(self, record: dict) -> None:
        self.records.append(record)

    def flush(
        self, scale: float = 1.0, timeout_s: float = dist.DEFAULT_TIMEOUT_S
    ) -> dict[str, Any]:
        """The step's record: the micro-batches' shares summed (times ``scale``)
        and, under a process group, summed over ranks (every rank calls it)."""
        skip = ("stepped", "step", "tokens")
        keys = list(dict.fromkeys(k for r in self.records for k in r if k not in skip))
        # A span component is NaN in a micro-batch of a step without that span:
        # the sum is over the micro-batches that have it (NaN only if none has).
        values = [_sum_of_present([r.get(k, math.nan) for r in self.records]) * scale for k in keys]
        values.append(float(sum(r["tokens"] for r in self.records)))
        summed = torch.tensor(values, dtype=torch.float64)
        summed = dist.all_reduce_sum(summed, "the step's log record", timeout_s).tolist()
        now = time.perf_counter()
        out: dict[str, Any] = dict(zip(keys, summed[:-1], strict=True))
        tokens = int(summed[-1])
        out["tokens"] = tokens
        out["tokens_per_s"] = tokens / max(now - self.start, 1e-9)
        self.last_loss = out["loss"]
        self.records, self.start = [], now
        return out


def _sum_of_present(values: list[float]) -> float:
    present = [v for v in values if not math.isnan(v)]
    return sum(present) if present else float("nan")


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(
    total: int | None, initial: int, description: str, enabled: bool, *, unit: str = "step"
):
    """A tqdm bar, or a bar that draws nothing when ``enabled`` is false."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=description,
        unit=unit,
        dynamic_ncols=True,
        mininterval=0.5,
    )
