"""Spans of a model's own completion (on-policy distillation): which generated
tokens are tool calls (ACT), which are tool results (OBSERVATION), and which
are the rest (REASON)."""

from __future__ import annotations

from collections.abc import Sequence

from ..spans import Span
from .chat_format import ChatFormat

_REASON, _ACT, _OBS = int(Span.REASON), int(Span.ACT), int(Span.OBSERVATION)


def tool_call_ranges(text: str, format: ChatFormat | None = None) -> list[tuple[int, int]]:
    """``(start, end)`` character ranges of the tool calls in generated ``text``,
    tags included (``format.tool_call_open`` / ``tool_call_close``).

    Unlike the trajectory encoders this never raises: a sampled completion
    may stop inside a call (an unclosed tag runs to the end of the text) or
    hold a stray closing tag (left to the text around it).
    """
    fmt = format or ChatFormat()
    out: list[tuple[int, int]] = []
    pos = 0
    while True:
        start = text.find(fmt.tool_call_open, pos)
        if start < 0:
            return out
        close = text.find(fmt.tool_call_close, start + len(fmt.tool_call_open))
        end = len(text) if close < 0 else close + len(fmt.tool_call_close)
        out.append((start, end))
        pos = end


def completion_spans(
    pieces: Sequence[str],
    tool_mask: Sequence[int] | None = None,
    format: ChatFormat | None = None,
) -> list[int]:
    """The span id of each generated token.

    ``pieces``: each token's text (the completion decoded token by token);
    ``tool_mask``: 1 where the model generated the token, 0 where a tool's
    result was spliced in (as TRL marks them; None: all generated). Tool
    results are OBSERVATION; a token that overlaps a tool call in its run of
    generated text is ACT; every other generated token is REASON.
    """
    n = len(pieces)
    mask = [1] * n if tool_mask is None else [int(m) for m in tool_mask]
    if len(mask) != n:
        raise ValueError(f"tool_mask has {len(mask)} entries for {n} tokens")
    spans = [_OBS if m == 0 else _REASON for m in mask]
    k = 0
    while k < n:  # each run of generated tokens is searched on its own
        if mask[k] == 0:
            k += 1
            continue
        end = k
        while end < n and mask[end] != 0:
            end += 1
        starts, pos = [], 0
        for piece in pieces[k:end]:
            starts.append(pos)
            pos += len(piece)
        text = "".join(pieces[k:end])
        for a, b in tool_call_ranges(text, format):
            for j, s in enumerate(starts):
                e = s + len(pieces[k + j])
                if s < b and (e > a or (s == e and a <= s < b)):
                    spans[k + j] = _ACT
        k = end
    return spans
