"""ChatFormat: the tags and role spans of a ChatML-style chat rendering."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..spans import Span

_PROMPT, _OBS = int(Span.PROMPT), int(Span.OBSERVATION)


def _check_span(span: object, where: str) -> int:
    if isinstance(span, bool) or not isinstance(span, int) or not 0 <= span <= 1023:
        raise ValueError(f"ChatFormat.{where} must be a span id in [0, 1023], got {span!r}")
    return int(span)


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
