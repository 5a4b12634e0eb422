"""Span-masked distillation loss for agent trajectories: ``kdcore.span_loss``."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import _dispatch, _modes, _validate, reference
from .. import spans as _spans
from .fused import fused_rows, loss_dtype
from .kl import kernel_divergence


def span_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    spans: torch.Tensor,
    *,
    span_weights: Mapping[int, float] | None = None,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    normalize: str = "span",
    scale_t2: bool = True,
    return_components: bool = False,
):
    r"""Span-weighted distillation loss for agent trajectories (one fused kernel pass).

    Each token t carries a span id :math:`s_t` (:class:`kdcore.Span`: PROMPT,
    REASON, ACT, OBSERVATION, or any small integer) and gets the divergence
    :math:`D_t = T^2 \cdot \mathrm{KL}(P_t \| P_s)` at temperature T (or
    ``divergence="reverse_kl"``, ``"jsd"`` with ``beta``, ``"tvd"``, as in
    :func:`kdcore.jsd_loss` / :func:`kdcore.tvd_loss`; no T² with ``scale_t2=False``).

    - ``normalize="span"``: :math:`L = \sum_k w_k \cdot \mathrm{mean}_{t: s_t = k} D_t`
      over the span ids that occur, so short action spans are not drowned out
      by long reasoning spans (Structured Agent Distillation).
    - ``normalize="token"``: :math:`L = \sum_t w_{s_t} D_t / \#\{t : w_{s_t} > 0\}`.

    Args:
        spans: integer span ids, shape (...) (the logits' leading shape).
        span_weights: span id -> weight >= 0. Default: REASON 1, ACT 1,
            PROMPT 0, OBSERVATION 0. Every id in ``spans`` needs a weight.
            Rows of weight 0 are never read.
        return_components: also return ``{span id: mean D over that span}``
            (detached, for logging) for every span id of positive weight; NaN
            for a span with no token in the batch.

    Returns:
        The float32 loss, or ``(loss, components)``. 0 (and zero gradients) if
        no token has positive weight.
    """
    student, teacher = _validate.logit_pair(student_logits, teacher_logits)
    t = _validate.temperature(temperature)
    divergence = _validate.divergence(divergence)
    beta = _validate.beta(beta)
    normalize = _validate.normalize(normalize)
    weights = _validate.span_weights(span_weights)
    span_ids = _validate.span_ids(spans, student.shape[:-1], student)
    if _modes.inspectable(student, span_ids):
        _validate.span_ids_have_weights(span_ids, weights)
    scale = t * t if scale_t2 else 1.0
    route = _dispatch.route(student, teacher)
    if route is None:
        wide = _dispatch.reference_dtype(student.device)
        result = reference.span_loss(
            student.to(wide),
            teacher.to(wide),
            span_ids,
            span_weights=weights,
            divergence=divergence,
            beta=beta,
            temperature=t,
            normalize=normalize,
            scale_t2=scale_t2,
            return_components=return_components,
        )
        dtype = loss_dtype(student, teacher)
        if return_components:
            loss, comps = result
            return loss.to(dtype), {k: v.detach().to(dtype) for k, v in comps.items()}
        return result.to(dtype)
    dtype = loss_dtype(student, teacher)
    w_row, index = _spans.span_row_weights(span_ids, weights, normalize, scale, dtype)
    kernel = kernel_divergence(divergence, beta)
    rows = fused_rows(route, student, teacher, w_row, t, kernel, beta=beta, reduce=False).loss
    loss = rows.sum()
    if not return_components:
        return loss
    # mean_{t in k} D_t = Σ_{t in k} w_t KL_t / Σ_{t in k} (w_t / T²)
    return loss, _spans.span_means(rows, w_row / scale, index, weights)
