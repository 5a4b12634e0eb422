"""The error raised for a trajectory that cannot be turned into spans."""

from __future__ import annotations

import re

_SURROGATE = re.compile(r"[\ud800-\udfff]")  # UTF-8 cannot encode these


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


def lone_surrogate(text: str) -> int | None:
    """Index of the first surrogate code point in ``text``, or None: no
    tokenizer can take it (a lone half of a UTF-16 pair from a broken decode)."""
    m = _SURROGATE.search(text)
    return None if m is None else m.start()


def surrogate_reason(char: str) -> str:
    return f"lone surrogate U+{ord(char):04X}, which UTF-8 cannot encode"


def reject_lone_surrogate(text: str, where: str) -> None:
    """Raises a TrajectoryError naming ``where`` (e.g. ``"prompt"``) and the
    character if ``text`` holds a lone surrogate."""
    if (at := lone_surrogate(text)) is not None:
        quote = printable(excerpt(text, at))
        raise TrajectoryError(
            f"{where}, character {at}: {surrogate_reason(text[at])}: {quote!r}",
            position=at,
            excerpt=quote,
        )


def printable(text: str) -> str:
    """``text`` with surrogates replaced by U+FFFD (same length), for error messages."""
    return _SURROGATE.sub("\ufffd", text)
