"""Output buffers of the CPU kernels that do not pay for fresh pages every call.

A new multi-megabyte CPU tensor is fresh mmap'd memory: the first write to each
4 KiB page traps into the kernel. On the machines we measured that is 20-35 ms
for a 64 MB gradient, several times the KL kernel's own time (8 ms). Two
remedies, both local to kdcore's own outputs:

- Recycling. Large outputs come from a small cache of buffers kdcore owns,
  lent out as tensors through ``torch.from_numpy`` of a fresh numpy view. A
  tensor's storage holds that view for as long as any tensor or view of it
  lives, in Python or inside autograd; a weak reference to the view learns
  when it is gone, and only then is the buffer lent again (see
  ``_BufferCache``): a training loop gets its gradient buffer back every
  step, already paged in.
  The cache keeps at most ``KDCORE_CPU_CACHE_MB`` (default 1024; 0 disables)
  of buffers; :func:`empty_cache` releases the idle ones.
- Huge-page advice on new buffers (where transparent huge pages are on, the
  first touch costs far fewer traps). Advice only: failure is harmless.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
import threading
import weakref

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


class _Slab:
    """One buffer of the cache and whether a tensor may still be using it."""

    __slots__ = ("array", "busy", "_offset", "_lease", "_watch", "__weakref__")

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.busy = False
        # Where the aligned part starts, found once (``ndarray.ctypes`` costs
        # about as much as a small kernel call).
        self._offset = (-array.ctypes.data) % _ALIGN
        self._lease = 0
        self._watch = None

    def lend(self, nbytes: int, dtype, shape) -> np.ndarray:
        """A 64-byte aligned view of ``nbytes`` as ``dtype`` of ``shape`` (``nbytes``
        of them); the slab is busy until that view object is garbage."""
        offset = self._offset
        view = self.array[offset : offset + nbytes].view(dtype).reshape(shape)
        self.busy = True
        self._lease += 1
        lease = self._lease
        # The callback only stores a flag (no lock): it may run inside any
        # allocation, on any thread, also while the cache's lock is held. It
        # refers to the slab weakly, so a dropped slab frees its memory at once.
        self._watch = weakref.ref(view, functools.partial(_returned, weakref.ref(self), lease))
        return view


def _returned(slab_ref, lease: int, _view_ref) -> None:
    slab = slab_ref()
    if slab is not None and slab._lease == lease:
        slab.busy = False


class _BufferCache:
    """Byte buffers owned by kdcore, lent out as numpy views and reused once
    the view lent last is garbage.

    ``torch.from_numpy(view)`` makes a storage that holds ``view`` for as long
    as the storage lives, that is while any tensor or view of the output
    lives (in Python, inside autograd, or in another thread). numpy views of
    a view point at the owning array, not at ``view``, and torch hands out
    ``.numpy()`` arrays that hold the tensor: so ``view`` dies exactly when
    the last user of its memory does, and its weak-reference callback marks
    the buffer idle. No reference counts are read.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self._slabs: list[_Slab] = []  # oldest first
        self._lock = threading.Lock()

    def cached_bytes(self) -> int:
        with self._lock:
            return sum(s.array.nbytes for s in self._slabs)

    def clear_idle(self) -> None:
        with self._lock:
            self._slabs = [s for s in self._slabs if s.busy]

    def take(self, nbytes: int, dtype=np.uint8, shape=-1) -> np.ndarray | None:
        """A 64-byte aligned ``dtype`` view of ``nbytes`` (of ``shape``) from an
        idle buffer (at most twice as large), or of a new one if the limit
        allows; else None."""
        with self._lock:
            best = None
            for slab in self._slabs:
                size = slab.array.nbytes - _ALIGN
                if nbytes <= size <= 2 * nbytes and not slab.busy:
                    if best is None or size < best.array.nbytes - _ALIGN:
                        best = slab
            if best is not None:
                return best.lend(nbytes, dtype, shape)
            if not self._make_room(nbytes + _ALIGN):
                return None
        # Allocated and advised outside the lock: both may release the GIL,
        # and a fork meanwhile must not find the lock held.
        slab = _Slab(np.empty(nbytes + _ALIGN, dtype=np.uint8))
        _advise_huge(slab.array.ctypes.data, slab.array.nbytes)
        with self._lock:
            view = slab.lend(nbytes, dtype, shape)
            if self._make_room(slab.array.nbytes):
                self._slabs.append(slab)
            return view  # (over the limit after a race: used once, not kept)

    def _make_room(self, need: int) -> bool:
        """Drops idle buffers, oldest first, until ``need`` more bytes fit."""
        if need > self.limit:
            return False
        total = sum(s.array.nbytes for s in self._slabs)
        kept = []
        for slab in self._slabs:
            if total + need > self.limit and not slab.busy:
                total -= slab.array.nbytes
            else:
                kept.append(slab)
        self._slabs = kept
        return total + need <= self.limit

    def _before_fork(self) -> None:
        self._lock.acquire()

    def _after_fork_in_parent(self) -> None:
        self._lock.release()

    def _after_fork_in_child(self) -> None:
        # The child has one thread: a fresh lock, and the buffers as they were.
        self._lock = threading.Lock()


_cache = _BufferCache(_limit_from_env())
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_cache._before_fork,
        after_in_parent=_cache._after_fork_in_parent,
        after_in_child=_cache._after_fork_in_child,
    )

_NUMPY_STORAGE = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.bfloat16: np.int16,
    torch.float16: np.int16,
}


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(x)`` (contiguous), from the buffer cache when large."""
    if x.is_cpu:
        nbytes = x.numel() * x.element_size()
        if nbytes >= _MIN_RECYCLE_BYTES:
            return _recycled(x.shape, x.dtype, nbytes)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def empty(shape, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``, from the buffer cache when
    large and on the CPU."""
    if torch.device(device).type == "cpu":
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if nbytes >= _MIN_RECYCLE_BYTES:
            return _recycled(shape, dtype, nbytes)
    return torch.empty(shape, dtype=dtype, device=device)


def _recycled(shape, dtype: torch.dtype, nbytes: int) -> torch.Tensor:
    """A CPU tensor from the buffer cache (a new, huge-page advised one when the
    cache cannot lend)."""
    storage = _NUMPY_STORAGE.get(dtype)
    if storage is not None:
        view = _cache.take(nbytes, storage, tuple(shape))
        if view is not None:
            # The storage holds `view` itself: its lifetime is the buffer's lease.
            # (Shaped by numpy: a torch view on top costs more than the loan.)
            out = torch.from_numpy(view)
            return out if storage is not np.int16 else out.view(dtype)
    out = torch.empty(shape, dtype=dtype)
    if nbytes >= _MIN_ADVISE_BYTES:
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
