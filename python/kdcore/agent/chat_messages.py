"""Reading chat messages: roles, contents, reasoning, tool calls and their JSON
arguments, each checked with a TrajectoryError that names the message."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence

from .chat_format import ChatFormat
from .errors import TrajectoryError, excerpt, lone_surrogate, printable, surrogate_reason


class _Message:
    """Error reporting for one message."""

    def __init__(self, index: int, role: str) -> None:
        self.index = index
        self.role = role

    def error(
        self,
        reason: str,
        content: str | None = None,
        position: int | None = None,
        source: str = "its content",
    ) -> TrajectoryError:
        where = f"message {self.index} ({self.role})"
        if content is None or position is None:
            return TrajectoryError(f"{where}: {reason}", message_index=self.index)
        quote = printable(excerpt(content, position))
        return TrajectoryError(
            f"{where}, character {position} of {source}: {reason}: {quote!r}",
            message_index=self.index,
            position=position,
            excerpt=quote,
        )


def _role(message: object, index: int) -> str:
    if not isinstance(message, Mapping):
        raise TrajectoryError(
            f"message {index} must be a dict with 'role' and 'content', got "
            f"{type(message).__name__}",
            message_index=index,
        )
    role = message.get("role")
    if not isinstance(role, str):
        raise TrajectoryError(f"message {index} has no role (a string)", message_index=index)
    return role


def _encodable(text: str, where: _Message, source: str = "its content") -> str:
    """``text``, checked for surrogates, which no tokenizer can encode."""
    if (at := lone_surrogate(text)) is not None:
        raise where.error(surrogate_reason(text[at]), text, at, source)
    return text


def _content(message: Mapping, where: _Message, *, required: bool) -> str | None:
    """The content as one string: a string, or the concatenated texts of a list of
    ``{"type": "text", "text": ...}`` parts (positions in errors count in that)."""
    value = message.get("content")
    if value is None:
        if required:
            raise where.error("the message has no content")
        return None
    if isinstance(value, str):
        return _encodable(value, where)
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        texts = []
        for k, part in enumerate(value):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and part.get("type", "text") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise where.error(f"content part {k} has no 'text' string")
                texts.append(text)
            elif isinstance(part, Mapping):
                raise where.error(
                    f"content part {k} has type {part.get('type')!r}; only text parts are supported"
                )
            else:
                raise where.error(f"content part {k} must be a dict, got {type(part).__name__}")
        return _encodable("".join(texts), where)
    raise where.error(
        f"content must be a string or a list of text parts, got {type(value).__name__}"
    )


def _scan(
    content: str,
    start: int,
    tags: list[tuple[str, str, str]],
    where: _Message,
) -> list[tuple[str | None, int, int]]:
    """Splits ``content[start:]`` into plain text (kind None) and tagged blocks
    ``(kind, start, end)`` (tags included); unclosed or stray tags raise."""
    out: list[tuple[str | None, int, int]] = []
    pos = start
    # Next occurrence of each tag at or after pos (-1: none left). Searched again
    # only once pos passes it, so each tag's searches sweep the content once
    # (linear; searching every tag from pos at every block was quadratic).
    ahead: dict[str, int] = {}

    def next_at(tag: str) -> int:
        i = ahead.get(tag)
        if i is None or 0 <= i < pos:
            i = ahead[tag] = content.find(tag, pos)
        return i

    while pos < len(content):
        best: tuple[int, int, str, str, str] | None = None  # index, -len, tag, closer, kind
        for open_tag, close_tag, kind in tags:
            for tag, is_open in ((open_tag, True), (close_tag, False)):
                i = next_at(tag)
                if i >= 0 and (best is None or (i, -len(tag)) < (best[0], best[1])):
                    best = (i, -len(tag), tag, close_tag if is_open else "", kind)
        if best is None:
            break
        i, _, tag, close_tag, kind = best
        if not close_tag:
            raise where.error(f"{tag} without an opening tag", content, i)
        end = content.find(close_tag, i + len(tag))
        if end < 0:
            raise where.error(f"unclosed {tag}: no {close_tag} after it", content, i)
        if i > pos:
            out.append((None, pos, i))
        out.append((kind, i, end + len(close_tag)))
        pos = end + len(close_tag)
    if pos < len(content):
        out.append((None, pos, len(content)))
    return out


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str) -> float:
    raise _NonFinite(name)


def _json_object(text: str, where: _Message, what: str, content: str | None, base: int) -> dict:
    """``json.loads(text)``, a dict; ``text`` starts at ``base`` in ``content``
    (None: ``text`` is a field of its own, positions count in it)."""
    source = "its content" if content is not None else what
    quoted = content if content is not None else text
    at = base + len(text) - len(text.lstrip())
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise where.error(
            f"{what} is not valid JSON ({exc.msg})", quoted, base + exc.pos, source
        ) from None
    except _NonFinite as exc:  # Python's json reads them; JSON has no such values
        reason = f"{what} holds {exc}, which is not valid JSON"
        raise where.error(reason, quoted, at, source) from None
    except RecursionError:  # json recurses once per level of nesting
        reason = (
            f"{what} is JSON nested too deeply to read (over ~{sys.getrecursionlimit()} levels)"
        )
        raise where.error(reason, quoted, at, source) from None
    if not isinstance(value, dict):
        raise where.error(
            f"{what} must be a JSON object, got {type(value).__name__}", quoted, at, source
        )
    return value


def _tool_call(call: object, k: int, where: _Message) -> tuple[str, dict]:
    """(name, arguments) of an OpenAI-style ``tool_calls`` entry."""
    what = f"tool_calls[{k}]"
    if not isinstance(call, Mapping):
        raise where.error(f"{what} must be a dict, got {type(call).__name__}")
    fn = call.get("function", call)
    if not isinstance(fn, Mapping):
        raise where.error(f"{what}.function must be a dict, got {type(fn).__name__}")
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        raise where.error(f"{what} has no function name")
    args = fn.get("arguments")
    if args is None or (isinstance(args, str) and not args.strip()):
        return name, {}
    if isinstance(args, str):
        return name, _json_object(args, where, f"{what}.function.arguments", None, 0)
    if not isinstance(args, Mapping):
        raise where.error(
            f"{what}.function.arguments must be a JSON string or a dict, got {type(args).__name__}"
        )
    return name, dict(args)


def _call_json(name: str, args: dict, k: int, where: _Message) -> str:
    """The JSON of a ``tool_calls`` entry as rendered; it must be valid JSON (no
    NaN or infinity) and encodable text."""
    what = f"tool_calls[{k}]"
    try:
        call = json.dumps({"name": name, "arguments": args}, ensure_ascii=False, allow_nan=False)
    except ValueError as exc:  # NaN/infinity, or a circular reference
        hint = " (NaN or infinity)" if "float" in str(exc) else ""
        raise where.error(f"{what} cannot be rendered as valid JSON: {exc}{hint}") from None
    except RecursionError:
        raise where.error(f"{what} arguments are nested too deeply to render as JSON") from None
    except TypeError as exc:  # a value json cannot serialise (a set, a datetime, ...)
        raise where.error(f"{what} arguments are not JSON-serialisable: {exc}") from None
    if (at := lone_surrogate(call)) is not None:
        raise where.error(f"{what}: {surrogate_reason(call[at])}")
    return call


def _check_inline_call(content: str, start: int, end: int, fmt: ChatFormat, where: _Message):
    inner_start = start + len(fmt.tool_call_open)
    inner = content[inner_start : end - len(fmt.tool_call_close)]
    what = f"the JSON inside {fmt.tool_call_open}"
    value = _json_object(inner, where, what, content, inner_start)
    name = value.get("name")
    at = inner_start + len(inner) - len(inner.lstrip())
    if not isinstance(name, str) or not name.strip():
        raise where.error(f"{fmt.tool_call_open} has no function name", content, at)
    args = value.get("arguments")
    if args is not None and not isinstance(args, dict):
        raise where.error(
            f"{fmt.tool_call_open} arguments must be a JSON object, got {type(args).__name__}",
            content,
            at,
        )


def _leading_reasoning(text: str, fmt: ChatFormat, where: _Message) -> tuple[str | None, int]:
    """(reasoning, where the rest starts) of a think block opening ``text``, or
    of text before a ``</think>`` that has no opening tag (R1 style)."""
    lead = len(text) - len(text.lstrip())
    if text.startswith(fmt.think_open, lead):
        close = text.find(fmt.think_close, lead + len(fmt.think_open))
        if close < 0:
            raise where.error(
                f"unclosed {fmt.think_open}: no {fmt.think_close} after it", text, lead
            )
        reasoning = text[lead + len(fmt.think_open) : close]
    else:
        close = text.find(fmt.think_close)
        if close < 0 or fmt.think_open in text[:close]:
            return None, 0
        reasoning = text[:close]
    rest = close + len(fmt.think_close)
    while rest < len(text) and text[rest] == "\n":
        rest += 1
    return reasoning, rest
