"""Output buffers of the CPU kernels that do not pay for fresh pages every call.

A new multi-megabyte CPU tensor is fresh mmap'd memory: the first write to each
4 KiB page traps into the kernel. On the machines we measured that is 20-35 ms
for a 64 MB gradient, several times the KL kernel's own time (8 ms). Two
remedies, both local to kdcore's own outputs:

- Recycling. Large outputs come from a small cache of buffers kdcore owns
  (numpy arrays, handed out as tensors through ``torch.from_numpy``). A tensor's
  storage holds a reference to its array for as long as any tensor or view of
  it lives, in Python or inside autograd, so an array whose reference count
  is back to the cache's own is provably unused and is handed out again: a
  training loop gets its gradient buffer back every step, already paged in.
  The cache keeps at most ``KDCORE_CPU_CACHE_MB`` (default 1024; 0 disables)
  of buffers; :func:`empty_cache` releases the idle ones.
- Huge-page advice on new buffers (where transparent huge pages are on, the
  first touch costs far fewer traps). Advice only: failure is harmless.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading

import numpy as np
import torch

_MADV_HUGEPAGE = 14
_HUGE = 2 << 20
_MIN_ADVISE_BYTES = 8 << 20
#: Smaller outputs come from malloc's own reused heap: not worth recycling.
_MIN_RECYCLE_BYTES = 1 << 20
_ALIGN = 64
_DEFAULT_LIMIT_MB = 1024


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _load_madvise()


def _advise_huge(start: int, nbytes: int) -> None:
    if _madvise is None or nbytes < _MIN_ADVISE_BYTES:
        return
    first = (start + _HUGE - 1) // _HUGE * _HUGE
    last = (start + nbytes) // _HUGE * _HUGE
    if last > first:
        _madvise(first, last - first, _MADV_HUGEPAGE)  # advice only: failure is harmless


def _limit_from_env() -> int:
    raw = os.environ.get("KDCORE_CPU_CACHE_MB", "").strip()
    if not raw:
        return _DEFAULT_LIMIT_MB << 20
    try:
        mb = int(raw)
    except ValueError:
        raise ValueError(f"KDCORE_CPU_CACHE_MB must be an integer (MiB), got {raw!r}") from None
    if mb < 0:
        raise ValueError(f"KDCORE_CPU_CACHE_MB must be >= 0, got {mb}")
    return mb << 20


class _BufferCache:
    """Byte buffers owned by kdcore, reused once nothing else references them."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self._arrays: list[np.ndarray] = []  # oldest first
        self._lock = threading.Lock()

    @staticmethod
    def _idle(arr: np.ndarray) -> bool:
        # Every tensor storage made from the array (and so every tensor or
        # view of it, also inside autograd) holds a numpy view of it, one more
        # reference than the cache's own (calibrated below, same call shape).
        return _refs(arr) <= _IDLE_REFS

    def cached_bytes(self) -> int:
        with self._lock:
            return sum(a.nbytes for a in self._arrays)

    def clear_idle(self) -> None:
        with self._lock:
            self._arrays = [a for a in self._arrays if not self._idle(a)]

    def take(self, nbytes: int) -> np.ndarray | None:
        """A 64-byte aligned uint8 view of ``nbytes`` from an idle buffer (at
        most twice as large), or of a new one if the limit allows; else None."""
        with self._lock:
            best = None
            for arr in self._arrays:
                size = arr.nbytes - _ALIGN
                if nbytes <= size <= 2 * nbytes and self._idle(arr):
                    if best is None or size < best.nbytes - _ALIGN:
                        best = arr
            if best is None:
                best = self._new(nbytes)
                if best is None:
                    return None
            offset = (-best.ctypes.data) % _ALIGN
            return best[offset : offset + nbytes]

    def _new(self, nbytes: int) -> np.ndarray | None:
        need = nbytes + _ALIGN
        if need > self.limit:
            return None
        total = sum(a.nbytes for a in self._arrays)
        # Make room by dropping idle buffers, oldest first.
        kept = []
        for arr in self._arrays:
            if total + need > self.limit and self._idle(arr):
                total -= arr.nbytes
            else:
                kept.append(arr)
        self._arrays = kept
        if total + need > self.limit:
            return None
        arr = np.empty(need, dtype=np.uint8)
        _advise_huge(arr.ctypes.data, need)
        self._arrays.append(arr)
        return arr


def _refs(arr: np.ndarray) -> int:
    return sys.getrefcount(arr)


def _calibrate() -> int:
    # The references an idle array has when `_idle` looks at it: the cache's
    # list, the caller's loop variable, `_idle`'s and `_refs`' arguments.
    def idle_refs(arr):
        return _refs(arr)

    for arr in [np.empty(1, dtype=np.uint8)]:
        return idle_refs(arr)
    raise AssertionError("unreachable")


_IDLE_REFS = _calibrate()
_cache = _BufferCache(_limit_from_env())

_NUMPY_STORAGE = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.bfloat16: np.int16,
    torch.float16: np.int16,
}


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(x)`` (contiguous), from the buffer cache when large."""
    nbytes = x.numel() * x.element_size()
    if x.device.type == "cpu" and nbytes >= _MIN_RECYCLE_BYTES and x.dtype in _NUMPY_STORAGE:
        view = _cache.take(nbytes)
        if view is not None:
            flat = torch.from_numpy(view.view(_NUMPY_STORAGE[x.dtype]))
            return flat.view(x.dtype).view(x.shape)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if out.device.type == "cpu":
        _advise_huge(out.data_ptr(), nbytes)
    return out


def empty_cache() -> None:
    """Releases the CPU output buffers kdcore keeps for reuse that nothing uses now.

    kdcore keeps up to ``KDCORE_CPU_CACHE_MB`` MiB (default 1024, 0 turns the
    cache off) of large kernel outputs (gradients, softmax outputs) for reuse,
    because the first touch of fresh pages costs more than the kernels. Buffers
    still referenced by a tensor stay until that tensor is gone.
    """
    _cache.clear_idle()


def cached_bytes() -> int:
    """Bytes of CPU output buffers kdcore holds for reuse (idle or in use)."""
    return _cache.cached_bytes()
