"""Calls into the Rust kernels: tensors in, tensors out (``BACKEND``, a
:class:`kdcore._backend.KernelBackend`).

Tensors are made contiguous and handed over as DLPack capsules
(:func:`_capsule`): no copies of logits, outputs allocated here and filled in
place. A capsule costs a fraction of a numpy view per argument, which is most
of a small call's cost outside the kernel; it holds a reference to the
tensor, and the binding only reads it (never consumes it). The hard-label
and sparse-teacher arrays still go as numpy views (:func:`_borrow`).

The numpy views are borrowed (:class:`_Borrowed`), not made with
``Tensor.numpy()``, which marks a storage non-resizable for good (a later
``resize_`` fails).
"""

from __future__ import annotations

import numpy as np
import torch

from . import _memory, _native
from ._backend import DistillArgs, DistillResult, SparseKLArgs
from .ops._grad import scale_rows

_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_TYPESTR = {
    torch.float32: np.dtype(np.float32).str,
    torch.int16: np.dtype(np.int16).str,
    torch.int64: np.dtype(np.int64).str,
}


class _Borrowed:
    """A contiguous tensor's memory as numpy sees it (``np.asarray``).

    The array keeps this object alive, and it keeps the tensor's storage
    object: the memory stays allocated for the whole kernel call even if the
    caller's tensors are dropped or re-pointed (``set_``, ``.data =``)
    meanwhile. The native call holds the GIL, so no Python thread can move
    the storage (``share_memory_``) under the kernel.
    """

    __slots__ = ("__array_interface__", "_storage")


def _borrow(t: torch.Tensor) -> np.ndarray:
    typestr = _TYPESTR.get(t.dtype)
    if typestr is None:  # bfloat16 / float16: the kernels reinterpret the bits
        t = t.detach().view(torch.int16)
        typestr = _TYPESTR[torch.int16]
    if not t.is_contiguous():
        raise ValueError("kdcore: internal error, a kernel argument is not contiguous")
    if t.numel() == 0:
        return np.empty(tuple(t.shape), dtype=typestr)
    held = _Borrowed()
    held._storage = t.untyped_storage()
    held.__array_interface__ = {
        "shape": tuple(t.shape),
        "typestr": typestr,
        "data": (t.data_ptr(), False),
        "version": 3,
    }
    return np.asarray(held)


_to_dlpack = torch.utils.dlpack.to_dlpack


def _capsule(t: torch.Tensor):
    """A contiguous CPU tensor as a DLPack capsule (any kernel dtype; the binding
    checks the element type against the dtype name it is given)."""
    if not t.is_contiguous():
        raise ValueError("kdcore: internal error, a kernel argument is not contiguous")
    return _to_dlpack(t)


class RustBackend:
    """The Rust kernels (``kdcore._native``) on CPU tensors: the :class:`KernelBackend`
    of CPU calls. The native binding checks every argument (ValueError / TypeError)."""

    name = "rust"

    def softmax(self, x: torch.Tensor, temperature: float, log: bool) -> torch.Tensor:
        x = x.contiguous()
        out = _memory.empty_like(x)
        _native.softmax(_capsule(x), _capsule(out), _NAMES[x.dtype], temperature, log)
        return out

    def softmax_backward(
        self, grad: torch.Tensor, y: torch.Tensor, temperature: float, log: bool
    ) -> torch.Tensor:
        y = y.contiguous()
        grad = grad.to(y.dtype).contiguous()
        grad_x = _memory.empty_like(y)
        _native.softmax_backward(
            _capsule(y), _capsule(grad), _capsule(grad_x), _NAMES[y.dtype], temperature, log
        )
        return grad_x

    def distill(self, args: DistillArgs) -> DistillResult:
        """The kernel writes the student gradient in the student's dtype; another
        ``grad_dtype`` is a rounded copy."""
        student, teacher = args.student.contiguous(), args.teacher.contiguous()
        rows = student.shape[0]
        weight = args.weight
        if weight.dtype != torch.float32:
            weight = weight.to(torch.float32)
        # Row outputs made by numpy and shared with torch: no view to borrow.
        loss_rows = np.empty(rows, dtype=np.float32)
        ce_loss = labels = ce_weight = ce_rows = None
        if args.labels is not None:
            ce_rows = np.empty(rows, dtype=np.float32)
            ce_loss = torch.from_numpy(ce_rows)
            labels = _borrow(args.labels.to(torch.int64).contiguous())
            ce_weight = _borrow(args.ce_weight.to(torch.float32).contiguous())
        gs = _memory.empty_like(student) if args.grad_student else None
        gt = _memory.empty_like(teacher) if args.grad_teacher else None
        # (all positional: keywords cost a name lookup each in the binding)
        _native.distill(
            _capsule(student),
            _NAMES[student.dtype],
            _capsule(teacher),
            _NAMES[teacher.dtype],
            args.divergence,
            args.beta,
            args.temperature,
            _capsule(weight.contiguous()),
            loss_rows,
            labels,
            ce_weight,
            ce_rows,
            None if gs is None else _capsule(gs),
            None if gt is None else _capsule(gt),
        )
        grad_dtype = args.grad_dtype
        if gs is not None and grad_dtype is not None and grad_dtype != gs.dtype:
            gs = gs.to(grad_dtype)
        return DistillResult(torch.from_numpy(loss_rows), ce_loss, gs, gt)

    def sparse_kl(self, args: SparseKLArgs) -> tuple[torch.Tensor, torch.Tensor | None]:
        student = args.student.contiguous()
        loss = torch.empty(student.shape[0], dtype=torch.float32)
        grad = _memory.empty_like(student) if args.grad_student else None
        _native.sparse_kl(
            _capsule(student),
            _NAMES[student.dtype],
            _borrow(args.teacher_ids.to(torch.int64).contiguous()),
            _borrow(args.teacher_logprobs.detach().to(torch.float32).contiguous()),
            args.teacher_temperature,
            args.temperature,
            args.tail,
            _borrow(args.weight.to(torch.float32).contiguous()),
            _borrow(loss),
            None if grad is None else _capsule(grad),
        )
        return loss, grad

    def scale_grad(
        self, saved: torch.Tensor, grad_out: torch.Tensor, owner: object, key: str
    ) -> torch.Tensor:
        return scale_rows(saved, grad_out)


BACKEND = RustBackend()
