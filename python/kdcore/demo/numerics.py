"""Denormal floats off while the demo's models train and act.

Adam's moment estimates for the rows of tokens a model never sees (most of
the byte fallback and of the numbers) decay geometrically towards zero and
become denormal after a few hundred steps; on a CPU every operation on a
denormal is many times slower, and the run slowed by an order of magnitude.
Flushing them to zero changes no result that matters here (they are below
1e-38) and keeps each step's cost flat.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Flushes denormals to zero on this thread (CPU) inside the block, then
    restores torch's default (torch offers no way to read the previous mode)."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
