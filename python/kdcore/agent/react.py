"""ReAct text (Thought: / Action: tool[args] / Observation: / finish[answer]) to spans."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ..spans import Span
from .encoding import Encoded, encode_text
from .errors import (
    TrajectoryError,
    lone_surrogate,
    printable,
    reject_lone_surrogate,
    surrogate_reason,
)
from .segments import SegmentBuilder

_THOUGHT, _ACTION, _OBSERVATION, _ANSWER = "thought", "action", "observation", "answer"
_SPAN = {
    _THOUGHT: int(Span.REASON),
    _ACTION: int(Span.ACT),
    _ANSWER: int(Span.ACT),
    _OBSERVATION: int(Span.OBSERVATION),
}
_LINE = re.compile(r"[^\n]*\n|[^\n]+")
_TOOL = re.compile(r"[\w.\-]+")  # letters, digits, _, ., -


@dataclass(frozen=True)
class ReactFormat:
    """Line prefixes of a ReAct trajectory.

    A line whose first non-blank characters are a thought prefix starts a
    REASON segment, an action or answer prefix an ACT segment, an observation
    prefix an OBSERVATION segment; other lines continue the current segment.
    With ``step_numbers`` a prefix ending in ``:`` also matches with a step
    number before the colon (``Thought 1:``, ``Action 2:`` as in the ReAct
    paper). ``validate_actions`` checks that every action is ``tool[args]``;
    ``finish_tool`` (compared case-insensitively) names the final action, after
    which no Thought/Action/answer line may follow.
    """

    thought_prefixes: tuple[str, ...] = ("Thought:", "Reasoning:")
    action_prefixes: tuple[str, ...] = ("Action:",)
    observation_prefixes: tuple[str, ...] = ("Observation:",)
    answer_prefixes: tuple[str, ...] = ("Final Answer:",)
    finish_tool: str = "finish"
    step_numbers: bool = True
    ignore_case: bool = False
    validate_actions: bool = True

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for name in ("thought_prefixes", "action_prefixes", "observation_prefixes"):
            _prefixes(self, name, seen, required=True)
        _prefixes(self, "answer_prefixes", seen, required=False)
        if not isinstance(self.finish_tool, str) or not _TOOL.fullmatch(self.finish_tool):
            raise ValueError(f"finish_tool must be a tool name, got {self.finish_tool!r}")


def _prefixes(fmt: ReactFormat, name: str, seen: dict[str, str], *, required: bool) -> None:
    value = getattr(fmt, name)
    if isinstance(value, str):
        value = (value,)
    value = tuple(value)
    if required and not value:
        raise ValueError(f"ReactFormat.{name} must not be empty")
    for p in value:
        if not isinstance(p, str) or not p.strip() or p != p.lstrip():
            raise ValueError(
                f"ReactFormat.{name} entries must be non-empty strings without leading "
                f"whitespace, got {p!r}"
            )
        key = p.lower() if fmt.ignore_case else p
        if key in seen:
            raise ValueError(f"prefix {p!r} is in both {seen[key]} and {name}")
        seen[key] = name
    object.__setattr__(fmt, name, value)


@lru_cache(maxsize=32)
def _matchers(fmt: ReactFormat) -> list[tuple[re.Pattern[str], str]]:
    kinds = [
        (fmt.thought_prefixes, _THOUGHT),
        (fmt.action_prefixes, _ACTION),
        (fmt.observation_prefixes, _OBSERVATION),
        (fmt.answer_prefixes, _ANSWER),
    ]
    flags = re.IGNORECASE if fmt.ignore_case else 0
    out = []
    for prefixes, kind in kinds:
        for p in prefixes:
            if fmt.step_numbers and p.endswith(":"):
                pattern = re.escape(p[:-1]) + r"(?:[ \t]*\d+)?:"
            else:
                pattern = re.escape(p)
            out.append((len(p), re.compile(pattern, flags), kind))
    out.sort(key=lambda t: -t[0])  # longest first: "Action Input:" before "Action:"
    return [(rx, kind) for _, rx, kind in out]


def _where(text: str, index: int) -> tuple[int, int, str]:
    """1-based line and column of ``text[index]`` and that line's text."""
    line = text.count("\n", 0, index) + 1
    start = text.rfind("\n", 0, index) + 1
    end = text.find("\n", index)
    line_text = text[start : end if end >= 0 else len(text)].rstrip("\r")
    return line, index - start + 1, printable(line_text)


def _error(text: str, index: int, reason: str) -> TrajectoryError:
    line, column, line_text = _where(text, index)
    caret = " " * (column - 1) + "^"
    return TrajectoryError(
        f"line {line}, column {column}: {reason}\n    {line_text}\n    {caret}",
        line=line,
        column=column,
        excerpt=line_text,
    )


class _ActionError(Exception):
    def __init__(self, reason: str, index: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.index = index


def _split_action(s: str) -> tuple[str, str]:
    """``tool[args]`` -> (tool, args); ``s`` starts right after the prefix and may
    span several lines. The arguments end at the last ``]`` of the line on which
    the action's brackets balance (see :func:`_closing_bracket`); only whitespace
    may follow it."""
    i = len(s) - len(s.lstrip(" \t"))
    m = _TOOL.match(s, i)
    if m is None:
        if i >= len(s) or s[i] in "\r\n":
            raise _ActionError("the action has no tool: expected tool[args]", i)
        if s[i] == "[":
            raise _ActionError("the action has no tool name before '['", i)
        raise _ActionError(f"expected a tool name, found {s[i]!r}", i)
    tool, j = m.group(), m.end()
    if j >= len(s) or s[j] != "[":
        raise _ActionError(
            f"expected '[' right after the tool name {tool!r} (actions are tool[args])", j
        )
    close = _closing_bracket(s, j)
    if close is None:
        raise _ActionError(
            f"unclosed '[' in the action {tool}[...]: no closing ']' (arguments over "
            "several lines need balanced brackets)",
            j,
        )
    tail = s[close + 1 :]
    k = len(tail) - len(tail.lstrip())
    if k < len(tail):
        raise _ActionError("unexpected text after the action's closing ']'", close + 1 + k)
    return tool, s[j + 1 : close]


def _closing_bracket(s: str, open_at: int) -> int | None:
    """Index of the ``]`` closing the ``[`` at ``open_at``, or None if there is none.

    It is the last ``]`` of the line on which the brackets balance, or of the
    first line if they never do. Balancing lets arguments run over several
    lines (``python[f(\\n[1])]``) without swallowing a following line that ends
    in ``]`` (an observation without its prefix: ``Results: [1, 2]``); taking
    that line's last ``]`` keeps one-line arguments with unbalanced brackets
    (``search[a]b]``) working.
    """
    depth = 0
    line_end = None
    for k in range(open_at, len(s)):
        if s[k] == "[":
            depth += 1
        elif s[k] == "]":
            depth -= 1
            if depth == 0:
                line_end = _line_end(s, k)
                break
    if line_end is None:  # never balanced: the action is its first line
        line_end = _line_end(s, open_at)
    close = s.rfind("]", open_at, line_end)
    return close if close >= 0 else None


def _line_end(s: str, index: int) -> int:
    end = s.find("\n", index)
    return len(s) if end < 0 else end


def parse_action(text: str, format: ReactFormat | None = None) -> tuple[str, str]:
    """``"Action: search[kdcore]"`` or ``"search[kdcore]"`` -> ``("search", "kdcore")``.

    For executing a model's actions with the same rules the encoder checks;
    raises :class:`TrajectoryError` (with ``column``) on a malformed action.
    """
    fmt = format or ReactFormat()
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    start = len(text) - len(text.lstrip(" \t"))
    for rx, kind in _matchers(fmt):
        m = rx.match(text, start)
        if m is not None and kind == _ACTION:
            start = m.end()
            break
    try:
        return _split_action(text[start:])
    except _ActionError as exc:
        raise _error(text, start + exc.index, exc.reason) from None


def react_segments(
    text: str, format: ReactFormat | None = None
) -> tuple[list[tuple[int, int, int]], list[tuple[str, str]]]:
    """``(char_spans, actions)`` of a ReAct text: its ``(start, end, span id)``
    segmentation and the ``(tool, args)`` of each action (validated actions only)."""
    fmt = format or ReactFormat()
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise TrajectoryError("empty trajectory: the text has no characters besides whitespace")
    if (at := lone_surrogate(text)) is not None:
        raise _error(text, at, surrogate_reason(text[at]))
    matchers = _matchers(fmt)
    builder = SegmentBuilder()
    actions: list[tuple[str, str]] = []
    kind: str | None = None  # None: still in the prompt
    seg_start = 0
    body_start = 0  # where an action's tool[args] begins
    finished_at: int | None = None  # index of the final action
    finish = fmt.finish_tool.lower()

    def close(end: int) -> None:
        nonlocal finished_at
        if kind is None:
            builder.add(text[seg_start:end], int(Span.PROMPT))
            return
        builder.add(text[seg_start:end], _SPAN[kind])
        if kind == _ANSWER:
            finished_at = seg_start
        elif kind == _ACTION and fmt.validate_actions:
            try:
                tool, args = _split_action(text[body_start:end])
            except _ActionError as exc:
                raise _error(text, body_start + exc.index, exc.reason) from None
            actions.append((tool, args))
            if tool.lower() == finish:
                finished_at = seg_start

    for m in _LINE.finditer(text):
        line = m.group()
        lead = len(line) - len(line.lstrip(" \t"))
        new_kind, prefix_end = None, 0
        for rx, k in matchers:
            pm = rx.match(line, lead)
            if pm is not None:
                new_kind, prefix_end = k, pm.end()
                break
        if new_kind is None or (new_kind == _OBSERVATION and kind is None):
            continue  # a continuation line (or a prompt line)
        close(m.start())
        if new_kind != _OBSERVATION and finished_at is not None:
            raise _error(
                text,
                m.start() + lead,
                f"{new_kind.capitalize()} line after the final action "
                f"(line {_where(text, finished_at)[0]})",
            )
        kind, seg_start, body_start = new_kind, m.start(), m.start() + prefix_end
    close(len(text))
    char_spans = builder.build()[1]
    return char_spans, actions


def encode_react(
    text: str,
    tokenizer: Any = None,
    *,
    format: ReactFormat | None = None,
    span_weights: Mapping[int, float] | None = None,
    max_length: int | None = None,
    truncation: str = "right",
    add_bos: bool = True,
    add_eos: bool = True,
    allow_missing: bool = False,
    prompt: str | None = None,
) -> Encoded:
    """Encodes a ReAct trajectory into token ids, labels and span ids.

    Everything before the first Thought/Action/answer line is PROMPT; then each
    line goes to the segment its prefix starts (its trailing newline included),
    unprefixed lines continue the current segment. ``prompt``, when given, is
    put before ``text`` as is and is all PROMPT, so a few-shot prompt whose
    examples contain Thought/Action lines is not parsed (line numbers in errors
    count lines of ``text``).

    ``tokenizer``: None (:class:`ByteTokenizer`), a Hugging Face fast tokenizer
    or a ``tokenizers.Tokenizer``. ``span_weights`` (default
    ``kdcore.DEFAULT_SPAN_WEIGHTS``) decides the labels: a token whose span has
    no positive weight gets -100. ``add_bos``/``add_eos`` add the tokenizer's
    BOS (PROMPT) and EOS (span of the last segment) ids where it has them, and
    nothing where it has none. ``max_length`` truncates the tokens after
    labelling (``truncation="right"`` keeps the beginning, ``"left"`` the end).
    Raises :class:`TrajectoryError` on a malformed action or if the kept tokens
    have no REASON or no ACT token (unless ``allow_missing``).
    """
    char_spans, _ = react_segments(text, format)
    if prompt is not None:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str or None, got {type(prompt).__name__}")
        reject_lone_surrogate(prompt, "prompt")
        builder = SegmentBuilder()
        builder.add(prompt, int(Span.PROMPT))
        for s, e, k in char_spans:
            builder.add(text[s:e], k)
        text, char_spans = builder.build()
    return encode_text(
        text,
        char_spans,
        tokenizer,
        span_weights=span_weights,
        max_length=max_length,
        truncation=truncation,
        add_bos=add_bos,
        add_eos=add_eos,
        allow_missing=allow_missing,
    )
