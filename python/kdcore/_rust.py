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


def kl_div(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: torch.Tensor,
    temperature: float,
    reverse: bool,
    grad_student: bool,
    grad_teacher: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    student, teacher = student.contiguous(), teacher.contiguous()
    if weight.dtype != torch.float32:
        weight = weight.to(torch.float32)
    loss = torch.empty(student.shape[0], dtype=torch.float32)
    gs = _memory.empty_like(student) if grad_student else None
    gt = _memory.empty_like(teacher) if grad_teacher else None
    # The kernel computes KL(P ‖ Q); forward KL has the teacher as P.
    (p, gp), (q, gq) = ((student, gs), (teacher, gt)) if reverse else ((teacher, gt), (student, gs))
    _native.kl_div(
        _view(p),
        _NAMES[p.dtype],
        _view(q),
        _NAMES[q.dtype],
        temperature,
        _view(weight.reshape(-1)),
        _view(loss),
        None if gp is None else _view(gp),
        None if gq is None else _view(gq),
    )
    return loss, gs, gt
