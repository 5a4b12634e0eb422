"""The classic distillation objective: ``kdcore.distillation_loss``."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import _dispatch, _modes, _validate, reference
from .. import spans as _spans
from .fused import fused_rows, loss_dtype
from .kl import kernel_divergence


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    divergence: str = "kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    spans: torch.Tensor | None = None,
    span_weights: Mapping[int, float] | None = None,
    normalize: str = "span",
    reduction: str = "mean",
    scale_t2: bool = True,
    return_components: bool = False,
):
    r"""Hard labels plus soft targets, in one fused pass over the logits.

    .. math:: L = \alpha \cdot \mathrm{CE}(y, \mathrm{softmax}(z_s))
              + (1 - \alpha) \cdot T^2 \cdot D(P_t^T, P_s^T)

    CE is the hard-label cross-entropy at temperature 1, computed in the same
    kernel pass over the student logits as the divergence D (``"kl"``,
    ``"reverse_kl"``, ``"jsd"`` with ``beta``, ``"tvd"``) at temperature T.
    ``alpha`` weights the hard-label term; ``scale_t2=False`` drops the T².

    Rows with ``labels == ignore_index`` are masked in both terms.
    ``reduction``: ``"mean"`` over valid rows, ``"sum"``, or ``"none"``
    (per row, 0 on masked rows). With ``spans`` (span ids per token, see
    :func:`kdcore.span_loss`), rows are weighted by ``span_weights`` and
    normalised per span (``normalize="span"``) or per token (``"token"``);
    only ``reduction="mean"`` applies then.

    ``return_components=True`` also returns ``{"ce": ..., "divergence": ...}``
    (detached) with ``L = alpha * ce + (1 - alpha) * divergence`` — per row
    with ``reduction="none"``, NaN for a term whose weight is 0 — plus the
    per-span mean divergence under span ids (NaN with ``alpha=1``).
    """
    student, teacher = _validate.logit_pair(student_logits, teacher_logits)
    t = _validate.temperature(temperature)
    a = _validate.alpha(alpha)
    beta = _validate.beta(beta)
    divergence = _validate.divergence(divergence)
    red = _validate.reduction(reduction)
    lead, vocab = student.shape[:-1], student.shape[-1]
    labels = _validate.labels(labels, lead, student)
    if _modes.inspectable(student, labels):
        _validate.labels_in_vocab(labels, vocab, ignore_index)
    weights = None
    if spans is not None:
        spans, weights = _validate.spans_beside_labels(
            spans, span_weights, normalize, red, lead, student
        )
    scale = t * t if scale_t2 else 1.0
    options = dict(
        alpha=a,
        temperature=t,
        divergence=divergence,
        beta=beta,
        ignore_index=ignore_index,
        spans=spans,
        span_weights=weights,
        normalize=normalize,
        reduction=red,
        scale_t2=scale_t2,
    )

    route = _dispatch.route(student, teacher)
    if route is None:
        wide = _dispatch.reference_dtype(student.device)
        dtype = loss_dtype(student, teacher)
        result = reference.distillation_loss(
            student.to(wide),
            teacher.to(wide),
            labels,
            return_components=return_components,
            **options,
        )
        if not return_components:
            return result.to(dtype)
        loss, comps = result
        comps = {k: v.detach().to(dtype) for k, v in comps.items()}
        # As on the kernel path: a term of weight 0 is not computed (nor, with
        # alpha = 1, the per-span divergences).
        for key in list(comps):
            weight = a if key == "ce" else 1.0 - a
            if weight == 0:
                comps[key] = torch.full_like(comps[key], float("nan"))
        return loss.to(dtype), comps

    dtype = loss_dtype(student, teacher)
    valid = labels != ignore_index
    index = None
    if spans is not None:
        base, index = _spans.span_row_weights(spans, weights, normalize, 1.0, dtype, valid=valid)
    else:
        base = valid.reshape(-1).to(dtype)
        if red == "mean":
            n = base.sum()
            base = base / torch.where(n > 0, n, torch.ones_like(n))
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    result = fused_rows(
        route,
        student,
        teacher,
        base * ((1.0 - a) * scale),
        t,
        kernel_divergence(divergence, beta),
        beta=beta,
        labels=safe_labels,
        ce_weight=base * a,
        reduce=red != "none",
    )
    loss = result.loss.reshape(lead) if red == "none" else result.loss
    if not return_components:
        return loss

    def term(rows: torch.Tensor, weight: float) -> torch.Tensor:
        # Per row with reduction="none" (like the loss), else summed; NaN if not computed.
        if weight == 0:
            nan = torch.full_like(rows, float("nan"))
            return nan.reshape(lead) if red == "none" else nan[:1].sum()
        return (rows / weight).reshape(lead) if red == "none" else rows.sum() / weight

    comps = {"ce": term(result.ce_rows, a), "divergence": term(result.div_rows, 1.0 - a)}
    if spans is not None:
        div_rows = result.div_rows / (1.0 - a) if a < 1 else torch.full_like(base, float("nan"))
        comps.update(_spans.span_means(div_rows, base, index, weights))
    return loss, comps
