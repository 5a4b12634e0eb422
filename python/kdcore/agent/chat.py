"""Chat messages (system/user/assistant/tool, OpenAI tool_calls, reasoning,
Qwen tool tags) rendered with a ChatML-style template, with spans per character."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..spans import Span
from .encoding import Encoded, encode_text
from .errors import TrajectoryError, excerpt, lone_surrogate, printable, surrogate_reason
from .segments import SegmentBuilder

_REASON, _ACT, _PROMPT, _OBS = (
    int(Span.REASON),
    int(Span.ACT),
    int(Span.PROMPT),
    int(Span.OBSERVATION),
)


def _default_role_spans() -> dict[str, int]:
    return {"system": _PROMPT, "user": _PROMPT, "tool": _OBS}


@dataclass(frozen=True)
class ChatFormat:
    """How messages are rendered and which span each part gets.

    The defaults render ChatML as Qwen2.5/Qwen3 do::

        <|im_start|>{role}\\n{content}<|im_end|>\\n

    ``header`` holds ``{role}``; ``prefix`` is put before the whole conversation
    (e.g. a BOS text), ``default_system`` is a system message added when the
    first message is not one. ``role_spans`` gives the span of every non-assistant
    role (its header, content and footer); any role neither there nor
    ``assistant_role`` is an error. With ``tool_as_user`` (Qwen) consecutive
    ``tool_role`` messages become one ``tool_user_role`` turn whose content is
    ``<tool_response>\\n{content}\\n</tool_response>`` per result, joined by
    ``\\n``; otherwise each is its own turn with the ``tool`` header. In roles of
    ``response_tag_roles`` (user) a ``<tool_response>…</tool_response>`` block is
    OBSERVATION; a turn that holds nothing else is OBSERVATION as a whole, like a
    tool turn. The assistant header is ``assistant_header_span`` (PROMPT: it is
    the generation prompt). ``normalize_think`` re-renders a ``<think>`` block
    that opens an assistant message (or text ending in ``</think>`` without an
    opening tag) as ``<think>\\n…\\n</think>\\n\\n`` like a ``reasoning_content``.
    """

    header: str = "<|im_start|>{role}\n"
    footer: str = "<|im_end|>\n"
    prefix: str = ""
    default_system: str | None = None
    system_role: str = "system"
    assistant_role: str = "assistant"
    tool_role: str = "tool"
    role_spans: Mapping[str, int] = field(default_factory=_default_role_spans)
    tool_as_user: bool = True
    tool_user_role: str = "user"
    response_tag_roles: tuple[str, ...] = ("user",)
    reasoning_key: str = "reasoning_content"
    think_open: str = "<think>"
    think_close: str = "</think>"
    tool_call_open: str = "<tool_call>"
    tool_call_close: str = "</tool_call>"
    tool_response_open: str = "<tool_response>"
    tool_response_close: str = "</tool_response>"
    normalize_think: bool = True
    assistant_header_span: int = _PROMPT

    def __post_init__(self) -> None:
        for name in (
            "think_open",
            "think_close",
            "tool_call_open",
            "tool_call_close",
            "tool_response_open",
            "tool_response_close",
            "assistant_role",
            "tool_role",
            "system_role",
            "tool_user_role",
            "reasoning_key",
        ):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"ChatFormat.{name} must be a non-empty string, got {value!r}")
        for name in ("header", "footer", "prefix"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"ChatFormat.{name} must be a string")
        if not isinstance(self.role_spans, Mapping):
            raise ValueError("ChatFormat.role_spans must map role -> span id")
        spans = {}
        for role, span in self.role_spans.items():
            if not isinstance(role, str) or role == self.assistant_role:
                raise ValueError(
                    f"ChatFormat.role_spans keys must be role names other than the assistant "
                    f"role, got {role!r}"
                )
            spans[role] = _check_span(span, f"role_spans[{role!r}]")
        _check_span(self.assistant_header_span, "assistant_header_span")
        object.__setattr__(self, "role_spans", MappingProxyType(spans))
        roles = self.response_tag_roles
        object.__setattr__(
            self, "response_tag_roles", (roles,) if isinstance(roles, str) else tuple(roles)
        )

    def render_header(self, role: str) -> str:
        return self.header.replace("{role}", role)


def _check_span(span: object, where: str) -> int:
    if isinstance(span, bool) or not isinstance(span, int) or not 0 <= span <= 1023:
        raise ValueError(f"ChatFormat.{where} must be a span id in [0, 1023], got {span!r}")
    return int(span)


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


def _think_block(reasoning: str, fmt: ChatFormat) -> str:
    return f"{fmt.think_open}\n{reasoning.strip(chr(10))}\n{fmt.think_close}\n\n"


def _render_assistant(b: SegmentBuilder, message: Mapping, where: _Message, fmt: ChatFormat):
    content = _content(message, where, required=False)
    calls = message.get("tool_calls") or []
    if not isinstance(calls, Sequence) or isinstance(calls, (str, bytes)):
        raise where.error(f"tool_calls must be a list, got {type(calls).__name__}")
    if content is None and not calls:
        raise where.error("the assistant message has no content and no tool_calls")
    reasoning = message.get(fmt.reasoning_key)
    if reasoning is not None and not isinstance(reasoning, str):
        raise where.error(f"{fmt.reasoning_key} must be a string, got {type(reasoning).__name__}")
    if reasoning is not None:
        _encodable(reasoning, where, fmt.reasoning_key)
    rendered = [_call_json(*_tool_call(call, k, where), k, where) for k, call in enumerate(calls)]

    b.add(fmt.render_header(where.role), fmt.assistant_header_span)
    last = _ACT  # the footer's span: that of the message's last segment (ACT if empty)

    def emit(piece: str, span: int) -> None:
        nonlocal last
        if piece:
            b.add(piece, span)
            last = span

    text = content or ""
    start = 0
    if reasoning is not None and reasoning.strip():
        emit(_think_block(reasoning, fmt), _REASON)
    elif fmt.normalize_think and text:
        inline, start = _leading_reasoning(text, fmt, where)
        if inline is not None:
            emit(_think_block(inline, fmt), _REASON)
    tags = [
        (fmt.think_open, fmt.think_close, "think"),
        (fmt.tool_call_open, fmt.tool_call_close, "call"),
    ]
    visible = False
    for kind, s, e in _scan(text, start, tags, where):
        if kind == "call":
            _check_inline_call(text, s, e, fmt, where)
        emit(text[s:e], _REASON if kind == "think" else _ACT)
        visible = True
    for k, call in enumerate(rendered):
        sep = "\n" if visible or k > 0 else ""
        emit(f"{sep}{fmt.tool_call_open}\n{call}\n{fmt.tool_call_close}", _ACT)
    b.add(fmt.footer, last)


def _render_turn(b: SegmentBuilder, role: str, content: str, where: _Message, fmt: ChatFormat):
    span = fmt.role_spans[role]
    if role not in fmt.response_tag_roles:
        b.add(fmt.render_header(role), span)
        b.add(content, span)
        b.add(fmt.footer, span)
        return
    tags = [(fmt.tool_response_open, fmt.tool_response_close, "response")]
    parts = _scan(content, 0, tags, where)
    obs = fmt.role_spans.get(fmt.tool_role, _OBS)
    only_results = any(k for k, _, _ in parts) and all(
        k or not content[s:e].strip() for k, s, e in parts
    )
    outer = obs if only_results else span
    b.add(fmt.render_header(role), outer)
    for kind, s, e in parts:
        b.add(content[s:e], obs if kind else outer)
    b.add(fmt.footer, outer)


def render_chat(
    messages: Sequence[Mapping[str, Any]], format: ChatFormat | None = None
) -> tuple[str, list[tuple[int, int, int]]]:
    """The rendered text of ``messages`` and its ``(start, end, span id)`` segmentation."""
    fmt = format or ChatFormat()
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise TrajectoryError("empty trajectory: no messages")
    roles = [_role(m, i) for i, m in enumerate(messages)]
    b = SegmentBuilder()
    b.add(fmt.prefix, _PROMPT)
    if fmt.default_system is not None and roles[0] != fmt.system_role:
        b.add(fmt.render_header(fmt.system_role), _PROMPT)
        b.add(fmt.default_system, _PROMPT)
        b.add(fmt.footer, _PROMPT)
    i = 0
    while i < len(messages):
        role = roles[i]
        where = _Message(i, role)
        if role == fmt.assistant_role:
            _render_assistant(b, messages[i], where, fmt)
        elif role == fmt.tool_role and fmt.tool_as_user:
            span = fmt.role_spans.get(fmt.tool_role, _OBS)
            b.add(fmt.render_header(fmt.tool_user_role), span)
            first = i
            while i < len(messages) and roles[i] == fmt.tool_role:
                content = _content(messages[i], _Message(i, role), required=True)
                sep = "" if i == first else "\n"
                b.add(f"{sep}{fmt.tool_response_open}\n{content}\n{fmt.tool_response_close}", span)
                i += 1
            b.add(fmt.footer, span)
            continue
        elif role in fmt.role_spans:
            content = _content(messages[i], where, required=True)
            _render_turn(b, role, content, where, fmt)  # type: ignore[arg-type]
        else:
            known = {*fmt.role_spans, fmt.assistant_role}
            if fmt.tool_as_user:
                known.add(fmt.tool_role)
            raise TrajectoryError(
                f"message {i}: unknown role {role!r} (known roles: {', '.join(sorted(known))})",
                message_index=i,
            )
        i += 1
    text, char_spans = b.build()
    if not text.strip():
        raise TrajectoryError("empty trajectory: the messages render to no text")
    return text, char_spans


def encode_chat(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Any = None,
    *,
    format: ChatFormat | None = None,
    span_weights: Mapping[int, float] | None = None,
    max_length: int | None = None,
    truncation: str = "right",
    add_bos: bool = False,
    add_eos: bool = False,
    allow_missing: bool = False,
) -> Encoded:
    """Renders chat ``messages`` with ``format`` (ChatML as Qwen by default) and
    encodes the whole text at once into token ids, labels and span ids.

    Spans: system/user turns PROMPT; tool results and their template text
    OBSERVATION; the assistant header PROMPT; reasoning (``reasoning_content``
    or ``<think>…</think>``) REASON; tool calls (``tool_calls`` or inline
    ``<tool_call>``) and the visible answer ACT; the assistant's closing
    ``<|im_end|>\\n`` the span of the message's last segment. ``add_bos`` and
    ``add_eos`` default to False because the template already marks the turns
    (as ``apply_chat_template`` does for Qwen). The other arguments are those of
    :func:`encode_react`. Malformed messages raise :class:`TrajectoryError`
    naming the message index and the character position in its content.
    """
    text, char_spans = render_chat(messages, format)
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
