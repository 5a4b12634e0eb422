"""The demo's word/number tokenizer: lossless, character offsets, spans that match the bytes'."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kdcore.agent import ByteTokenizer, encode_react
from kdcore.agent.tokenizer import token_offsets
from kdcore.demo.model import ModelConfig
from kdcore.demo.task import make_problems, oracle_trajectory
from kdcore.demo.tokenizer import VOCAB_SIZE, DemoTokenizer

TOK = DemoTokenizer()


@given(st.text(max_size=80))
def test_any_text_round_trips_with_character_offsets(text):
    ids = TOK.encode(text)
    assert TOK.decode(ids) == text
    assert all(0 <= i < TOK.vocab_size and not TOK.is_special(i) for i in ids)
    out = TOK(text, return_offsets_mapping=True)
    assert out["input_ids"] == ids
    offsets = out["offset_mapping"]
    assert len(offsets) == len(ids)
    # Character spans in order, without gaps; the bytes of one character share its span.
    covered = 0
    for k, (start, end) in enumerate(offsets):
        assert start < end <= len(text)
        assert start == covered or (start, end) == tuple(offsets[k - 1])
        covered = end
    assert covered == len(text)


@given(st.integers(0, 999))
def test_a_number_up_to_three_digits_is_one_token(n):
    assert len(TOK.encode(str(n))) == 1
    assert len(TOK.encode(f" calc[{n}*{n}]")) == 6  # " calc" [ n * n ]
    assert TOK.encode(str(n)) != TOK.encode(str((n + 1) % 1000))


def test_longer_numbers_split_into_groups_of_three_and_unknown_words_into_bytes():
    assert [TOK.decode([i]) for i in TOK.encode("1234567")] == ["123", "456", "7"]
    assert TOK.encode(" zebra") == list(b" zebra")  # not a word of the task
    assert TOK.encode("Ünï") == list("Ünï".encode())
    assert len(TOK.encode(" pens")) == 1 and len(TOK.encode("Observation")) == 1


def test_every_word_of_the_task_is_one_token():
    pieces = set()
    for p in make_problems(500, 0):
        pieces |= set(re.findall(r" ?[A-Za-z]+", oracle_trajectory(p)))
    assert all(len(TOK.encode(w)) == 1 for w in pieces), sorted(
        w for w in pieces if len(TOK.encode(w)) != 1
    )


def test_trajectories_are_about_three_times_shorter_than_bytes():
    texts = [oracle_trajectory(p) for p in make_problems(200, 0)]
    words = sum(len(TOK.encode(t)) for t in texts)
    raw = sum(len(t.encode()) for t in texts)
    assert raw / words > 2.0


def test_specials_and_bad_ids():
    assert (TOK.pad_id, TOK.bos_id, TOK.eos_id) == (256, 257, 258)
    assert TOK.vocab_size == VOCAB_SIZE == len(TOK) == ModelConfig().vocab_size
    assert TOK.decode([TOK.bos_id, *TOK.encode("Thought: hi"), TOK.eos_id]) == "Thought: hi"
    assert TOK.decode(torch.tensor(TOK.encode("12 pens"))) == "12 pens"
    with pytest.raises(ValueError, match="not a DemoTokenizer id"):
        TOK.decode([VOCAB_SIZE])
    with pytest.raises(TypeError, match="str"):
        TOK.encode(b"bytes")  # type: ignore[arg-type]
    out = TOK("5", add_special_tokens=True, return_offsets_mapping=True)
    assert out["input_ids"][0] == TOK.bos_id and out["input_ids"][-1] == TOK.eos_id
    assert out["offset_mapping"][0] == out["offset_mapping"][-1] == (0, 0)


def test_spans_of_a_trajectory_agree_with_the_byte_tokenizer():
    """The span of each word token is the span of the bytes it covers (an
    independent tokenization of the same text)."""
    for p in make_problems(30, 4):
        text = oracle_trajectory(p)
        words = encode_react(text, TOK)
        raw = encode_react(text, ByteTokenizer())
        _, offsets = token_offsets(TOK, text)
        # Position 0 is BOS in both; then one entry per token.
        assert words.input_ids[0] == TOK.bos_id
        for k, (start, end) in enumerate(offsets, start=1):
            byte_spans = set(raw.spans[1 + start : 1 + end].tolist())
            assert byte_spans == {int(words.spans[k])}, (text[start:end], byte_spans)
