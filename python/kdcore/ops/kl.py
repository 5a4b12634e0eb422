"""KL distillation loss: the fused ``kdcore::kl_div`` op and ``kdcore.kl_loss``."""

from __future__ import annotations

import torch

from .. import _dispatch, _rust, _validate, _weights, reference
from ._grad import scale_rows


def _loss_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    f64 = torch.float64 in (student.dtype, teacher.dtype)
    return torch.float64 if f64 else torch.float32


@torch.library.custom_op("kdcore::kl_div", mutates_args=())
def kl_div_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: torch.Tensor,
    temperature: float,
    reverse: bool,
    grad_student: bool,
    grad_teacher: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row w_r · KL and the gradients of their sum, for 2-D logits.

    Returns ``(row_loss, grad_student, grad_teacher)``; a gradient that was not
    asked for is an empty tensor.
    """
    _dispatch.require_kernel("kdcore::kl_div", student, teacher)
    loss, gs, gt = _rust.kl_div(
        student, teacher, weight, temperature, reverse, grad_student, grad_teacher
    )
    # Distinct empty tensors: custom op outputs may not alias each other.
    gs = student.new_empty(0) if gs is None else gs
    gt = teacher.new_empty(0) if gt is None else gt
    return loss, gs, gt


@kl_div_op.register_fake
def _(student, teacher, weight, temperature, reverse, grad_student, grad_teacher):
    loss = student.new_empty(student.shape[0], dtype=_loss_dtype(student, teacher))
    gs = torch.empty_like(student, memory_format=torch.contiguous_format)
    gt = torch.empty_like(teacher, memory_format=torch.contiguous_format)
    return (
        loss,
        gs if grad_student else student.new_empty(0),
        gt if grad_teacher else teacher.new_empty(0),
    )


def _setup(ctx, inputs, output) -> None:
    ctx.grad_student, ctx.grad_teacher = inputs[5], inputs[6]
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(output[1], output[2])


def _backward(ctx, grad_loss, _grad_gs, _grad_gt):
    gs, gt = ctx.saved_tensors
    grad_s = scale_rows(gs, grad_loss) if ctx.grad_student else None
    grad_t = scale_rows(gt, grad_loss) if ctx.grad_teacher else None
    return grad_s, grad_t, None, None, None, None, None


kl_div_op.register_autograd(_backward, setup_context=_setup)


def _needs_grad(x: torch.Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


class _KLDivFunction(torch.autograd.Function):
    """Eager path of ``kdcore::kl_div``: the same kernel and backward, with
    less per-call overhead than the registered op's autograd wrapper (the
    registered op is what torch.compile traces)."""

    @staticmethod
    def forward(ctx, student, teacher, weight, temperature, reverse, reduce):
        grad_student, grad_teacher = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows, gs, gt = _rust.kl_div(
            student, teacher, weight, temperature, reverse, grad_student, grad_teacher
        )
        ctx.save_for_backward(gs, gt)
        return rows.sum() if reduce else rows

    @staticmethod
    def backward(ctx, grad_loss):
        gs, gt = ctx.saved_tensors
        grad_s = None if gs is None else scale_rows(gs, grad_loss)
        grad_t = None if gt is None else scale_rows(gt, grad_loss)
        return grad_s, grad_t, None, None, None, None


def weighted_kl_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: torch.Tensor,
    temperature: float,
    reverse: bool,
    *,
    reduce: bool,
) -> torch.Tensor:
    """The fused kernel on logits (..., V) with one weight per row.

    Returns Σ_r w_r·KL_r (``reduce``) or w_r·KL_r per row, shape (rows,);
    differentiable w.r.t. both logits. Rows with w_r = 0 are never read.
    The losses that build on the KL kernel (kl_loss, span_loss) call this.
    """
    vocab = student.shape[-1]
    s2, t2 = student.reshape(-1, vocab), teacher.reshape(-1, vocab)
    if not torch.compiler.is_compiling():
        return _KLDivFunction.apply(s2, t2, weight, temperature, reverse, reduce)
    rows, _, _ = kl_div_op(
        s2, t2, weight, temperature, reverse, _needs_grad(student), _needs_grad(teacher)
    )
    return rows.sum() if reduce else rows


def kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    reverse: bool = False,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = True,
) -> torch.Tensor:
    r"""Temperature-scaled KL distillation loss, fused (loss and gradient in one pass).

    With :math:`P_t = \mathrm{softmax}(z_t / T)` and :math:`P_s = \mathrm{softmax}(z_s / T)`
    over the last axis, each position (row) gets

    .. math:: D = \mathrm{KL}(P_t \,\|\, P_s) = \sum_j P_{t,j} (\log P_{t,j} - \log P_{s,j})

    (the true KL, without cross-entropy's teacher-entropy offset), or
    :math:`\mathrm{KL}(P_s \,\|\, P_t)` with ``reverse=True``. ``scale_t2=True``
    multiplies D by :math:`T^2` (Hinton et al. 2015) so gradients keep their
    size as T changes.

    Args:
        student_logits: shape (..., V), float32 / bfloat16 / float16 / float64.
        teacher_logits: same shape; its dtype may differ from the student's.
            Gets a gradient too if it requires grad.
        temperature: T > 0, finite.
        reverse: reverse KL, KL(P_s ‖ P_t) (MiniLLM).
        labels: integer tensor of shape (...); rows with ``labels == ignore_index``
            are masked. Only the mask is taken from labels.
        ignore_index: label value of masked rows.
        mask: shape (...); bool (False masks a row) or float (per-row weight).
        reduction: ``"mean"`` (Σ_r w_r D_r / Σ_r w_r — the number of valid rows
            for bool masks), ``"sum"``, ``"none"`` (w_r D_r of shape (...), 0 on
            masked rows); ``"batchmean"`` is ``"mean"``.
        scale_t2: multiply by T².

    Returns:
        float32 loss (float64 if an input is float64). If no row is valid the
        loss is 0 and gradients are 0. NaN in an unmasked row gives NaN, as in
        PyTorch; masked rows are never read.
    """
    student, teacher = _validate.logit_pair(student_logits, teacher_logits)
    t = _validate.temperature(temperature)
    red = _validate.reduction(reduction)
    if _dispatch.select(student, teacher) == "torch":
        lead = student.shape[:-1]
        if labels is not None:
            _validate.labels(labels, lead, student)
        if mask is not None:
            _validate.mask(mask, lead, student)
        wide = _dispatch.reference_dtype(student.device)
        loss = reference.kl_loss(
            student.to(wide),
            teacher.to(wide),
            temperature=t,
            reverse=bool(reverse),
            labels=labels,
            ignore_index=ignore_index,
            mask=mask,
            reduction=red,
            scale_t2=scale_t2,
        )
        return loss.to(_loss_dtype(student, teacher))
    weight = _weights.row_weights(
        student,
        labels=labels,
        ignore_index=ignore_index,
        mask=mask,
        reduction=red,
        scale=t * t if scale_t2 else 1.0,
    )
    loss = weighted_kl_rows(student, teacher, weight, t, bool(reverse), reduce=red != "none")
    return loss.reshape(student.shape[:-1]) if red == "none" else loss
