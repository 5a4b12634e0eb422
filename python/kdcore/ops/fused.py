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
from .._backend import DIVERGENCES, DistillArgs, KernelBackend
from ._kernel_op import kernel_op, scale_saved

__all__ = ["DIVERGENCES", "FusedResult", "distill_op", "fused_rows", "loss_dtype"]

OP = "kdcore::distill (kl_loss, jsd_loss, tvd_loss, span_loss, distillation_loss)"


def loss_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    f64 = student.dtype is torch.float64 or teacher.dtype is torch.float64
    return torch.float64 if f64 else torch.float32


def _absent(student, teacher, *_) -> tuple:
    """The registered op's outputs in place of those not computed: distinct empty
    tensors (custom op outputs may not alias each other)."""
    ce_rows = student.new_empty(0, dtype=torch.float32)
    return None, None, ce_rows, student.new_empty(0), teacher.new_empty(0)


@kernel_op(
    "kdcore::distill",
    dispatch_on=("student", "teacher"),
    differentiable=("student", "teacher"),
    absent=_absent,
)
def DISTILL(
    kernels: KernelBackend,
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

    Only the first output is differentiable; outputs not asked for are empty
    (None in the eager twin).
    """
    args = DistillArgs(
        student,
        teacher,
        weight,
        temperature,
        divergence,
        beta,
        labels,
        ce_weight,
        grad_student,
        grad_teacher,
    )
    div_rows, ce_rows, gs, gt = kernels.distill(args)
    # div_rows itself without a CE term: kernel_op copies it where outputs must differ.
    total = div_rows + ce_rows if ce_rows is not None else div_rows
    return total, div_rows, ce_rows, gs, gt


distill_op = DISTILL.op


@DISTILL.register_fake
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
    if ctx.kernels is None:  # (the eager twin returns only the first output)
        ctx.mark_non_differentiable(*[out for out in output[1:] if out is not None])
    ctx.save_for_backward(output[3], output[4])


def _backward(ctx, grad_total, *_):
    gs, gt = ctx.saved_tensors
    grad_s = scale_saved(ctx, gs, grad_total, "student") if ctx.grad_student else None
    grad_t = scale_saved(ctx, gt, grad_total, "teacher") if ctx.grad_teacher else None
    return _modes.first_order_only(grad_s, OP), _modes.first_order_only(grad_t, OP)


DISTILL.register_autograd(_backward, setup_context=_setup)


@dataclass
class FusedResult:
    """The loss (summed or per row) and its two parts per row (detached)."""

    loss: torch.Tensor
    div_rows: torch.Tensor
    ce_rows: torch.Tensor | None


def fused_rows(
    route: _dispatch.Route,
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
    """The fused kernel on logits (..., V), one divergence weight (and CE weight) per row,
    run where ``route`` (``_dispatch.route``, not the reference) says.

    ``loss`` is Σ_r (w_r·D_r + c_r·CE_r) (``reduce``) or the per-row values,
    differentiable w.r.t. both logits. Rows whose weights are all 0 are never read.
    """
    vocab = student.shape[-1]
    # (2-D logits as they are: a reshape to the same shape still costs a view)
    s2 = student if student.dim() == 2 else student.reshape(-1, vocab)
    t2 = teacher if teacher.dim() == 2 else teacher.reshape(-1, vocab)
    if labels is not None and labels.dim() != 1:
        labels = labels.reshape(-1)
    grad_on = torch.is_grad_enabled()
    loss, div_rows, ce_rows, _, _ = DISTILL(
        route,
        s2,
        t2,
        weight,
        temperature,
        divergence,
        beta,
        labels,
        ce_weight,
        grad_on and student.requires_grad,
        grad_on and teacher.requires_grad,
        reduce_first=reduce,
    )
    return FusedResult(loss, div_rows, ce_rows if labels is not None else None)
