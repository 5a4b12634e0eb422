"""Calls into the Rust kernels: tensors in, tensors out.

Tensors are made contiguous and handed over as numpy views (16-bit floats as
int16 views): no copies of logits, outputs allocated here and filled in place.
"""

from __future__ import annotations

import torch

from . import _memory, _native

_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _view(t: torch.Tensor):
    t = t.detach()
    return t.numpy() if t.dtype == torch.float32 else t.view(torch.int16).numpy()


def softmax(x: torch.Tensor, temperature: float, log: bool) -> torch.Tensor:
    x = x.contiguous()
    out = _memory.empty_like(x)
    _native.softmax(_view(x), _view(out), _NAMES[x.dtype], temperature, log)
    return out


def softmax_backward(
    grad: torch.Tensor, y: torch.Tensor, temperature: float, log: bool
) -> torch.Tensor:
    y = y.contiguous()
    grad = grad.to(y.dtype).contiguous()
    grad_x = _memory.empty_like(y)
    _native.softmax_backward(
        _view(y), _view(grad), _view(grad_x), _NAMES[y.dtype], temperature, log
    )
    return grad_x


def distill(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: torch.Tensor,
    temperature: float,
    divergence: str,
    beta: float,
    labels: torch.Tensor | None,
    ce_weight: torch.Tensor | None,
    grad_student: bool,
    grad_teacher: bool,
    *,
    grad_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Per-row weighted divergence (and CE), plus gradients of their sum.

    Returns ``(div_rows, ce_rows or None, grad_student or None, grad_teacher or None)``;
    ``grad_dtype`` (default: the student's) is the student gradient's dtype
    (the kernel writes the student's dtype; another one is a rounded copy).
    """
    student, teacher = student.contiguous(), teacher.contiguous()
    rows = student.shape[0]
    if weight.dtype != torch.float32:
        weight = weight.to(torch.float32)
    loss = torch.empty(rows, dtype=torch.float32)
    ce_loss = None
    hard = {}
    if labels is not None:
        ce_loss = torch.empty(rows, dtype=torch.float32)
        hard = {
            "labels": labels.to(torch.int64).contiguous().numpy(),
            "ce_weight": ce_weight.to(torch.float32).contiguous().numpy(),
            "ce_loss": ce_loss.numpy(),
        }
    gs = _memory.empty_like(student) if grad_student else None
    gt = _memory.empty_like(teacher) if grad_teacher else None
    _native.distill(
        _view(student),
        _NAMES[student.dtype],
        _view(teacher),
        _NAMES[teacher.dtype],
        divergence,
        beta,
        temperature,
        _view(weight.contiguous()),
        _view(loss),
        grad_student=None if gs is None else _view(gs),
        grad_teacher=None if gt is None else _view(gt),
        **hard,
    )
    if gs is not None and grad_dtype is not None and grad_dtype != gs.dtype:
        gs = gs.to(grad_dtype)
    return loss, ce_loss, gs, gt


def sparse_kl(
    student: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    weight: torch.Tensor,
    temperature: float,
    teacher_temperature: float,
    tail: str,
    grad_student: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row weighted sparse-teacher KL and, on request, the student gradient."""
    student = student.contiguous()
    loss = torch.empty(student.shape[0], dtype=torch.float32)
    grad = _memory.empty_like(student) if grad_student else None
    _native.sparse_kl(
        _view(student),
        _NAMES[student.dtype],
        teacher_ids.to(torch.int64).contiguous().numpy(),
        teacher_logprobs.detach().to(torch.float32).contiguous().numpy(),
        teacher_temperature,
        temperature,
        tail,
        _view(weight.to(torch.float32).contiguous()),
        _view(loss),
        None if grad is None else _view(grad),
    )
    return loss, grad
