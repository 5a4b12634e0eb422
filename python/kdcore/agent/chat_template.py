"""Chat messages rendered by the tokenizer's own chat template, with spans.

The template is a black box, so spans are found on its output: rendering the
first i messages must give a prefix of the whole conversation (the template
is prefix-preserving, up to how it closes the last turn), which puts every
message's text between two prefix lengths; rendering them with the
generation prompt marks where an assistant turn's header ends. Inside an
assistant turn, ``<think>`` blocks (or the message's reasoning text) are
REASON, the rest — visible answer, tool calls,
end of turn — ACT, as kdcore's own ChatML renderer does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..spans import Span
from .chat_format import ChatFormat
from .completion import tool_call_ranges
from .errors import TrajectoryError
from .segments import SegmentBuilder

_REASON, _ACT, _OBS = (
    int(Span.REASON),
    int(Span.ACT),
    int(Span.OBSERVATION),
)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` renders chats itself (a Hugging Face tokenizer with a template)."""
    return callable(getattr(tokenizer, "apply_chat_template", None)) and bool(
        getattr(tokenizer, "chat_template", None)
    )


def _reasoning_ranges(body: str, message: Mapping, fmt: ChatFormat) -> list[tuple[int, int]]:
    """Ranges of ``body`` (an assistant turn after its header) that are reasoning."""
    think = ChatFormat(tool_call_open=fmt.think_open, tool_call_close=fmt.think_close)
    ranges = tool_call_ranges(body, think)
    reasoning = message.get(fmt.reasoning_key)
    if not ranges and isinstance(reasoning, str) and reasoning.strip():
        at = body.find(reasoning.strip())
        if at >= 0:
            ranges = [(at, at + len(reasoning.strip()))]
    return ranges


def _message_texts(message: Mapping, fmt: ChatFormat) -> list[str]:
    """The message's own texts (content, reasoning, called tools' names) that its
    rendering must contain."""
    out = []
    for key in ("content", fmt.reasoning_key):
        value = message.get(key)
        if isinstance(value, str) and value.strip():
            out.append(value.strip())
    for call in message.get("tool_calls") or []:
        name = (call.get("function") or {}).get("name") if isinstance(call, Mapping) else None
        if isinstance(name, str) and name:
            out.append(name)
    return out


def render_chat_template(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    tools: Sequence[Any] | None = None,
    format: ChatFormat | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> tuple[str, list[tuple[int, int, int]]]:
    """The template's text of ``messages`` and its ``(start, end, span id)`` segmentation.

    Roles take their spans from ``format.role_spans`` (system/user PROMPT,
    tool OBSERVATION); ``format`` also names the reasoning key and the think
    tags. Raises :class:`TrajectoryError` when the template rewrites earlier
    turns (not prefix-preserving), naming the fix.
    """
    fmt = format or ChatFormat()
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise TrajectoryError("empty trajectory: no messages")
    extra = dict(template_kwargs or {})

    def render(upto: int, generation_prompt: bool = False) -> str:
        if upto == 0:
            return ""
        return tokenizer.apply_chat_template(
            [dict(m) for m in messages[:upto]],
            tools=list(tools) if tools else None,
            tokenize=False,
            add_generation_prompt=generation_prompt,
            **extra,
        )

    prefixes = [render(k) for k in range(len(messages) + 1)]
    text = prefixes[-1]
    b = SegmentBuilder()
    start = 0
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if not isinstance(role, str):
            raise TrajectoryError(f"message {i}: needs a 'role' string", message_index=i)
        # Up to where the rendering of the first i + 1 messages agrees with the
        # whole one: a template may close a turn differently when it is last
        # (Qwen joins consecutive tool results into one turn).
        end = len(os.path.commonprefix([prefixes[i + 1], text]))
        missing = [part for part in _message_texts(message, fmt) if part not in text[start:end]]
        if end < start or missing:
            raise TrajectoryError(
                f"message {i}: the tokenizer's chat template does not render the first "
                f"{i + 1} messages as a prefix of the whole conversation (it rewrites earlier "
                "turns, e.g. drops their reasoning), so message boundaries cannot be found. "
                "Pass format=kdcore.agent.ChatFormat(...) to use kdcore's own renderer, or "
                "a template that keeps earlier turns as they are",
                message_index=i,
            )
        if role == fmt.assistant_role:
            prompt = render(i, generation_prompt=True)
            head = len(prompt)
            if not start <= head <= end or not text.startswith(prompt):
                head = start  # no generation prompt of its own: the turn is all body
            b.add(text[start:head], fmt.assistant_header_span)
            body = text[head:end]
            pos = 0
            for a, z in _reasoning_ranges(body, message, fmt):
                while z < len(body) and body[z].isspace():
                    z += 1  # the blank line after the reasoning goes with it
                b.add(body[pos:a], _ACT)
                b.add(body[a:z], _REASON)
                pos = z
            b.add(body[pos:], _ACT)
        elif role in fmt.role_spans:
            b.add(text[start:end], fmt.role_spans[role])
        else:
            known = sorted({*fmt.role_spans, fmt.assistant_role})
            raise TrajectoryError(
                f"message {i}: unknown role {role!r} (known roles: {', '.join(known)})",
                message_index=i,
            )
        start = end
    built, char_spans = b.build()
    if not built.strip():
        raise TrajectoryError("empty trajectory: the messages render to no text")
    return built, char_spans
