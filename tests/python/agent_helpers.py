"""Helpers shared by the test_agent_*.py files: span shorthands, the byte
tokenizer, an encoding's pieces and alignment checks, and the texts (ReAct,
chat messages) that several of them encode. Expected spans are written out by
hand, piece by piece."""

from __future__ import annotations

from kdcore import Span
from kdcore.agent import ByteTokenizer, Encoded

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


# ---------------------------------------------------------------- texts


REACT = (
    "Question: What is 2+3?\n"
    "Thought: I should add.\n"
    "Action: calc[2+3]\n"
    "Observation: 5\n"
    "Thought: The answer is 5.\n"
    "Action: finish[5]\n"
)


STRADDLE = "Q: go\nThought: ok\nAction: f[x]\nObservation: y\n  Thought: fine\nAction: finish[x]\n"


QWEN_MESSAGES = [
    {"role": "user", "content": "Add 2 and 3."},
    {
        "role": "assistant",
        "content": '<think>\nuse calc\n</think>\n\n<tool_call>\n{"name": "calc", "arguments": {"expr": "2+3"}}\n</tool_call>',
    },
    {"role": "user", "content": "<tool_response>\n5\n</tool_response>"},
    {"role": "user", "content": "Result: <tool_response>5</tool_response> ok?"},
    {"role": "assistant", "content": "The sum is 5."},
]
