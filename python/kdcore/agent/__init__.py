"""Agent trajectories to token ids, labels and per-token span ids.

>>> from kdcore.agent import ByteTokenizer, encode_react, collate
>>> enc = encode_react("Question: 2+3?\\nThought: add.\\nAction: finish[5]\\n")
>>> batch = collate([enc], pad_id=ByteTokenizer.pad_id)

Formats: ReAct text (:func:`encode_react`, :class:`ReactFormat`) and chat
messages with tool calls (:func:`encode_chat`, :class:`ChatFormat`); spans
come from character offsets on the fully rendered text through the
tokenizer's offset mapping. See docs/agent.md.
"""

from __future__ import annotations

from .chat import ChatFormat, encode_chat, render_chat
from .collate import collate
from .encoding import IGNORE_INDEX, Encoded, encode_segments
from .errors import TrajectoryError
from .react import ReactFormat, encode_react, parse_action, react_segments
from .tokenizer import ByteTokenizer

__all__ = [
    "IGNORE_INDEX",
    "ByteTokenizer",
    "ChatFormat",
    "Encoded",
    "ReactFormat",
    "TrajectoryError",
    "collate",
    "encode_chat",
    "encode_react",
    "encode_segments",
    "parse_action",
    "react_segments",
    "render_chat",
]
