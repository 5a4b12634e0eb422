"""Span ids of agent trajectories and the per-row weights of span losses."""

from __future__ import annotations

import enum
import math
import numbers
import operator
from collections.abc import Mapping

import torch

from . import _modes, _validate


class Span(enum.IntEnum):
    """What a token of an agent trajectory is; any small integer id also works."""

    PROMPT = 0
    REASON = 1
    ACT = 2
    OBSERVATION = 3


#: Reasoning and actions are learned; prompts and tool observations are not.
DEFAULT_SPAN_WEIGHTS: dict[int, float] = {
    Span.PROMPT: 0.0,
    Span.REASON: 1.0,
    Span.ACT: 1.0,
    Span.OBSERVATION: 0.0,
}

MAX_SPAN_ID = 1023
NORMALIZE = ("span", "token")


def span_name(span_id: int) -> int:
    """``Span(span_id)`` where it is one, else the plain integer (for logs)."""
    try:
        return Span(span_id)
    except ValueError:
        return span_id


def validate_weights(span_weights: Mapping[int, float] | None) -> dict[int, float]:
    if span_weights is None:
        return dict(DEFAULT_SPAN_WEIGHTS)
    if not isinstance(span_weights, Mapping):
        raise TypeError(
            f"span_weights must map span id -> weight, got {type(span_weights).__name__}"
        )
    if not span_weights:
        raise ValueError("span_weights is empty: give at least one span id a weight")
    out: dict[int, float] = {}
    for key, value in span_weights.items():
        span_id = _integer(key)
        if span_id is None or not 0 <= span_id <= MAX_SPAN_ID:
            raise ValueError(f"span_weights keys must be ints in [0, {MAX_SPAN_ID}], got {key!r}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"span_weights[{key}] must be a float, got {type(value).__name__}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"span_weights[{key}] must be finite and >= 0, got {value}")
        out[span_id] = float(value)
    return out


def _integer(key: object) -> int | None:
    """``key`` as an int if it is integer-like (int, numpy or 0-d torch integers), else None."""
    if isinstance(key, bool) or isinstance(key, float):
        return None
    if isinstance(key, torch.Tensor) and (key.is_floating_point() or key.dtype == torch.bool):
        return None
    try:
        return operator.index(key)
    except TypeError:
        return None


def validate_spans(spans: object, lead: torch.Size, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(spans, torch.Tensor):
        raise TypeError(f"spans must be a torch.Tensor, got {type(spans).__name__}")
    if spans.dtype.is_floating_point or spans.dtype.is_complex or spans.dtype == torch.bool:
        raise TypeError(f"spans must be an integer tensor of span ids, got {spans.dtype}")
    if spans.shape != lead:
        raise ValueError(
            f"spans must have the logits' leading shape {tuple(lead)}, got {tuple(spans.shape)}"
        )
    if spans.device != like.device:
        raise ValueError(f"spans is on {spans.device} but student_logits is on {like.device}")
    return spans


def check_ids_have_weights(spans: torch.Tensor, weights: dict[int, float]) -> None:
    """Raises if a span id in ``spans`` has no weight (a host sync; eager only)."""
    ids = torch.unique(spans).tolist()
    missing = [i for i in ids if i not in weights]
    if missing:
        raise ValueError(
            f"span ids {missing} occur in spans but have no weight in span_weights "
            f"(weights given for {sorted(weights)}); give them a weight (0 to ignore them)"
        )


def prepare(
    spans: object,
    span_weights: Mapping[int, float] | None,
    normalize: str,
    reduction: str,
    lead: torch.Size,
    like: torch.Tensor,
) -> tuple[torch.Tensor, dict[int, float]]:
    """Validated ``(spans, weights)`` for a loss that takes span ids next to
    labels (``distillation_loss``, the fused linear loss): reduction must be
    "mean", every span id present needs a weight (eager mode only)."""
    if reduction != "mean":
        raise ValueError(
            f"with spans the loss is normalised per span: reduction must be 'mean', "
            f"got {reduction!r}"
        )
    _validate.normalize(normalize)
    weights = validate_weights(span_weights)
    spans = validate_spans(spans, lead, like)
    if _modes.inspectable(spans, like):
        check_ids_have_weights(spans, weights)
    return spans, weights


def span_row_weights(
    spans: torch.Tensor,
    weights: dict[int, float],
    normalize: str,
    scale: float,
    dtype,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row weight, per-row span index) for a span loss.

    ``normalize="span"``: w_r = w_k / n_k for a row of span k with n_k rows, so
    the loss is Σ_k w_k · mean_{t in k} D_t. ``"token"``: w_r = w_k / N with N
    the number of rows of positive weight. Both times ``scale`` (T²).
    Ids absent from ``weights`` (possible only under torch.compile, where the
    check cannot run) weigh 0. Rows where ``valid`` is False weigh 0 and are
    not counted.
    """
    size = max(weights) + 1
    table = torch.zeros(size + 1, dtype=dtype, device=spans.device)
    table[list(weights)] = torch.tensor(list(weights.values()), dtype=dtype, device=spans.device)
    ids = spans.reshape(-1).long()
    index = torch.where((ids >= 0) & (ids < size), ids, size)  # unknown -> the 0 slot
    w_tok = table[index]
    present = torch.ones_like(w_tok)
    if valid is not None:
        present = valid.reshape(-1).to(dtype)
        w_tok = w_tok * present
    if normalize == "span":
        counts = torch.zeros(size + 1, dtype=dtype, device=spans.device)
        counts.index_add_(0, index, present)
        counts = torch.where(counts > 0, counts, torch.ones_like(counts))
        w_row = w_tok / counts[index]
    else:
        n = (w_tok > 0).sum().to(dtype)
        w_row = w_tok / torch.where(n > 0, n, torch.ones_like(n))
    return w_row * scale, index


def span_means(
    rows: torch.Tensor, w_row: torch.Tensor, index: torch.Tensor, weights: dict[int, float]
) -> dict[int, torch.Tensor]:
    """{span id: Σ_{t in k} rows_t / Σ_{t in k} w_t} for every id of positive weight
    (NaN for a span without tokens); detached, for logging. Static keys keep it
    traceable by torch.compile."""
    slots = max(weights) + 2  # ids 0..max, plus the slot of unknown ids
    num = torch.zeros(slots, dtype=rows.dtype, device=rows.device)
    den = torch.zeros(slots, dtype=rows.dtype, device=rows.device)
    num.index_add_(0, index, rows.detach())
    den.index_add_(0, index, w_row.detach().to(rows.dtype))
    means = num / den
    return {span_name(k): means[k] for k, w in sorted(weights.items()) if w > 0}
