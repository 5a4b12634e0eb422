"""The one place that decides which backend runs an op.

Per call: the Rust kernels for CPU tensors of float32 / bfloat16 / float16,
the Triton kernels for CUDA tensors of those dtypes (when triton is
installed), the pure-PyTorch reference (``kdcore.reference``, differentiable
by autograd) for everything else: float64, devices without a kernel, CUDA
without triton. ``KDCORE_BACKEND=auto|rust|triton|torch`` overrides the
choice; a forced kernel backend still falls back to the reference for
tensors it cannot take. ``triton`` also takes CPU tensors (the Triton CPU
interpreter, ``TRITON_INTERPRET=1``: how the tests run the GPU kernels).

The public functions ask :func:`route` once per call: the reference, the
registered op, or the backend object (``_rust.BACKEND`` / ``_triton.BACKEND``,
see ``_backend.KernelBackend``) whose kernels run; an op talks to that object
only. The registered ``torch.library`` ops run kernels only
(:func:`kernels_for`) and refuse other tensors. Nothing here imports triton.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import warnings
from collections.abc import Iterator

import torch

from . import _modes
from ._backend import KernelBackend

BACKENDS = ("auto", "rust", "triton", "torch")
#: The settings under which CPU tensors of kernel dtypes run the Rust kernels.
_RUST_ON_CPU = ("auto", "rust")
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


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def _require_triton(why: str = "KDCORE_BACKEND=triton") -> None:
    if not triton_available():
        raise RuntimeError(
            f"{why} needs the Triton kernels, but triton is not installed in this "
            "environment: install triton (the CUDA builds of torch on Linux x86_64 bring it) "
            "or set KDCORE_BACKEND=torch to run the reference implementation."
        )


_warned: set[str] = set()


class FallbackWarning(UserWarning):
    """An op ran the slow reference implementation where a kernel should have run."""


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside kdcore, so the warning names the
    user's line whichever public function or module led here."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _warn_fallback(cause: str, fix: str) -> None:
    """Warns once per process and cause (not once per call: ops run every step)."""
    if cause in _warned:
        return
    _warned.add(cause)
    warnings.warn(
        f"kdcore: {cause}, so kdcore runs its float64 PyTorch reference instead of a fused "
        f"kernel: correct, but orders of magnitude slower and far more memory. {fix} "
        "(This warning is shown once per process.)",
        FallbackWarning,
        stacklevel=_caller_stacklevel(),
    )


def select(*tensors: torch.Tensor) -> str:
    """``"rust"``, ``"triton"`` or ``"torch"`` for an op over ``tensors``.

    Falling back to the reference where a kernel should run (CUDA tensors
    without triton, or with ``KDCORE_BACKEND=rust``) warns once per process.
    """
    return _select(tensors, {t.device.type for t in tensors})


def _select(tensors: tuple[torch.Tensor, ...], devices: set[str]) -> str:
    if _forced == "torch":
        return "torch"
    dtypes_ok = all(t.dtype in KERNEL_DTYPES for t in tensors)
    if _forced == "triton":
        _require_triton()
        return "triton" if dtypes_ok and devices <= {"cpu", "cuda"} else "torch"
    if dtypes_ok and devices == {"cpu"}:
        return "rust"
    if dtypes_ok and devices == {"cuda"}:
        if _forced == "rust":
            _warn_fallback(
                "KDCORE_BACKEND=rust is set and the tensors are on CUDA",
                "Unset KDCORE_BACKEND (or set it to auto) to run the Triton kernels.",
            )
            return "torch"
        if triton_available():
            return "triton"
        _warn_fallback(
            "the tensors are on CUDA but triton is not installed",
            "Install triton (the CUDA builds of torch on Linux bring it: pip install triton).",
        )
    return "torch"


def kernel_backend(op: str, *tensors: torch.Tensor) -> str:
    """The kernel backend of a registered op: ``"rust"`` for CPU tensors
    (``"triton"`` when ``KDCORE_BACKEND=triton``), ``"triton"`` for CUDA tensors.
    Raises ``TypeError`` for other tensors and ``RuntimeError`` when triton
    is needed but not installed."""
    for t in tensors:
        if t.device.type not in ("cpu", "cuda") or t.dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"{op} runs on CPU tensors (Rust) or CUDA tensors (Triton) of float32, "
                f"bfloat16 or float16; got {t.dtype} on {t.device}. Call the public kdcore "
                "function, which falls back to the reference implementation for such tensors."
            )
    if tensors and tensors[0].device.type == "cuda":
        _require_triton(f"{op} on CUDA tensors")
        return "triton"
    if _forced == "triton":
        _require_triton()
        return "triton"
    return "rust"


def kernels_for(op: str, *tensors: torch.Tensor) -> KernelBackend:
    """The backend object (``_rust.BACKEND`` or ``_triton.BACKEND``) that runs the
    registered op ``op`` on ``tensors``; see :func:`kernel_backend`."""
    return _backend_object(kernel_backend(op, *tensors))


_objects: dict[str, KernelBackend] = {}


def _backend_object(name: str) -> KernelBackend:
    """``_rust.BACKEND`` or ``_triton.BACKEND``, imported on first use."""
    found = _objects.get(name)
    if found is None:
        if name == "triton":
            from ._triton import BACKEND as found
        else:
            from ._rust import BACKEND as found
        _objects[name] = found
    return found


class RegisteredOp:
    """:func:`route`'s answer for calls that go through the registered ``torch.library``
    op: under torch.compile (which traces it) and for meta tensors (its fake kernel).
    The op picks its kernel backend when it runs (:func:`kernels_for`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "REGISTERED"


REGISTERED = RegisteredOp()

#: A public op's route: the reference (None), the registered op, or a kernel backend.
Route = KernelBackend | RegisteredOp | None


def backend_name(*tensors: torch.Tensor) -> str:
    """The decision by name: ``"torch"`` (the reference) under a torch.func transform
    (it cannot see through the kernels), ``"meta"`` for meta tensors (the registered
    ops' fake kernels), else :func:`select`."""
    if _modes.functorch_active(*tensors):
        return "torch"
    devices = {t.device.type for t in tensors}
    if "meta" in devices:
        return "meta"
    return _select(tensors, devices)


def _plain_cpu(tensors: tuple[torch.Tensor, ...]) -> bool:
    """The common eager case, checked cheaply: CPU tensors of kernel dtypes, no
    torch.func transform, not compiling (then :func:`backend_name` is ``"rust"``
    under ``KDCORE_BACKEND=auto|rust``)."""
    functorch = _modes._functorch
    if functorch is None:
        return False  # (a torch without torch.func: the general path decides)
    if torch.compiler.is_compiling() or functorch.maybe_current_level() is not None:
        return False
    for t in tensors:
        if not t.is_cpu or t.dtype not in KERNEL_DTYPES or functorch.is_functorch_wrapped_tensor(t):
            return False
    return True


def route(*tensors: torch.Tensor) -> Route:
    """Where a public op over ``tensors`` runs, decided once per call:

    - ``None``: the pure-PyTorch reference (:func:`backend_name` is ``"torch"``);
    - :data:`REGISTERED`: the registered ``torch.library`` op (meta tensors,
      and every kernel call under torch.compile);
    - else the :class:`~kdcore._backend.KernelBackend` whose kernels run eagerly.
    """
    if _forced in _RUST_ON_CPU and _plain_cpu(tensors):  # (the same answer, sooner)
        return _objects.get("rust") or _backend_object("rust")
    name = backend_name(*tensors)
    if name == "torch":
        return None
    if name == "meta" or torch.compiler.is_compiling():
        return REGISTERED
    return _backend_object(name)


def reference_dtype(device: torch.device) -> torch.dtype:
    """The dtype the reference fallback computes in: float64 where the device
    has it, so the fallback meets the kernels' tolerances (see docs)."""
    return torch.float32 if device.type == "mps" else torch.float64
