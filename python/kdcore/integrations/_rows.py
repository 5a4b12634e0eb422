"""kdcore's fused loss summed over a selection of rows (token positions).

Both trainers score only some positions (completion tokens, labelled tokens,
one span at a time). Selecting those rows before the call keeps the masked
positions out of the logit GEMMs altogether.
"""

from __future__ import annotations

from typing import Any

import torch

from ..ops.fused_linear import fused_linear_distillation_loss
from ._heads import Head, transform_kwargs


def summed_loss(
    student_hidden: torch.Tensor,
    student: Head,
    rows: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher: Head | None = None,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    labels: torch.Tensor | None = None,
    **options: Any,
) -> torch.Tensor:
    """Σ over the rows where ``rows`` is True of the fused loss's per-row value.

    ``student_hidden`` (N, H_s), ``teacher_hidden`` (N, H_t), ``rows`` (N,)
    bool, ``teacher_topk`` ((N, k), (N, k)), ``labels`` (N,); ``options`` are
    the loss's own (divergence, beta, temperature, alpha, scale_t2, ...).
    """
    index = rows.reshape(-1).nonzero().squeeze(1).to(student_hidden.device)
    if index.numel() == 0:
        # No row: a zero that still reaches the head, so every rank's backward
        # touches the same parameters (DDP waits for all of them).
        return student_hidden.sum() * 0.0 + student.weight.sum() * 0.0

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.index_select(0, index.to(t.device))

    kwargs: dict[str, Any] = dict(options)
    kwargs.update(transform_kwargs(student, teacher))
    if teacher_topk is not None:
        kwargs["teacher_topk"] = (pick(teacher_topk[0]), pick(teacher_topk[1]))
    else:
        kwargs["teacher_hidden"] = pick(teacher_hidden).to(teacher.weight.device)
        kwargs["teacher_weight"] = teacher.weight
        kwargs["teacher_bias"] = teacher.bias
    if labels is not None:
        kwargs["labels"] = pick(labels)
    return fused_linear_distillation_loss(
        pick(student_hidden).to(student.weight.device),
        student.weight,
        student_bias=student.bias,
        reduction="sum",
        **kwargs,
    )
