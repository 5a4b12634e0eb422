"""The fused distillation op ``kdcore::distill`` and its eager twin.

One kernel call gives, per row r, w_r·D_r (a divergence at temperature T) and
c_r·CE_r (hard-label cross-entropy on the student at T = 1), and the gradient
of Σ_r (w_r·D_r + c_r·CE_r) w.r.t. the logits. Every loss of kdcore that has
a kernel (kl_loss, jsd_loss, tvd_loss, span_loss, distillation_loss) is this
op with its own row weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _dispatch, _modes
from ._grad import scale_rows

DIVERGENCES = ("kl", "reverse_kl", "tvd", "jsd")
OP = "kdcore::distill (kl_loss, jsd_loss, tvd_loss, span_loss, distillation_loss)"


def loss_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    f64 = torch.float64 in (student.dtype, teacher.dtype)
    return torch.float64 if f64 else torch.float32


def _run(student, teacher, weight, temperature, divergence, beta, labels, ce_weight, gs, gt):
    kernels = _dispatch.kernels("kdcore::distill", student, teacher)  # Rust or Triton
    div_rows, ce_rows, grad_s, grad_t = kernels.distill(
        student, teacher, weight, temperature, divergence, beta, labels, ce_weight, gs, gt
    )
    total = div_rows + ce_rows if ce_rows is not None else div_rows.clone()
    return total, div_rows, ce_rows, grad_s, grad_t


@torch.library.custom_op("kdcore::distill", mutates_args=())
def distill_op(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """2-D logits -> (total rows, divergence rows, CE rows, grad_student, grad_teacher).

    Only the first output is differentiable; outputs not asked for are empty.
    """
    total, div_rows, ce_rows, gs, gt = _run(
        student, teacher, weight, temperature, divergence, beta, labels, ce_weight,
        grad_student, grad_teacher,
    )  # fmt: skip
    # Distinct empty tensors: custom op outputs may not alias each other.
    return (
        total,
        div_rows,
        ce_rows if ce_rows is not None else div_rows.new_empty(0),
        gs if gs is not None else student.new_empty(0),
        gt if gt is not None else teacher.new_empty(0),
    )


@distill_op.register_fake
def _(student, teacher, weight, temperature, divergence, beta, labels, ce_weight, gs, gt):
    rows = student.new_empty(student.shape[0], dtype=torch.float32)
    return (
        rows,
        torch.empty_like(rows),
        torch.empty_like(rows) if labels is not None else rows.new_empty(0),
        torch.empty_like(student, memory_format=torch.contiguous_format)
        if gs
        else student.new_empty(0),
        torch.empty_like(teacher, memory_format=torch.contiguous_format)
        if gt
        else teacher.new_empty(0),
    )


def _setup(ctx, inputs, output) -> None:
    ctx.grad_student, ctx.grad_teacher = inputs[8], inputs[9]
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(output[3], output[4])


def _backward(ctx, grad_total, *_):
    gs, gt = ctx.saved_tensors
    # (No in-place scaling here: the saved gradients are also outputs of the op.)
    grad_s = scale_rows(gs, grad_total) if ctx.grad_student else None
    grad_t = scale_rows(gt, grad_total) if ctx.grad_teacher else None
    grad_s, grad_t = (_modes.first_order_only(g, OP) for g in (grad_s, grad_t))
    return grad_s, grad_t, None, None, None, None, None, None, None, None


distill_op.register_autograd(_backward, setup_context=_setup)


class _DistillFunction(torch.autograd.Function):
    """Eager path of ``kdcore::distill``: the same kernel call and backward,
    with less per-call overhead than the registered op's autograd wrapper."""

    @staticmethod
    def forward(ctx, student, teacher, weight, temperature, divergence, beta, labels, ce_w, reduce):
        total, div_rows, ce_rows, gs, gt = _run(
            student, teacher, weight, temperature, divergence, beta, labels, ce_w,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )  # fmt: skip
        ctx.save_for_backward(gs, gt)
        ce_rows = ce_rows if ce_rows is not None else div_rows.new_empty(0)
        ctx.mark_non_differentiable(div_rows, ce_rows)
        return (total.sum() if reduce else total), div_rows, ce_rows

    @staticmethod
    def backward(ctx, grad_total, *_):
        gs, gt = ctx.saved_tensors
        grad_s = None if gs is None else scale_rows(gs, grad_total, ctx, "student")
        grad_t = None if gt is None else scale_rows(gt, grad_total, ctx, "teacher")
        grad_s, grad_t = (_modes.first_order_only(g, OP) for g in (grad_s, grad_t))
        return grad_s, grad_t, None, None, None, None, None, None, None


@dataclass
class FusedResult:
    """The loss (summed or per row) and its two parts per row (detached)."""

    loss: torch.Tensor
    div_rows: torch.Tensor
    ce_rows: torch.Tensor | None


def _needs_grad(x: torch.Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


def fused_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: torch.Tensor,
    temperature: float,
    divergence: str,
    *,
    beta: float = 0.5,
    labels: torch.Tensor | None = None,
    ce_weight: torch.Tensor | None = None,
    reduce: bool,
) -> FusedResult:
    """The fused kernel on logits (..., V), one divergence weight (and CE weight) per row.

    ``loss`` is Σ_r (w_r·D_r + c_r·CE_r) (``reduce``) or the per-row values,
    differentiable w.r.t. both logits. Rows whose weights are all 0 are never read.
    """
    vocab = student.shape[-1]
    s2, t2 = student.reshape(-1, vocab), teacher.reshape(-1, vocab)
    labels = None if labels is None else labels.reshape(-1)
    if not _modes.registered_op(s2):
        loss, div_rows, ce_rows = _DistillFunction.apply(
            s2, t2, weight, temperature, divergence, beta, labels, ce_weight, reduce
        )
        return FusedResult(loss, div_rows, ce_rows if labels is not None else None)
    total, div_rows, ce_rows, _, _ = distill_op(
        s2, t2, weight, temperature, divergence, beta, labels, ce_weight,
        _needs_grad(student), _needs_grad(teacher),
    )  # fmt: skip
    return FusedResult(
        total.sum() if reduce else total, div_rows, ce_rows if labels is not None else None
    )
