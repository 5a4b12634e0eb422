"""kdcore.agent.errors: lone surrogates (text UTF-8 cannot encode) as
TrajectoryErrors that name where they are, in ReAct text, a prompt, segments and
a chat template."""

from __future__ import annotations

import pytest

from agent_helpers import QWEN_MESSAGES, REACT, P, R
from kdcore.agent import ChatFormat, TrajectoryError, encode_chat, encode_react, encode_segments


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
