"""Span ids of agent trajectories and the per-row weights of span losses."""

from __future__ import annotations

import enum

import torch


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
