"""kdcore's own CPU thread pool (separate from torch's and rayon's global pools)."""

from __future__ import annotations

from . import _native


def set_num_threads(n: int) -> None:
    """Sets the number of threads kdcore's CPU kernels use.

    Defaults to ``KDCORE_NUM_THREADS`` if set, else the CPUs this process may
    run on. Safe after ``fork``: a child process builds its own pool.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _native.set_num_threads(n)


def get_num_threads() -> int:
    """The number of threads kdcore's CPU kernels use."""
    return _native.get_num_threads()
