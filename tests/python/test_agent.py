"""kdcore.agent: trajectories (ReAct text, chat messages) to token ids, labels and
span ids. Expected spans are written out by hand, piece by piece."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kdcore
from kdcore import Span
from kdcore.agent import (
    ByteTokenizer,
    ChatFormat,
    Encoded,
    ReactFormat,
    TrajectoryError,
    collate,
    encode_chat,
    encode_react,
    encode_segments,
    parse_action,
    react_segments,
    render_chat,
)

P, R, A, O = Span.PROMPT, Span.REASON, Span.ACT, Span.OBSERVATION  # noqa: E741
TOK = ByteTokenizer()


def pieces(enc: Encoded) -> list[tuple[int, str]]:
    return [(k, enc.text[s:e]) for s, e, k in enc.char_spans]


def byte_spans(expected: list[tuple[int, str]]) -> list[int]:
    """Span of every byte token of a text given as hand-written pieces."""
    return [k for k, text in expected for _ in text.encode("utf-8")]


def check_alignment(enc: Encoded, weights=None) -> None:
    weights = weights or {P: 0.0, R: 1.0, A: 1.0, O: 0.0}
    ids, labels, spans = enc.input_ids.tolist(), enc.labels.tolist(), enc.spans.tolist()
    assert len(ids) == len(labels) == len(spans) == len(enc.offsets)
    for i, lab, k in zip(ids, labels, spans, strict=True):
        assert lab == (i if weights.get(k, 0.0) > 0 else -100)
    # char_spans cover the text exactly, in order
    assert enc.char_spans[0][0] == 0 and enc.char_spans[-1][1] == len(enc.text)
    for (_, e1, _), (s2, _, _) in zip(enc.char_spans, enc.char_spans[1:], strict=False):
        assert e1 == s2


# ---------------------------------------------------------------- byte tokenizer


def test_byte_tokenizer_ids_offsets_and_decode():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    text = "aé€😀"  # 1, 2, 3 and 4 bytes
    assert tok.encode(text) == list(text.encode("utf-8"))
    out = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    assert out["input_ids"] == list(text.encode("utf-8"))
    assert out["offset_mapping"] == [(0, 1)] + [(1, 2)] * 2 + [(2, 3)] * 3 + [(3, 4)] * 4
    special = tok("ab", return_offsets_mapping=True, add_special_tokens=True)
    assert special["input_ids"] == [257, 97, 98, 258]
    assert special["offset_mapping"] == [(0, 0), (0, 1), (1, 2), (0, 0)]
    assert tok.decode([257, *tok.encode(text), 258, 256]) == text
    assert tok.decode(torch.tensor(tok.encode(text))) == text
    assert tok.decode([0xC3]) == "\ufffd"  # a lone lead byte
    with pytest.raises(ValueError, match="not a ByteTokenizer id"):
        tok.decode([259])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


# ---------------------------------------------------------------- ReAct

REACT = (
    "Question: What is 2+3?\n"
    "Thought: I should add.\n"
    "Action: calc[2+3]\n"
    "Observation: 5\n"
    "Thought: The answer is 5.\n"
    "Action: finish[5]\n"
)
REACT_PIECES = [
    (P, "Question: What is 2+3?\n"),
    (R, "Thought: I should add.\n"),
    (A, "Action: calc[2+3]\n"),
    (O, "Observation: 5\n"),
    (R, "Thought: The answer is 5.\n"),
    (A, "Action: finish[5]\n"),
]


def test_react_spans_of_every_character_and_token():
    enc = encode_react(REACT)
    assert enc.text == REACT
    assert pieces(enc) == REACT_PIECES
    # BOS (PROMPT), one token per byte, EOS (span of the final action)
    assert enc.spans.tolist() == [P, *byte_spans(REACT_PIECES), A]
    assert enc.input_ids.tolist() == [257, *REACT.encode("utf-8"), 258]
    assert enc.offsets[0] == (0, 0) and enc.offsets[-1] == (len(REACT), len(REACT))
    check_alignment(enc)
    assert enc.input_ids.dtype == enc.labels.dtype == enc.spans.dtype == torch.int64
    counts = enc.span_counts()
    assert counts == {P: 1 + 23, R: 23 + 26, A: 18 + 18 + 1, O: 15}


def test_default_weights_ignore_prompt_and_observation_tokens():
    enc = encode_react(REACT)
    spans, labels, ids = enc.spans, enc.labels, enc.input_ids
    assert (labels[(spans == P) | (spans == O)] == -100).all()
    learned = (spans == R) | (spans == A)
    assert torch.equal(labels[learned], ids[learned])
    assert labels[0] == -100 and labels[-1] == 258  # BOS ignored, EOS learned (ACT)
    custom = encode_react(REACT, span_weights={P: 0.0, R: 0.0, A: 1.0, O: 0.5})
    check_alignment(custom, {P: 0.0, R: 0.0, A: 1.0, O: 0.5})
    assert (custom.labels[custom.spans == O] != -100).all()
    assert (custom.labels[custom.spans == R] == -100).all()


def test_react_without_bos_eos():
    enc = encode_react(REACT, add_bos=False, add_eos=False)
    assert enc.input_ids.tolist() == list(REACT.encode("utf-8"))
    assert enc.spans.tolist() == byte_spans(REACT_PIECES)


def test_react_numbered_steps_continuations_multiline_args_and_final_answer():
    text = (
        "You are an agent.\n"
        "Observation: prompt text, not an observation yet\n"
        "Thought 1: first line\n"
        "continued thought\n"
        "\n"
        "  Action 1: python[print([1, [2]])\n"
        "print(3)]\n"
        "Observation 1: [1, [2]]\n"
        "3\n"
        "\tReasoning: so\n"
        "Final Answer: 3"
    )
    expected = [
        (P, "You are an agent.\nObservation: prompt text, not an observation yet\n"),
        (R, "Thought 1: first line\ncontinued thought\n\n"),
        (A, "  Action 1: python[print([1, [2]])\nprint(3)]\n"),
        (O, "Observation 1: [1, [2]]\n3\n"),
        (R, "\tReasoning: so\n"),
        (A, "Final Answer: 3"),
    ]
    enc = encode_react(text)
    assert pieces(enc) == expected
    assert enc.spans.tolist() == [P, *byte_spans(expected), A]
    _, actions = react_segments(text)
    assert actions == [("python", "print([1, [2]])\nprint(3)")]


def test_react_non_ascii_multibyte_characters():
    text = "Frage: Größe von 東京?\nThought: nachschlagen 🔎\nAction: suche[東京]\nObservation: 2 194 km²\nAction: finish[2 194 km²]\n"
    expected = [
        (P, "Frage: Größe von 東京?\n"),
        (R, "Thought: nachschlagen 🔎\n"),
        (A, "Action: suche[東京]\n"),
        (O, "Observation: 2 194 km²\n"),
        (A, "Action: finish[2 194 km²]\n"),
    ]
    enc = encode_react(text, add_bos=False, add_eos=False)
    assert pieces(enc) == expected
    assert enc.spans.tolist() == byte_spans(expected)
    assert len(enc) == len(text.encode("utf-8")) > len(text)
    for s, e, _ in enc.char_spans:  # the bytes of each span decode to its text
        ids = [
            i
            for i, (a, b) in zip(enc.input_ids.tolist(), enc.offsets, strict=True)
            if s <= a and b <= e
        ]
        assert TOK.decode(ids) == text[s:e]
    # every byte of "東" (3 bytes) carries that character's offsets
    at = text.index("東")
    assert [o for o in enc.offsets if o == (at, at + 1)] == [(at, at + 1)] * 3


def test_react_prompt_argument_is_not_parsed():
    prompt = "Example:\nThought: an example thought\nAction: finish[x]\n\nNow you:\n"
    enc = encode_react(REACT, prompt=prompt)
    assert enc.text == prompt + REACT
    assert pieces(enc) == [(P, prompt + REACT_PIECES[0][1]), *REACT_PIECES[1:]]


def test_react_custom_format():
    fmt = ReactFormat(
        thought_prefixes=("Think:",),
        action_prefixes=("Act:",),
        observation_prefixes=("Obs:",),
        finish_tool="answer",
        ignore_case=True,
    )
    text = "task\nthink: hmm\nACT: look[x]\nobs: y\nAct: Answer[y]\n"
    enc = encode_react(text, format=fmt)
    assert pieces(enc) == [
        (P, "task\n"),
        (R, "think: hmm\n"),
        (A, "ACT: look[x]\n"),
        (O, "obs: y\n"),
        (A, "Act: Answer[y]\n"),
    ]
    # with the default (case-sensitive) format none of these lines is a step
    with pytest.raises(TrajectoryError, match="no REASON and ACT tokens"):
        encode_react(text)
    with pytest.raises(ValueError, match="in both"):
        ReactFormat(thought_prefixes=("Action:",))
    with pytest.raises(ValueError, match="must not be empty"):
        ReactFormat(action_prefixes=())


def test_react_free_form_actions_without_validation():
    fmt = ReactFormat(validate_actions=False)
    text = "Thought: search it\nAction: search\nAction Input: kdcore\nObservation: found\n"
    enc = encode_react(text, format=fmt)
    assert pieces(enc) == [
        (R, "Thought: search it\n"),
        (A, "Action: search\nAction Input: kdcore\n"),
        (O, "Observation: found\n"),
    ]
    with pytest.raises(TrajectoryError, match="line 2, column 15"):
        encode_react(text)


REACT_ERRORS = [
    # (text, line, column, message fragment)
    ("Thought: a\nAction:\n", 2, 8, "has no tool"),
    ("Thought: a\nAction:   \n", 2, 11, "has no tool"),
    ("Thought: a\nAction: [x]\n", 2, 9, "no tool name before '['"),
    ("Thought: a\nAction: ]x[\n", 2, 9, "expected a tool name"),
    ("Thought: a\nAction: search x\n", 2, 15, "expected '[' right after the tool name 'search'"),
    ("Thought: a\nAction: search\n", 2, 15, "expected '['"),
    ("Thought: a\n  Action: search[x\nObservation: o\n", 2, 17, "unclosed '['"),
    ("Q\nThought: a\nAction: search[x] then\n", 3, 19, "unexpected text after"),
    ("Thought: a\nAction: search[x]\noops, no prefix\n", 3, 1, "unexpected text after"),
    # an unprefixed observation line ending in ']' is not swallowed into the action
    ("Q\nThought: a\nAction: search[kdcore]\nResults: [1, 2, 3]\nAction: finish[1]\n", 4, 1, "unexpected text after"),
    ("Thought: a\nAction: python[f(\n)]\n> [1]\n", 4, 1, "unexpected text after"),
    ("Thought: a\nAction: python[print('[')\nprint(2)]\n", 2, 15, "unclosed '['"),
    ("Thought: a\nAction: finish[1]\nObservation: ok\nThought: more\n", 4, 1, "after the final action (line 2)"),
    ("Thought: a\nFinal Answer: 1\nAction: calc[1]\n", 3, 1, "after the final action (line 2)"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "line", "column", "fragment"), REACT_ERRORS)
def test_react_malformed_actions_name_the_position(text, line, column, fragment):
    with pytest.raises(TrajectoryError) as info:
        encode_react(text)
    err = info.value
    assert (err.line, err.column) == (line, column)
    assert f"line {line}, column {column}" in str(err)
    assert fragment in str(err)
    assert err.excerpt == text.split("\n")[line - 1]  # the line is quoted


@pytest.mark.parametrize("text", ["", "   \n\t\n"])
def test_empty_react_text(text):
    with pytest.raises(TrajectoryError, match="empty trajectory"):
        encode_react(text)


def test_missing_reason_or_act_and_allow_missing():
    with pytest.raises(TrajectoryError, match="no REASON and ACT tokens.*allow_missing=True"):
        encode_react("Just a question?\n")
    with pytest.raises(TrajectoryError, match="no ACT tokens"):
        encode_react("Q\nThought: only thinking\n")
    with pytest.raises(TrajectoryError, match="no REASON tokens"):
        encode_react("Q\nAction: finish[x]\n")
    enc = encode_react("Q\nAction: finish[x]\n", allow_missing=True)
    assert pieces(enc) == [(P, "Q\n"), (A, "Action: finish[x]\n")]
    enc = encode_react("Just a question?\n", allow_missing=True)
    assert set(enc.spans.tolist()) == {P}  # the text is all PROMPT; EOS takes its span
    assert (enc.labels == -100).all()


def test_parse_action():
    assert parse_action("Action: search[kdcore]") == ("search", "kdcore")
    assert parse_action("  calc[(2+3)*[4]] \n") == ("calc", "(2+3)*[4]")
    assert parse_action("Action 3: Finish[yes]") == ("Finish", "yes")
    with pytest.raises(TrajectoryError, match="column 13"):
        parse_action("Action: calc(1+2)")
    # arguments over several lines run while a bracket is open
    assert parse_action("python[f([1,\n2])]\n") == ("python", "f([1,\n2])")
    # on one line, unbalanced brackets still run to the line's last ']'
    assert parse_action("search[a]b]") == ("search", "a]b")
    assert parse_action("search[ [ ]") == ("search", " [ ")


@pytest.mark.parametrize(
    "text",
    ["Action: calc[1+1]\nObservation: [2]", "search[ [ ]\nResults: [1]", "f[(\n)]\n[x]"],
)
def test_parse_action_rejects_a_following_line_ending_in_a_bracket(text):
    with pytest.raises(TrajectoryError, match="unexpected text after the action's closing") as info:
        parse_action(text)
    assert info.value.column == 1 and info.value.line == text.count("\n") + 1


# ---------------------------------------------------------------- truncation


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_keeps_labels_and_spans_aligned(side):
    full = encode_react(REACT)
    n = 60
    enc = encode_react(REACT, max_length=n, truncation=side)
    keep = slice(0, n) if side == "right" else slice(len(full) - n, None)
    assert len(enc) == n and enc.truncated == len(full) - n
    assert torch.equal(enc.input_ids, full.input_ids[keep])
    assert torch.equal(enc.spans, full.spans[keep])
    assert torch.equal(enc.labels, full.labels[keep])
    assert enc.offsets == full.offsets[keep]
    kept = enc.labels != -100
    assert torch.equal(enc.labels[kept], enc.input_ids[kept])
    check_alignment(enc)
    assert enc.text == REACT and enc.char_spans == full.char_spans
    assert (enc.input_ids[0] == 257) == (side == "right")
    assert (enc.input_ids[-1] == 258) == (side == "left")


def test_truncation_that_drops_all_reasoning_or_actions():
    with pytest.raises(
        TrajectoryError,
        match=r"no REASON and ACT tokens after truncation to max_length=10 \(truncation='right'\)",
    ):
        encode_react(REACT, max_length=10)
    with pytest.raises(TrajectoryError, match="no REASON tokens after truncation"):
        encode_react(REACT, max_length=12, truncation="left")
    enc = encode_react(REACT, max_length=10, allow_missing=True)
    assert len(enc) == 10 and (enc.labels == -100).all()
    assert encode_react(REACT, max_length=10_000).truncated == 0


def test_a_span_kept_only_at_position_zero_is_missing():
    # After the shift by one nothing predicts position 0: keeping the action line
    # and one more byte (the newline ending the Thought line) keeps no REASON target.
    text = "Question: what\nThought: t\nAction: finish[1]\n"
    n = len("Action: finish[1]\n") + 1
    with pytest.raises(TrajectoryError, match="no REASON tokens after truncation.*no position"):
        encode_react(text, max_length=n, truncation="left", add_eos=False)
    enc = encode_react(text, max_length=n, truncation="left", add_eos=False, allow_missing=True)
    assert enc.spans[0] == R and enc.span_counts() == {R: 1, A: n - 1}
    assert f"labelled={n - 1}," in repr(enc)  # the n - 1 ACT targets; position 0 is not one
    kept = encode_react(text, max_length=n + 1, truncation="left", add_eos=False)
    assert kept.spans[:2].tolist() == [R, R] and f"labelled={n}," in repr(kept)
    # the same without truncation: no BOS, so the one REASON token is at position 0
    with pytest.raises(TrajectoryError, match="no REASON tokens"):
        encode_segments([("x", R), ("do", A)])
    assert len(encode_segments([("x", R), ("do", A)], add_bos=True)) == 4


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_length": 0}, "max_length"),
    ({"max_length": 2.5}, "max_length"),
    ({"truncation": "middle"}, "truncation"),
])  # fmt: skip
def test_bad_truncation_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        encode_react(REACT, **kwargs)


# ---------------------------------------------------------------- tokens across span boundaries


class FakeFastTokenizer:
    """Hugging Face fast tokenizer lookalike: regex pieces, character offsets,
    an EOS id but no BOS id."""

    bos_token_id = None
    eos_token_id = 0

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)
        self.vocab: dict[str, int] = {"<eos>": 0}
        self.calls: list[tuple] = []

    def __call__(self, text, return_offsets_mapping=False, add_special_tokens=True):
        self.calls.append((text, return_offsets_mapping, add_special_tokens))
        ids, offsets = [], []
        for m in self.pattern.finditer(text):
            ids.append(self.vocab.setdefault(m.group(), len(self.vocab)))
            offsets.append(m.span())
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = offsets
        return out


STRADDLE = "Q: go\nThought: ok\nAction: f[x]\nObservation: y\n  Thought: fine\nAction: finish[x]\n"


def test_straddling_tokens_take_the_span_of_their_first_non_whitespace_character():
    tok = FakeFastTokenizer(r"\s*\S+|\s+")  # newlines and indentation glue to the next word
    enc = encode_react(STRADDLE, tok)
    assert tok.calls == [(STRADDLE, True, False)]  # one call, on the whole rendered text
    texts = [STRADDLE[s:e] for s, e in enc.offsets[:-1]]
    assert list(zip(texts, enc.spans.tolist()[:-1], strict=True)) == [
        ("Q:", P), (" go", P),
        ("\nThought:", R),  # "\n" is PROMPT, "T" is REASON
        (" ok", R),
        ("\nAction:", A), (" f[x]", A),
        ("\nObservation:", O), (" y", O),
        ("\n  Thought:", R), (" fine", R),
        ("\nAction:", A), (" finish[x]", A),
        ("\n", A),  # all whitespace: the span of its first character
    ]  # fmt: skip
    assert enc.input_ids[-1] == 0 and enc.spans[-1] == A  # EOS added, no BOS (none exists)
    check_alignment(enc)


def test_whitespace_only_token_across_a_boundary_takes_its_first_character():
    tok = FakeFastTokenizer(r"\s+|\S+")  # "\n  " straddles OBSERVATION | REASON
    enc = encode_react(STRADDLE, tok, add_eos=False)
    got = {
        STRADDLE[s:e]: k
        for (s, e), k in zip(enc.offsets, enc.spans.tolist(), strict=True)
        if s == STRADDLE.index("\n  Thought")
    }
    assert got == {"\n  ": O}
    token_after = [
        k
        for (s, e), k in zip(enc.offsets, enc.spans.tolist(), strict=True)
        if STRADDLE[s:e] == "Thought:"
    ]
    assert token_after == [R, R]


def test_tokenizers_library_tokenizer_with_merged_tokens():
    from tokenizers import Regex, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Split

    words = ["Q:", " go", "\nThought:", " ok", "\nAction:", " f[x]", "\nObservation:", " y",
             "\n  Thought:", " fine", " finish[x]", "\n"]  # fmt: skip
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Split(Regex(r"\s*\S+"), behavior="isolated")
    enc = encode_react(STRADDLE, tok)  # no BOS/EOS ids: none added, no error
    expected = [("Q:", P), (" go", P), ("\nThought:", R), (" ok", R), ("\nAction:", A),
                (" f[x]", A), ("\nObservation:", O), (" y", O), ("\n  Thought:", R),
                (" fine", R), ("\nAction:", A), (" finish[x]", A), ("\n", A)]  # fmt: skip
    assert enc.input_ids.tolist() == [vocab[w] for w, _ in expected]
    assert enc.spans.tolist() == [k for _, k in expected]
    check_alignment(enc)
    # non-ASCII: the library's offsets are character offsets too
    enc = encode_react("Thought: café\nAction: f[ü]\n", tok)
    assert enc.offsets == [(0, 8), (8, 13), (13, 21), (21, 26), (26, 27)]
    assert enc.spans.tolist() == [R, R, A, A, A]


def test_tokenizer_errors():
    class Slow:
        def __call__(self, text, **kwargs):
            raise NotImplementedError("return_offset_mapping is not available")

    with pytest.raises(TypeError, match="fast tokenizer"):
        encode_react(REACT, Slow())
    with pytest.raises(TypeError, match="tokenizer must be"):
        encode_react(REACT, 42)

    class Broken:
        def __call__(self, text, **kwargs):
            return {"input_ids": [1], "offset_mapping": [(0, len(text) + 5)]}

    with pytest.raises(ValueError, match="outside the text"):
        encode_react(REACT, Broken())


# ---------------------------------------------------------------- chat: OpenAI tool_calls


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
    },  # fmt: skip
    {"role": "tool", "tool_call_id": "c1", "content": "18°C"},
    {"role": "assistant", "content": "It is 18°C."},
]
OPENAI_PIECES = [
    (P, "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n"),
    (R, "<think>\nNeed the tool.\n</think>\n\n"),
    (A, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'),
    (O, "<|im_start|>user\n<tool_response>\n18°C\n</tool_response><|im_end|>\n"),
    (P, "<|im_start|>assistant\n"),
    (A, "It is 18°C.<|im_end|>\n"),
]  # fmt: skip


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
        (A, 'Let me check.\n<tool_call>\n{"name": "a", "arguments": {"q": "Zürich"}}\n</tool_call>'
            '\n<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>'
            '\n<tool_call>\n{"name": "c", "arguments": {}}\n</tool_call><|im_end|>\n'),
        (O, "<|im_start|>user\n<tool_response>\n1\n</tool_response>\n<tool_response>\n2\n"
            "</tool_response>\n<tool_response>\n3\n</tool_response><|im_end|>\n"),
        (P, "<|im_start|>assistant\n"),
        (A, "Done.<|im_end|>\n"),
    ]  # fmt: skip
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


QWEN_MESSAGES = [
    {"role": "user", "content": "Add 2 and 3."},
    {"role": "assistant", "content": '<think>\nuse calc\n</think>\n\n<tool_call>\n{"name": "calc", "arguments": {"expr": "2+3"}}\n</tool_call>'},
    {"role": "user", "content": "<tool_response>\n5\n</tool_response>"},
    {"role": "user", "content": "Result: <tool_response>5</tool_response> ok?"},
    {"role": "assistant", "content": "The sum is 5."},
]  # fmt: skip


def test_chat_qwen_inline_tool_call_and_tool_response():
    enc = encode_chat(QWEN_MESSAGES)
    expected = [
        (P, "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n"),
        (R, "<think>\nuse calc\n</think>\n\n"),
        (A, '<tool_call>\n{"name": "calc", "arguments": {"expr": "2+3"}}\n</tool_call><|im_end|>\n'),
        # a user turn holding only tool responses is an observation turn
        (O, "<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n"),
        (P, "<|im_start|>user\nResult: "),
        (O, "<tool_response>5</tool_response>"),
        (P, " ok?<|im_end|>\n<|im_start|>assistant\n"),
        (A, "The sum is 5.<|im_end|>\n"),
    ]  # fmt: skip
    assert pieces(enc) == expected
    assert enc.spans.tolist() == byte_spans(expected)
    check_alignment(enc)


def test_chat_content_parts_lists():
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Q?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<think>r</think>"}, {"type": "text", "text": "A."}]},
    ]  # fmt: skip
    assert pieces(encode_chat(messages)) == [
        (P, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n"
            "<|im_start|>assistant\n"),
        (R, "<think>\nr\n</think>\n\n"),
        (A, "A.<|im_end|>\n"),
    ]  # fmt: skip


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
        {"role": "assistant", "content": "<think>t</think>", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "r"},
        {"role": "environment", "content": "e"},
        {"role": "assistant", "content": "ok"},
    ]  # fmt: skip
    text, char_spans = render_chat(messages, fmt)
    assert [(k, text[s:e]) for s, e, k in char_spans] == [
        (P, "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSys.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nGo.<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        (R, "<think>\nt\n</think>\n\n"),
        (A, '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call><|eot_id|>'),
        (O, "<|start_header_id|>tool<|end_header_id|>\n\nr<|eot_id|>"
            "<|start_header_id|>environment<|end_header_id|>\n\ne<|eot_id|>"),
        (P, "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        (A, "ok<|eot_id|>"),
    ]  # fmt: skip
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
    ([{"role": "user", "content": "q"}, {"role": "assistant"}], 1, None, "no content and no tool_calls"),
    ([{"role": "user"}], 0, None, "has no content"),
    ([{"role": "tool", "content": None}], 0, None, "has no content"),
    ([{"role": "assistant", "content": "  <think>abc"}], 0, 2, "unclosed <think>"),
    ([{"role": "assistant", "content": "ok <think>abc"}], 0, 3, "unclosed <think>"),
    ([{"role": "assistant", "content": 'ok <tool_call>{"name": "f"}'}], 0, 3, "unclosed <tool_call>"),
    ([{"role": "assistant", "content": "done</tool_call>"}], 0, 4, "</tool_call> without an opening tag"),
    ([{"role": "user", "content": "x <tool_response>5"}], 0, 2, "unclosed <tool_response>"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}], 1, None, "tool_calls[0] has no function name"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": '{"city": "Paris"'}}]}], 0, 16, "tool_calls[0].function.arguments is not valid JSON"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}], 0, 0, "must be a JSON object"),
    ([{"role": "assistant", "content": '<tool_call>{"name": "f", "arguments": {x}}</tool_call>'}], 0, 39, "JSON inside <tool_call> is not valid JSON"),
    ([{"role": "assistant", "content": 'Hi <tool_call>\n{"arguments": {}}\n</tool_call>'}], 0, 15, "<tool_call> has no function name"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], 0, None, "only text parts"),
    ([{"role": "assistant", "content": "a", "reasoning_content": 3}], 0, None, "reasoning_content must be a string"),
    # text UTF-8 cannot encode, arguments JSON cannot represent
    ([{"role": "user", "content": "hi \ud83d"}], 0, 3, "lone surrogate U+D83D"),
    ([{"role": "assistant", "content": "a", "reasoning_content": "r\udc80"}], 0, 1, "lone surrogate U+DC80"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": {"x": float("nan")}}}]}], 1, None, "tool_calls[0] cannot be rendered as valid JSON"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": '{"x": NaN}'}}]}], 0, 0, "holds NaN, which is not valid JSON"),
    ([{"role": "assistant", "content": '<tool_call>{"name": "f", "arguments": {"x": -Infinity}}</tool_call>'}], 0, 11, "holds -Infinity"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": {"x": {1}}}}]}], 0, None, "tool_calls[0] arguments are not JSON-serialisable"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": {"x": "\ud83d"}}}]}], 0, None, "tool_calls[0]: lone surrogate"),
]  # fmt: skip


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


def test_lone_surrogates_are_trajectory_errors_with_the_position():
    text = "Q\nThought: a \ud83d\nAction: finish[1]\n"
    with pytest.raises(TrajectoryError) as info:
        encode_react(text)
    assert (info.value.line, info.value.column) == (2, len("Thought: a ") + 1)
    assert "lone surrogate U+D83D" in str(info.value)
    str(info.value).encode("utf-8")  # the quoted line is printable
    with pytest.raises(TrajectoryError, match="prompt, character 1: lone surrogate"):
        encode_react(REACT, prompt="P\ud800")
    with pytest.raises(TrajectoryError, match=r"segments\[1\], character 2: lone surrogate"):
        encode_segments([("a", P), ("bc\udfff", R)])
    header = "<|im_start|>system\nS"  # a surrogate in the template: the rendered text's position
    with pytest.raises(TrajectoryError, match=f"the rendered text, character {len(header)}:"):
        encode_chat(QWEN_MESSAGES, format=ChatFormat(default_system="S\ud800"))


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


# ---------------------------------------------------------------- random ReAct trajectories

_free = st.text(st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=12)
_step = st.one_of(
    st.tuples(st.just("thought"), st.sampled_from(["Thought:", "Reasoning:", "Thought 3:"]), _free,
              st.lists(_free.map(lambda s: "- " + s), max_size=2)),
    st.tuples(st.just("action"), st.sampled_from(["Action:", "Action 12:"]),
              st.tuples(st.from_regex(r"[a-z_]{1,8}", fullmatch=True).filter(lambda t: t != "finish"),
                        st.text(st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=10)),
              st.just([])),
    st.tuples(st.just("observation"), st.sampled_from(["Observation:"]), _free,
              st.lists(_free.map(lambda s: "> " + s), max_size=2)),
)  # fmt: skip


@given(
    prompt=st.lists(_free.map(lambda s: "- " + s), max_size=3),
    steps=st.lists(_step, max_size=6),
    indent=st.sampled_from(["", "  ", "\t"]),
    finish=st.one_of(st.none(), _free.filter(lambda s: "\r" not in s)),
    final_newline=st.booleans(),
)
def test_random_react_trajectories_round_trip(prompt, steps, indent, finish, final_newline):
    span_of = {"thought": R, "action": A, "observation": O}
    lines: list[tuple[int, str]] = [(P, line) for line in prompt]
    actions = []
    for kind, prefix, body, more in steps:
        if kind == "action":
            tool, args = body
            body = f"{tool}[{args}]"
            actions.append((tool, args))
        if kind == "observation" and all(k == P for k, _ in lines):
            continue  # an observation before the first step would be prompt text
        lines.append((span_of[kind], f"{indent}{prefix} {body}"))
        lines.extend((span_of[kind], m) for m in more)
    if finish is not None:
        lines.append((A, f"Action: finish[{finish}]"))
        actions.append(("finish", finish))
    if not lines:
        lines = [(P, "- nothing")]
    text = "\n".join(line for _, line in lines) + ("\n" if final_newline else "")
    if not text.strip():
        return
    expected: list[tuple[int, str]] = []
    for n, (k, line) in enumerate(lines):
        piece = line + ("\n" if n < len(lines) - 1 or final_newline else "")
        if expected and expected[-1][0] == k:
            expected[-1] = (k, expected[-1][1] + piece)
        elif piece:
            expected.append((k, piece))
    enc = encode_react(text, allow_missing=True)
    assert pieces(enc) == expected
    assert react_segments(text)[1] == actions
    assert enc.spans.tolist() == [P, *byte_spans(expected), expected[-1][0]]
    check_alignment(enc)
    ids = enc.input_ids.tolist()
    for s, e, _ in enc.char_spans:
        inside = [i for i, (a, b) in zip(ids, enc.offsets, strict=True) if s <= a < e and b <= e]
        assert TOK.decode(inside) == text[s:e]
    assert TOK.decode(enc.input_ids) == text
    cut = encode_react(text, allow_missing=True, max_length=7, truncation="left")
    assert torch.equal(cut.spans, enc.spans[-7:]) and torch.equal(cut.labels, enc.labels[-7:])


# ---------------------------------------------------------------- segments, collate, imports


def test_encode_segments_for_custom_formats():
    enc = encode_segments([("Q: ", P), ("think ", R), ("", O), ("do", A)], add_eos=True)
    assert pieces(enc) == [(P, "Q: "), (R, "think "), (A, "do")]
    assert enc.spans.tolist() == [P] * 3 + [R] * 6 + [A] * 2 + [A]
    with pytest.raises(ValueError, match="span id"):
        encode_segments([("x", 5000)])
    with pytest.raises(TrajectoryError, match="empty"):
        encode_segments([])


def test_collate_pads_right():
    a = encode_react(REACT)
    b = encode_chat(QWEN_MESSAGES, max_length=100)
    batch = collate([a, b], pad_id=TOK.pad_id)
    n = max(len(a), len(b))
    assert set(batch) == {"input_ids", "labels", "spans", "attention_mask"}
    for key in ("input_ids", "labels", "spans"):
        assert batch[key].shape == (2, n) and batch[key].dtype == torch.int64
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["attention_mask"].sum(1).tolist() == [len(a), len(b)]
    assert torch.equal(batch["input_ids"][1, :100], b.input_ids)
    assert torch.equal(batch["spans"][1, :100], b.spans)
    assert (batch["input_ids"][1, 100:] == 256).all()
    assert (batch["labels"][1, 100:] == -100).all()
    assert (batch["spans"][1, 100:] == P).all()
    assert torch.equal(batch["labels"][0], a.labels)
    padded = collate([a.to_dict(), b], pad_to_multiple_of=64)
    assert padded["input_ids"].shape == (2, 64 * -(-n // 64))
    assert (padded["input_ids"][1, 100:] == 0).all()  # default pad id
    with pytest.raises(ValueError, match="non-empty"):
        collate([])
    with pytest.raises(TypeError, match="Encoded"):
        collate([{"input_ids": a.input_ids}])


def test_collate_pads_a_stored_top_k_teacher():
    from kdcore.train import topk_logprobs

    g = torch.Generator().manual_seed(4)
    items, vocab, k = [encode_react(REACT), encode_chat(QWEN_MESSAGES, max_length=100)], 300, 5
    for item in items:
        ids, lps = topk_logprobs(torch.randn(len(item), vocab, generator=g), k, temperature=2.0)
        item_dict = item.to_dict()
        item_dict.update(teacher_ids=ids, teacher_logprobs=lps)
        items[items.index(item)] = item_dict
    batch = collate(items, pad_id=TOK.pad_id)
    n = batch["input_ids"].shape[1]
    assert batch["teacher_ids"].shape == batch["teacher_logprobs"].shape == (2, n, k)
    assert batch["teacher_ids"].dtype == torch.int32
    assert torch.equal(batch["teacher_ids"][1, :100], items[1]["teacher_ids"])
    assert torch.equal(batch["teacher_logprobs"][1, :100], items[1]["teacher_logprobs"])
    assert (batch["teacher_ids"][1, 100:] == torch.arange(k, dtype=torch.int32)).all()
    assert torch.isneginf(batch["teacher_logprobs"][1, 100:]).all()
    # The padded batch scores exactly the items' own rows (padding is masked).
    s = torch.randn(2, n, vocab, generator=g)
    shifted = dict(labels=batch["labels"][:, 1:], reduction="sum", temperature=2.0)
    got = kdcore.sparse_kl_loss(s[:, :-1], batch["teacher_ids"][:, :-1],
                                batch["teacher_logprobs"][:, :-1], **shifted)  # fmt: skip
    want = sum(
        kdcore.sparse_kl_loss(
            s[b, : len(it["labels"]) - 1],
            it["teacher_ids"][:-1],
            it["teacher_logprobs"][:-1],
            labels=it["labels"][1:],
            reduction="sum",
            temperature=2.0,
        )  # fmt: skip
        for b, it in enumerate(items)
    )
    assert torch.allclose(got, want, rtol=1e-5)
    with pytest.raises(ValueError, match=r"batch\[1\] has no"):
        collate([items[0], encode_react(REACT)])
    with pytest.raises(ValueError, match="only one of"):
        collate([{k: v for k, v in items[0].items() if k != "teacher_logprobs"}])
    with pytest.raises(ValueError, match="must both be \\(L, k\\)"):
        collate([{**items[0], "teacher_ids": items[0]["teacher_ids"][:-1]}])


def test_collate_takes_one_sequence_per_item():
    ids = torch.arange(5)
    row = {"input_ids": ids[None], "labels": ids[None], "spans": torch.zeros(1, 5, dtype=int)}
    batch = collate([row, {k: v[0, :3] for k, v in row.items()}], pad_id=np.int64(9))
    assert batch["input_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 9, 9]]
    assert batch["attention_mask"].sum(1).tolist() == [5, 3]
    two_rows = torch.arange(10).reshape(2, 5)
    item = {"input_ids": two_rows, "labels": two_rows, "spans": two_rows}
    with pytest.raises(ValueError, match=r"batch\[1\]\['input_ids'\].*shape \(2, 5\)"):
        collate([row, item])
    with pytest.raises(ValueError, match=r"batch\[0\]\['spans'\].*shape \(\)"):
        collate([{**row, "spans": torch.tensor(0)}])
    with pytest.raises(TypeError, match=r"batch\[0\]\['labels'\] must hold integers"):
        collate([{**row, "labels": ids.float()}])
    for bad in (True, 1.0, None):
        with pytest.raises(TypeError, match="pad_id must be an int"):
            collate([row], pad_id=bad)


def test_import_is_light():
    code = (
        "import sys, kdcore.agent\n"
        "heavy = {'transformers', 'tokenizers', 'triton'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
