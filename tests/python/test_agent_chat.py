"""kdcore.agent.chat: chat messages with tool calls to token ids, labels and span
ids, the expected spans written out by hand, piece by piece; reasoning, templates,
malformed messages named by index and position, and truncation."""

from __future__ import annotations

import pytest
import torch

from agent_helpers import QWEN_MESSAGES, A, O, P, R, byte_spans, check_alignment, pieces
from kdcore.agent import ChatFormat, TrajectoryError, encode_chat, render_chat

OPENAI_MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "reasoning_content": "\nNeed the tool.\n",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "18°C"},
    {"role": "assistant", "content": "It is 18°C."},
]
OPENAI_PIECES = [
    (
        P,
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    (R, "<think>\nNeed the tool.\n</think>\n\n"),
    (
        A,
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n',
    ),
    (O, "<|im_start|>user\n<tool_response>\n18°C\n</tool_response><|im_end|>\n"),
    (P, "<|im_start|>assistant\n"),
    (A, "It is 18°C.<|im_end|>\n"),
]


def test_chat_openai_tool_calls_and_reasoning_content():
    enc = encode_chat(OPENAI_MESSAGES)
    assert pieces(enc) == OPENAI_PIECES
    assert enc.spans.tolist() == byte_spans(OPENAI_PIECES)  # no BOS/EOS by default for chat
    check_alignment(enc)
    with_specials = encode_chat(OPENAI_MESSAGES, add_bos=True, add_eos=True)
    assert with_specials.spans.tolist() == [P, *byte_spans(OPENAI_PIECES), A]


def test_chat_several_tool_calls_dict_arguments_and_grouped_results():
    messages = [
        {"role": "user", "content": "Compare."},
        {
            "role": "assistant",
            "content": "Let me check.",
            "reasoning_content": "two lookups",
            "tool_calls": [
                {"type": "function", "function": {"name": "a", "arguments": {"q": "Zürich"}}},
                {"function": {"name": "b", "arguments": ""}},
                {"name": "c", "arguments": None},  # without the "function" wrapper
            ],
        },
        {"role": "tool", "content": "1"},
        {"role": "tool", "content": [{"type": "text", "text": "2"}]},
        {"role": "tool", "content": "3"},
        {"role": "assistant", "content": "Done."},
    ]
    expected = [
        (P, "<|im_start|>user\nCompare.<|im_end|>\n<|im_start|>assistant\n"),
        (R, "<think>\ntwo lookups\n</think>\n\n"),
        (
            A,
            'Let me check.\n<tool_call>\n{"name": "a", "arguments": {"q": "Zürich"}}\n</tool_call>'
            '\n<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>'
            '\n<tool_call>\n{"name": "c", "arguments": {}}\n</tool_call><|im_end|>\n',
        ),
        (
            O,
            "<|im_start|>user\n<tool_response>\n1\n</tool_response>\n<tool_response>\n2\n"
            "</tool_response>\n<tool_response>\n3\n</tool_response><|im_end|>\n",
        ),
        (P, "<|im_start|>assistant\n"),
        (A, "Done.<|im_end|>\n"),
    ]
    assert pieces(encode_chat(messages)) == expected


def CHAT_THINK_MESSAGES(content):
    return [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": content}]


@pytest.mark.parametrize(
    "content",
    [
        "<think>\nplan\n</think>\n\nHello!",
        "<think>plan</think>Hello!",
        "  <think>\n\nplan\n</think>\n\n\nHello!",
        "plan</think>\n\nHello!",  # R1 style: the opening tag was in the prompt
    ],
)
def test_chat_think_in_content_is_normalized(content):
    enc = encode_chat(CHAT_THINK_MESSAGES(content))
    assert pieces(enc) == [
        (P, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
        (R, "<think>\nplan\n</think>\n\n"),
        (A, "Hello!<|im_end|>\n"),
    ]


def test_chat_think_elsewhere_stays_in_place_and_footer_follows_last_segment():
    enc = encode_chat(CHAT_THINK_MESSAGES("Sure. <think>x</think> done"))
    assert pieces(enc)[1:] == [(A, "Sure. "), (R, "<think>x</think>"), (A, " done<|im_end|>\n")]
    enc = encode_chat(CHAT_THINK_MESSAGES("<think>only</think>"), allow_missing=True)
    assert pieces(enc)[1:] == [(R, "<think>\nonly\n</think>\n\n<|im_end|>\n")]
    raw = encode_chat(
        CHAT_THINK_MESSAGES("<think>plan</think>Hello!"), format=ChatFormat(normalize_think=False)
    )
    assert pieces(raw)[1:] == [(R, "<think>plan</think>"), (A, "Hello!<|im_end|>\n")]


def test_chat_qwen_inline_tool_call_and_tool_response():
    enc = encode_chat(QWEN_MESSAGES)
    expected = [
        (P, "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n"),
        (R, "<think>\nuse calc\n</think>\n\n"),
        (
            A,
            '<tool_call>\n{"name": "calc", "arguments": {"expr": "2+3"}}\n</tool_call><|im_end|>\n',
        ),
        # a user turn holding only tool responses is an observation turn
        (O, "<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n"),
        (P, "<|im_start|>user\nResult: "),
        (O, "<tool_response>5</tool_response>"),
        (P, " ok?<|im_end|>\n<|im_start|>assistant\n"),
        (A, "The sum is 5.<|im_end|>\n"),
    ]
    assert pieces(enc) == expected
    assert enc.spans.tolist() == byte_spans(expected)
    check_alignment(enc)


def test_chat_content_parts_lists():
    messages = [
        {
            "role": "system",
            "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
        },
        {"role": "user", "content": [{"type": "text", "text": "Q?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "<think>r</think>"},
                {"type": "text", "text": "A."},
            ],
        },
    ]
    assert pieces(encode_chat(messages)) == [
        (
            P,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n"
            "<|im_start|>assistant\n",
        ),
        (R, "<think>\nr\n</think>\n\n"),
        (A, "A.<|im_end|>\n"),
    ]


def test_chat_configurable_template_roles_and_tool_turns():
    fmt = ChatFormat(
        header="<|start_header_id|>{role}<|end_header_id|>\n\n",
        footer="<|eot_id|>",
        prefix="<|begin_of_text|>",
        default_system="Sys.",
        tool_as_user=False,
        role_spans={"system": P, "user": P, "tool": O, "environment": O},
    )
    messages = [
        {"role": "user", "content": "Go."},
        {
            "role": "assistant",
            "content": "<think>t</think>",
            "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "content": "r"},
        {"role": "environment", "content": "e"},
        {"role": "assistant", "content": "ok"},
    ]
    text, char_spans = render_chat(messages, fmt)
    assert [(k, text[s:e]) for s, e, k in char_spans] == [
        (
            P,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSys.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nGo.<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        (R, "<think>\nt\n</think>\n\n"),
        (A, '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call><|eot_id|>'),
        (
            O,
            "<|start_header_id|>tool<|end_header_id|>\n\nr<|eot_id|>"
            "<|start_header_id|>environment<|end_header_id|>\n\ne<|eot_id|>",
        ),
        (P, "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        (A, "ok<|eot_id|>"),
    ]
    # user turns as observations (environments that answer in user turns)
    obs_user = ChatFormat(role_spans={"system": P, "user": O, "tool": O})
    enc = encode_chat(CHAT_THINK_MESSAGES("<think>a</think>b"), format=obs_user)
    assert pieces(enc)[0] == (O, "<|im_start|>user\nHi<|im_end|>\n")
    with pytest.raises(ValueError, match="span id"):
        ChatFormat(role_spans={"user": -1})


CHAT_ERRORS = [
    # (messages, message index, position or None, message fragment)
    ([{"role": "robot", "content": "x"}], 0, None, "unknown role 'robot'"),
    ([{"content": "x"}], 0, None, "has no role"),
    (
        [{"role": "user", "content": "q"}, {"role": "assistant"}],
        1,
        None,
        "no content and no tool_calls",
    ),
    ([{"role": "user"}], 0, None, "has no content"),
    ([{"role": "tool", "content": None}], 0, None, "has no content"),
    ([{"role": "assistant", "content": "  <think>abc"}], 0, 2, "unclosed <think>"),
    ([{"role": "assistant", "content": "ok <think>abc"}], 0, 3, "unclosed <think>"),
    (
        [{"role": "assistant", "content": 'ok <tool_call>{"name": "f"}'}],
        0,
        3,
        "unclosed <tool_call>",
    ),
    (
        [{"role": "assistant", "content": "done</tool_call>"}],
        0,
        4,
        "</tool_call> without an opening tag",
    ),
    ([{"role": "user", "content": "x <tool_response>5"}], 0, 2, "unclosed <tool_response>"),
    (
        [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}],
            },
        ],
        1,
        None,
        "tool_calls[0] has no function name",
    ),
    (
        [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "f", "arguments": '{"city": "Paris"'}}],
            }
        ],
        0,
        16,
        "tool_calls[0].function.arguments is not valid JSON",
    ),
    (
        [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}],
            }
        ],
        0,
        0,
        "must be a JSON object",
    ),
    (
        [
            {
                "role": "assistant",
                "content": '<tool_call>{"name": "f", "arguments": {x}}</tool_call>',
            }
        ],
        0,
        39,
        "JSON inside <tool_call> is not valid JSON",
    ),
    (
        [{"role": "assistant", "content": 'Hi <tool_call>\n{"arguments": {}}\n</tool_call>'}],
        0,
        15,
        "<tool_call> has no function name",
    ),
    (
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        0,
        None,
        "only text parts",
    ),
    (
        [{"role": "assistant", "content": "a", "reasoning_content": 3}],
        0,
        None,
        "reasoning_content must be a string",
    ),
    # text UTF-8 cannot encode, arguments JSON cannot represent
    ([{"role": "user", "content": "hi \ud83d"}], 0, 3, "lone surrogate U+D83D"),
    (
        [{"role": "assistant", "content": "a", "reasoning_content": "r\udc80"}],
        0,
        1,
        "lone surrogate U+DC80",
    ),
    (
        [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "f", "arguments": {"x": float("nan")}}}],
            },
        ],
        1,
        None,
        "tool_calls[0] cannot be rendered as valid JSON",
    ),
    (
        [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "f", "arguments": '{"x": NaN}'}}],
            }
        ],
        0,
        0,
        "holds NaN, which is not valid JSON",
    ),
    (
        [
            {
                "role": "assistant",
                "content": '<tool_call>{"name": "f", "arguments": {"x": -Infinity}}</tool_call>',
            }
        ],
        0,
        11,
        "holds -Infinity",
    ),
    (
        [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "f", "arguments": {"x": {1}}}}],
            }
        ],
        0,
        None,
        "tool_calls[0] arguments are not JSON-serialisable",
    ),
    (
        [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "f", "arguments": {"x": "\ud83d"}}}],
            }
        ],
        0,
        None,
        "tool_calls[0]: lone surrogate",
    ),
]


@pytest.mark.parametrize(("messages", "index", "position", "fragment"), CHAT_ERRORS)
def test_chat_malformed_messages_name_the_position(messages, index, position, fragment):
    with pytest.raises(TrajectoryError) as info:
        encode_chat(messages)
    err = info.value
    assert err.message_index == index
    assert f"message {index} " in str(err) or f"message {index}:" in str(err)
    assert fragment in str(err)
    assert err.position == position
    if position is not None:
        assert f"character {position}" in str(err)
        assert err.excerpt  # a short quote of the offending text


def test_chat_empty_and_not_a_list():
    with pytest.raises(TrajectoryError, match="no messages"):
        encode_chat([])
    with pytest.raises(TypeError, match="list of dicts"):
        encode_chat("user: hi")
    with pytest.raises(TrajectoryError, match="no REASON and ACT"):
        encode_chat([{"role": "user", "content": "hi"}])


def test_chat_truncation_left_keeps_the_end():
    full = encode_chat(OPENAI_MESSAGES)
    n = len(full) - 100  # drops most of the system and user turns
    enc = encode_chat(OPENAI_MESSAGES, max_length=n, truncation="left")
    assert torch.equal(enc.spans, full.spans[-n:]) and torch.equal(enc.labels, full.labels[-n:])
    assert enc.truncated == 100
    with pytest.raises(TrajectoryError, match="no REASON tokens after truncation"):
        encode_chat(OPENAI_MESSAGES, max_length=40, truncation="left")
