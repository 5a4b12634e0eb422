"""Distillation from a sparse (top-k) teacher: ``kdcore.sparse_kl_loss``."""

from __future__ import annotations

import math

import torch

from .. import _dispatch, _modes, _topk, _validate, _weights, reference
from .._backend import TAILS, KernelBackend, SparseKLArgs
from ._kernel_op import kernel_op, scale_saved

__all__ = ["TAILS", "sparse_kl_loss", "sparse_kl_op"]

OP = "kdcore::sparse_kl (sparse_kl_loss)"


@kernel_op(
    "kdcore::sparse_kl",
    dispatch_on=("student",),
    differentiable=("student",),
    absent=lambda student, *_: (None, student.new_empty(0)),
)
def SPARSE_KL(
    kernels: KernelBackend,
    student: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    weight: torch.Tensor,
    temperature: float,
    teacher_temperature: float,
    tail: str,
    grad_student: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D student logits -> (weighted rows, gradient or an empty tensor (None in the twin))."""
    args = SparseKLArgs(
        student,
        teacher_ids,
        teacher_logprobs,
        weight,
        temperature,
        teacher_temperature,
        tail,
        grad_student,
    )
    return kernels.sparse_kl(args)


sparse_kl_op = SPARSE_KL.op


@SPARSE_KL.register_fake
def _(student, teacher_ids, teacher_logprobs, weight, temperature, t0, tail, grad_student):
    rows = student.new_empty(student.shape[0], dtype=torch.float32)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    return rows, grad if grad_student else student.new_empty(0)


def _setup(ctx, inputs, output) -> None:
    ctx.grad_student = inputs[7]
    if output[1] is not None:
        ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_rows, *_):
    (grad,) = ctx.saved_tensors
    grad_s = scale_saved(ctx, grad, grad_rows, "student") if ctx.grad_student else None
    return (_modes.first_order_only(grad_s, OP),)


SPARSE_KL.register_autograd(_backward, setup_context=_setup)


def _unread_rows_neutral(ids, logprobs, weight, vocab: int):
    """Rows of weight 0 get in-range ids and finite log-probs: the reference indexes
    every row (an id out of range would raise there, a NaN would reach the gradient)."""
    read = (weight != 0).reshape(ids.shape[:-1])[..., None]
    k = ids.shape[-1]
    neutral_ids = torch.arange(k, device=ids.device).remainder(vocab).to(ids.dtype)
    neutral_lps = torch.full((), -math.log(k + 1), dtype=logprobs.dtype, device=logprobs.device)
    return torch.where(read, ids, neutral_ids), torch.where(read, logprobs, neutral_lps)


def sparse_kl_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    tail: str = "bucket",
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = True,
) -> torch.Tensor:
    r"""KL distillation from a sparse teacher: its top-k ids and log-probs per position.

    The teacher is given as ``teacher_ids`` (..., k) and ``teacher_logprobs``
    (..., k) — log-probabilities at ``teacher_temperature`` (what vLLM's
    prompt_logprobs or a stored cache holds); the student as full logits
    (..., V). Per position, with :math:`Q = \mathrm{softmax}(z_s / T)`:

    - ``tail="bucket"``: one extra category — the teacher's missing mass
      :math:`1 - \sum_i p_i` against the student's mass outside the k ids;
      :math:`\sum_c p_c (\log p_c - \log Q_c)` over k + 1 categories.
    - ``"renormalize"``: the teacher's top-k renormalised to sum to 1.
    - ``"zero"``: the top-k probabilities as given; the missing mass is dropped.

    Re-tempering: the stored distribution (k ids plus the tail as one category)
    is raised to the power ``teacher_temperature / temperature`` and
    renormalised — exact for the k ids relative to each other, an
    approximation for the tail. The gradient w.r.t. the full student logits is
    exact for this loss, computed with one pass of exponentials over the
    vocabulary. ``scale_t2``, masking and ``reduction`` as in :func:`kdcore.kl_loss`.

    Errors: ids outside [0, V) or repeated within a position, positive
    log-probabilities (above 1e-5; smaller ones are clamped to 0), top-k
    masses summing above 1, k = 0, shapes that disagree.
    """
    student = _validate.logits("student_logits", student_logits)
    t = _validate.temperature(temperature)
    t0 = _validate.temperature(teacher_temperature)
    red = _validate.reduction(reduction)
    _validate.tail(tail)
    lead = student.shape[:-1]
    if labels is not None:
        labels = _validate.labels(labels, lead, student)
    if mask is not None:
        _validate.mask(mask, lead, student)
    scale = t * t if scale_t2 else 1.0
    weight = _weights.masked_row_weights(
        student, labels=labels, ignore_index=ignore_index, mask=mask, reduction=red, scale=scale
    )
    active = None if labels is None and mask is None else (weight != 0).reshape(lead)
    logprobs = _validate.topk_teacher(teacher_ids, teacher_logprobs, student, active)
    k, vocab = teacher_ids.shape[-1], student.shape[-1]
    s2, ids, lps = student.reshape(-1, vocab), teacher_ids.reshape(-1, k), logprobs.reshape(-1, k)
    route = _dispatch.route(student)
    if _modes.inspectable(student, ids, lps):  # rows of weight 0 are never read, so never checked
        active = weight.reshape(-1) != 0
        if route is None:  # the kernels check these rows themselves
            _topk.check_rows(ids, lps, active, vocab)
        _validate.topk_renormalizable(lps, active, tail)
    if route is None:
        wide = _dispatch.reference_dtype(student.device)
        teacher_ids, logprobs = _unread_rows_neutral(teacher_ids, logprobs, weight, vocab)
        loss = reference.sparse_kl_loss(
            student.to(wide),
            teacher_ids,
            logprobs.to(wide),
            temperature=t,
            teacher_temperature=t0,
            tail=tail,
            labels=labels,
            ignore_index=ignore_index,
            mask=mask,
            reduction=red,
            scale_t2=scale_t2,
        )
        return loss.to(torch.float64 if student.dtype == torch.float64 else torch.float32)
    wants_grad = student.requires_grad and torch.is_grad_enabled()
    loss, _ = SPARSE_KL(
        route, s2, ids, lps, weight, t, t0, tail, wants_grad, reduce_first=red != "none"
    )
    return loss.reshape(lead) if red == "none" else loss
