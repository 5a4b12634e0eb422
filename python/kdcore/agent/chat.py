"""Chat messages (system/user/assistant/tool, OpenAI tool_calls, reasoning,
Qwen tool tags) rendered with a ChatML-style template, with spans per character."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..spans import Span
from .chat_format import ChatFormat
from .chat_messages import (
    _call_json,
    _check_inline_call,
    _content,
    _encodable,
    _leading_reasoning,
    _Message,
    _role,
    _scan,
    _tool_call,
)
from .chat_template import has_chat_template, render_chat_template
from .encoding import Encoded, encode_text
from .errors import TrajectoryError
from .segments import SegmentBuilder

_REASON, _ACT, _PROMPT, _OBS = (
    int(Span.REASON),
    int(Span.ACT),
    int(Span.PROMPT),
    int(Span.OBSERVATION),
)


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
    tools: Sequence[Any] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> Encoded:
    """Renders chat ``messages`` and encodes the whole text at once into token
    ids, labels and span ids.

    A tokenizer with a chat template (a Hugging Face tokenizer whose
    ``chat_template`` is set), unless ``format`` is given, renders the
    messages itself, with
    ``apply_chat_template(messages, tools=tools, **chat_template_kwargs)``: the
    model sees exactly its own format. Spans are then found on that text
    (kdcore.agent.chat_template): each message lies between the renderings of
    the messages before it and up to it; an assistant turn's header (what the
    generation prompt adds) is PROMPT, its ``<think>`` blocks (or its
    ``reasoning_content``) REASON, the rest ACT; roles' spans and think tags
    are those of ``ChatFormat()``. A template that rewrites earlier turns
    raises :class:`TrajectoryError`.

    With ``format``, or without a template (kdcore's ``ByteTokenizer``, a
    ``tokenizers.Tokenizer``, a tokenizer whose ``chat_template`` is unset),
    kdcore's renderer draws them in ``format`` (ChatML as Qwen by default);
    ``tools`` must then be None (the ChatML renderer has no tool list).

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
    if format is None and tokenizer is not None and has_chat_template(tokenizer):
        text, char_spans = render_chat_template(
            messages, tokenizer, tools=tools, template_kwargs=chat_template_kwargs
        )
    else:
        if tools is not None or chat_template_kwargs is not None:
            raise ValueError(
                "tools and chat_template_kwargs are passed to the tokenizer's chat template, "
                f"but {type(tokenizer).__name__} has none or format= chose kdcore's renderer "
                "(set tokenizer.chat_template and leave format out, or leave them out)"
            )
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
