"""Building a text out of (piece, span id) segments and looking spans up by character."""

from __future__ import annotations

from bisect import bisect_right

CharSpans = list[tuple[int, int, int]]


class SegmentBuilder:
    """Appends text pieces with their span ids; adjacent pieces of one span merge."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._spans: CharSpans = []
        self._length = 0

    def add(self, piece: str, span: int) -> None:
        if not piece:
            return
        start = self._length
        self._length += len(piece)
        self._parts.append(piece)
        if self._spans and self._spans[-1][2] == span:
            self._spans[-1] = (self._spans[-1][0], self._length, span)
        else:
            self._spans.append((start, self._length, span))

    @property
    def last_span(self) -> int | None:
        return self._spans[-1][2] if self._spans else None

    def __len__(self) -> int:
        return self._length

    def build(self) -> tuple[str, CharSpans]:
        return "".join(self._parts), list(self._spans)


def span_of_token(text: str, starts: list[int], char_spans: CharSpans, start: int, end: int) -> int:
    """Span id of the token covering ``text[start:end]``.

    The span of its first non-whitespace character; of its first character when
    it is all whitespace; of the character at ``start`` (the last character at
    the end of the text) when it is empty.
    """
    if start < end:
        piece = text[start:end]
        lead = len(piece) - len(piece.lstrip())
        if lead < len(piece):
            start += lead
    elif start >= len(text):
        start = len(text) - 1
    return char_spans[bisect_right(starts, start) - 1][2]
