"""Divergence losses between teacher and student: ``kl_loss``, ``jsd_loss``, ``tvd_loss``."""

from __future__ import annotations

import torch

from .. import _dispatch, _validate, _weights, reference
from .fused import fused_rows, loss_dtype


def kernel_divergence(divergence: str, beta: float) -> str:
    """JSD(0) and JSD(1) are the forward and reverse KL (the GKD / TRL convention)."""
    if divergence == "jsd" and beta == 0.0:
        return "kl"
    if divergence == "jsd" and beta == 1.0:
        return "reverse_kl"
    return divergence


def divergence_loss(
    student_logits,
    teacher_logits,
    divergence,
    beta,
    temperature,
    labels,
    ignore_index,
    mask,
    reduction,
    scale_t2,
) -> torch.Tensor:
    """Shared body of the divergence losses: validate, dispatch, weight rows, run.

    (Positional parameters and no work the common call does not need: at small
    shapes this body costs about as much as the kernel.)"""
    student, teacher = _validate.logit_pair(student_logits, teacher_logits)
    t = _validate.temperature(temperature)
    red = _validate.reduction(reduction)
    if labels is not None:
        labels = _validate.labels(labels, student.shape[:-1], student)
    if mask is not None:
        _validate.mask(mask, student.shape[:-1], student)
    route = _dispatch.route(student, teacher)
    if route is None:
        wide = _dispatch.reference_dtype(student.device)
        loss = reference.divergence_loss(
            student.to(wide),
            teacher.to(wide),
            divergence=divergence,
            beta=beta,
            temperature=t,
            labels=labels,
            ignore_index=ignore_index,
            mask=mask,
            reduction=red,
            scale_t2=scale_t2,
        )
        return loss.to(loss_dtype(student, teacher))
    scale = t * t if scale_t2 else 1.0
    weight = _weights.masked_row_weights(
        student, labels=labels, ignore_index=ignore_index, mask=mask, reduction=red, scale=scale
    )
    kernel = kernel_divergence(divergence, beta)
    loss = fused_rows(
        route, student, teacher, weight, t, kernel, beta=beta, reduce=red != "none"
    ).loss
    dtype = loss_dtype(student, teacher)
    if loss.dtype != dtype:  # (meta float64: float32 fake rows)
        loss = loss.to(dtype)
    return loss.reshape(student.shape[:-1]) if red == "none" else loss


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
    return divergence_loss(
        student_logits,
        teacher_logits,
        "reverse_kl" if reverse else "kl",
        0.5,
        temperature,
        labels,
        ignore_index,
        mask,
        reduction,
        scale_t2,
    )


def jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = True,
) -> torch.Tensor:
    r"""Generalized Jensen-Shannon divergence JSD(β) (GKD), fused.

    .. math:: \mathrm{JSD}_\beta = \beta\,\mathrm{KL}(P_t \| M) + (1-\beta)\,\mathrm{KL}(P_s \| M),
              \quad M = \beta P_t + (1-\beta) P_s

    with :math:`\log M` formed in log space (log-add-exp), so it stays finite
    when both log-probabilities are far below -104. ``beta=0`` is exactly the
    forward KL(P_t ‖ P_s) and ``beta=1`` the reverse KL(P_s ‖ P_t) (the GKD /
    TRL convention). Masking, ``reduction`` and ``scale_t2`` as in :func:`kl_loss`.
    """
    return divergence_loss(
        student_logits,
        teacher_logits,
        "jsd",
        _validate.beta(beta),
        temperature,
        labels,
        ignore_index,
        mask,
        reduction,
        scale_t2,
    )


def tvd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = False,
) -> torch.Tensor:
    r"""Total variation distance :math:`\tfrac12 \sum_j |P_{t,j} - P_{s,j}|`, fused.

    The gradient uses sign(0) = 0 where the probabilities tie. ``scale_t2`` is
    off by default (TVD is bounded by 1; T² is a KL convention). Masking and
    ``reduction`` as in :func:`kl_loss`.
    """
    return divergence_loss(
        student_logits,
        teacher_logits,
        "tvd",
        0.5,
        temperature,
        labels,
        ignore_index,
        mask,
        reduction,
        scale_t2,
    )
