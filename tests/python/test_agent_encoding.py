"""kdcore.agent.encoding: labels from span weights, trajectories without REASON or
ACT targets, truncation that keeps labels and spans aligned, and encode_segments
for formats of one's own."""

from __future__ import annotations

import pytest
import torch

from agent_helpers import REACT, A, O, P, R, check_alignment, pieces
from kdcore.agent import TrajectoryError, encode_react, encode_segments

# ---------------------------------------------------------------- labels and missing spans


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


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_length": 0}, "max_length"),
        ({"max_length": 2.5}, "max_length"),
        ({"truncation": "middle"}, "truncation"),
    ],
)
def test_bad_truncation_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        encode_react(REACT, **kwargs)


# ---------------------------------------------------------------- encode_segments


def test_encode_segments_for_custom_formats():
    enc = encode_segments([("Q: ", P), ("think ", R), ("", O), ("do", A)], add_eos=True)
    assert pieces(enc) == [(P, "Q: "), (R, "think "), (A, "do")]
    assert enc.spans.tolist() == [P] * 3 + [R] * 6 + [A] * 2 + [A]
    with pytest.raises(ValueError, match="span id"):
        encode_segments([("x", 5000)])
    with pytest.raises(TrajectoryError, match="empty"):
        encode_segments([])
