"""kdcore.agent.react: ReAct text to token ids, labels and span ids, the expected
spans written out by hand, piece by piece; custom formats, actions, malformed text
named by line and column, and random trajectories."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from agent_helpers import REACT, TOK, A, O, P, R, byte_spans, check_alignment, pieces
from kdcore.agent import ReactFormat, TrajectoryError, encode_react, parse_action, react_segments

# ---------------------------------------------------------------- ReAct


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
    (
        "Q\nThought: a\nAction: search[kdcore]\nResults: [1, 2, 3]\nAction: finish[1]\n",
        4,
        1,
        "unexpected text after",
    ),
    ("Thought: a\nAction: python[f(\n)]\n> [1]\n", 4, 1, "unexpected text after"),
    ("Thought: a\nAction: python[print('[')\nprint(2)]\n", 2, 15, "unclosed '['"),
    (
        "Thought: a\nAction: finish[1]\nObservation: ok\nThought: more\n",
        4,
        1,
        "after the final action (line 2)",
    ),
    ("Thought: a\nFinal Answer: 1\nAction: calc[1]\n", 3, 1, "after the final action (line 2)"),
]


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


# ---------------------------------------------------------------- random ReAct trajectories


_free = st.text(st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=12)
_step = st.one_of(
    st.tuples(
        st.just("thought"),
        st.sampled_from(["Thought:", "Reasoning:", "Thought 3:"]),
        _free,
        st.lists(_free.map(lambda s: "- " + s), max_size=2),
    ),
    st.tuples(
        st.just("action"),
        st.sampled_from(["Action:", "Action 12:"]),
        st.tuples(
            st.from_regex(r"[a-z_]{1,8}", fullmatch=True).filter(lambda t: t != "finish"),
            st.text(
                st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=10
            ),
        ),
        st.just([]),
    ),
    st.tuples(
        st.just("observation"),
        st.sampled_from(["Observation:"]),
        _free,
        st.lists(_free.map(lambda s: "> " + s), max_size=2),
    ),
)


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
