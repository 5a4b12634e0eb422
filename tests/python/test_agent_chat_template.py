"""encode_chat through a tokenizer's own chat template (a tiny word-level
tokenizer built here; its template renders ChatML as kdcore's renderer does,
which gives an independent expected segmentation)."""

from __future__ import annotations

import pytest

from hf_helpers import MESSAGES, make_tokenizer
from kdcore import Span
from kdcore.agent import ChatFormat, TrajectoryError, encode_chat

P, R, A, O = Span.PROMPT, Span.REASON, Span.ACT, Span.OBSERVATION  # noqa: E741
TOK = make_tokenizer()
PLAIN = make_tokenizer(chat_template=None)
TOOLS = [{"type": "function", "function": {"name": "calc", "parameters": {}}}]


def test_template_spans_equal_kdcores_chatml_renderer():
    messages = MESSAGES[:3] + [{"role": "tool", "content": "7"}] + MESSAGES[3:]
    ours = encode_chat(messages, TOK)
    chatml = encode_chat(messages, PLAIN)  # no template: kdcore's ChatML renderer
    assert ours.text == chatml.text
    assert ours.char_spans == chatml.char_spans
    assert ours.spans.tolist() == chatml.spans.tolist()
    assert ours.labels.tolist() == chatml.labels.tolist()


def test_template_renders_tools_and_finds_each_part():
    enc = encode_chat(MESSAGES, TOK, tools=TOOLS)
    assert enc.text.startswith("<|im_start|>system\nTools: calc<|im_end|>\n")
    assert enc.text == TOK.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False)
    words = {k: [] for k in (P, R, A, O)}
    for token, k in zip(
        TOK.convert_ids_to_tokens(enc.input_ids.tolist()), enc.spans.tolist(), strict=True
    ):
        words[Span(k)].append(token)
    assert "Tools" not in words[R] + words[A] and "calc" in words[P] + words[R] + words[A]
    assert words[R] == ["<think>", "use", "calc", "</think>"]
    assert words[A][0] == "<tool_call>" and "</tool_call>" in words[A]
    assert words[A][-5:] == ["the", "sum", "is", "five", "."] or words[A][-6:-1] == [
        "the",
        "sum",
        "is",
        "five",
        ".",
    ]
    assert words[O] == [
        "<|im_start|>",
        "user",
        "<tool_response>",
        "5",
        "</tool_response>",
        "<|im_end|>",
    ]
    assert words[P][:2] == ["<|im_start|>", "system"]


def test_template_that_rewrites_history_is_a_clear_error():
    # drops the reasoning of every assistant turn but the last: not prefix-preserving
    rewriting = make_tokenizer(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and loop.last %}{{ m['reasoning_content'] or '' }}{% endif %}"
        "{{ m['content'] or '' }}<|im_end|>\n{% endfor %}"
    )
    messages = [
        {"role": "user", "content": "what is 2 + 3 ?"},
        {"role": "assistant", "reasoning_content": "use calc", "content": "five"},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "5"},
    ]
    with pytest.raises(TrajectoryError, match="prefix.*format=kdcore.agent.ChatFormat"):
        encode_chat(messages, rewriting)
    # the fix it names works
    assert len(encode_chat(messages, rewriting, format=ChatFormat(), allow_missing=True)) > 0


def test_tools_without_a_template_are_refused():
    with pytest.raises(ValueError, match="chat template"):
        encode_chat(MESSAGES, PLAIN, tools=TOOLS)


def test_unknown_role_is_named():
    with pytest.raises(TrajectoryError, match="unknown role 'critic'"):
        encode_chat([*MESSAGES, {"role": "critic", "content": "ok"}], TOK)
