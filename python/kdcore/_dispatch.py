"""The one place that decides which backend runs an op.

Per call: the Rust kernels for CPU tensors of float32 / bfloat16 / float16,
the pure-PyTorch reference (``kdcore.reference``, differentiable by autograd)
for everything else: float64, devices without a kernel.
``KDCORE_BACKEND=auto|rust|triton|torch`` overrides the choice; a forced
kernel backend still falls back to the reference for tensors it cannot take.

The public functions call :func:`select` first; the registered
``torch.library`` ops run kernels only and refuse other tensors.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "rust", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _parse(value: str) -> str:
    name = value.strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"KDCORE_BACKEND must be one of {', '.join(BACKENDS)}; got {value!r}")
    return name


_forced = _parse(os.environ.get("KDCORE_BACKEND", "auto"))


def current() -> str:
    """The backend setting in force (``auto`` unless overridden)."""
    return _forced


def set_backend(name: str) -> None:
    """Overrides ``KDCORE_BACKEND`` for this process."""
    global _forced
    _forced = _parse(name)


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend` (restores the old setting)."""
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def select(*tensors: torch.Tensor) -> str:
    """``"rust"`` or ``"torch"`` for an op over ``tensors``."""
    if _forced == "torch":
        return "torch"
    if _forced == "triton":
        raise NotImplementedError(
            "KDCORE_BACKEND=triton: the Triton kernels are not part of this version yet"
        )
    kernel_ok = all(t.device.type == "cpu" and t.dtype in KERNEL_DTYPES for t in tensors)
    return "rust" if kernel_ok else "torch"


def require_kernel(op: str, *tensors: torch.Tensor) -> None:
    """Raises a clear error when a kernel op is called on tensors it cannot take."""
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"{op} runs on CPU tensors of float32, bfloat16 or float16; got {t.dtype} on "
                f"{t.device}. Call the public kdcore function, which falls back to the "
                "reference implementation for such tensors."
            )


def reference_dtype(device: torch.device) -> torch.dtype:
    """The dtype the reference fallback computes in: float64 where the device
    has it, so the fallback meets the kernels' tolerances (see docs)."""
    return torch.float32 if device.type == "mps" else torch.float64
