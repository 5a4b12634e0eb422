"""The error raised for a trajectory that cannot be turned into spans."""

from __future__ import annotations


class TrajectoryError(ValueError):
    """A malformed or unusable trajectory.

    The message names where the problem is; the same facts are attributes, for
    code that wants to skip or report bad records:

    - ReAct text: ``line`` and ``column`` (1-based, in the text given).
    - Chat messages: ``message_index`` (0-based) and ``position`` (0-based
      character offset in that message's content, or in the JSON string of a
      ``tool_calls`` entry's arguments).
    - ``excerpt``: a short quote of the offending text, when there is one.
    """

    def __init__(
        self,
        message: str,
        *,
        line: int | None = None,
        column: int | None = None,
        message_index: int | None = None,
        position: int | None = None,
        excerpt: str | None = None,
    ) -> None:
        super().__init__(message)
        self.line = line
        self.column = column
        self.message_index = message_index
        self.position = position
        self.excerpt = excerpt


def excerpt(text: str, position: int, before: int = 20, after: int = 30) -> str:
    """Up to ``before`` characters before ``position`` and ``after`` from it."""
    start = max(0, position - before)
    end = min(len(text), position + after)
    head = "…" if start > 0 else ""
    tail = "…" if end < len(text) else ""
    return head + text[start:end] + tail
