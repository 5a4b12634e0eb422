"""The demo's tokenizer: whole words and whole numbers, bytes for the rest.

Current LLM tokenizers write a number of up to three digits as one token;
a byte tokenizer spells it digit by digit. For the demo's agent the
difference decides what is learnt: the calculator calls copy numbers from
the question and from earlier observations, and a byte-level student of
this size spends most of its budget learning to copy digit strings (a
failed byte-level episode almost always goes wrong inside an operand). With
numbers as single tokens the students learn the agent's behaviour, which is
what the objectives are compared on.

Layout of the ids: 0..255 the UTF-8 bytes (so any text encodes, and an
unknown word falls back to its bytes), then PAD, BOS, EOS, then the numbers
0..999, then the words of the task's templates (each with its leading
space, as byte-pair tokenizers keep it).
"""

from __future__ import annotations

import re

from ..agent import ByteTokenizer

# The word pieces of the task's questions, thoughts and actions. Appending
# words keeps every existing id; reordering or removing them changes the
# ids, and the shipped teacher must then be retrained.
WORDS = (
    "Question Thought Action Observation"
    " Add Count Divide Find First Now Split Subtract Take How"
    " Ann Bob Cy Dee Eli Fay Gus Ida Jo Kim Lu Max"
    " add all among and are away bags beads books boxes buys by calc cards coins"
    " cups does each eggs extra finds finish first get gives has in kid kids left"
    " many more now nuts of pens puts rows shares the them then to total"
)
NUMBERS = 1000
_PIECE = re.compile(r" ?[A-Za-z]+|\d{1,3}|\s|.", re.DOTALL)


def _vocabulary() -> tuple[str, ...]:
    words = WORDS.split()
    starts = ("Question", "Thought", "Action", "Observation")  # only ever begin a line
    pieces = [str(n) for n in range(NUMBERS)]
    pieces += [w if w in starts else " " + w for w in words]
    return tuple(pieces)


_FIRST_PIECE = ByteTokenizer.vocab_size  # the pieces follow the bytes and PAD/BOS/EOS
#: Ids in all: the bytes, PAD/BOS/EOS, then the pieces.
VOCAB_SIZE = _FIRST_PIECE + len(_vocabulary())


class DemoTokenizer(ByteTokenizer):
    """Word/number tokenizer with a byte fallback: the byte tokenizer's ids,
    specials and interface (offsets, Hugging Face spellings), more pieces."""

    _first_piece = _FIRST_PIECE

    def __init__(self) -> None:
        self.pieces = _vocabulary()
        self._ids = {p: self._first_piece + i for i, p in enumerate(self.pieces)}
        self.vocab_size = self._first_piece + len(self.pieces)
        self.newline_id = ord("\n")

    def __repr__(self) -> str:
        return f"DemoTokenizer(vocab_size={self.vocab_size})"

    def is_special(self, token: int) -> bool:
        return self.pad_id <= token <= self.eos_id

    def _tokens(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for match in _PIECE.finditer(text):
            piece, start = match.group(), match.start()
            token = self._ids.get(piece)
            if token is not None:
                ids.append(token)
                offsets.append((start, match.end()))
                continue
            for k, ch in enumerate(piece):  # byte fallback, character offsets
                raw = ch.encode("utf-8")
                ids.extend(raw)
                offsets.extend([(start + k, start + k + 1)] * len(raw))
        return ids, offsets

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens."""
        return self._tokens(text)[0]

    def _piece(self, token: int) -> bytes | None:
        if self._first_piece <= token < self.vocab_size:
            return self.pieces[token - self._first_piece].encode("utf-8")
        return None

    def __call__(
        self, text: str, return_offsets_mapping: bool = False, add_special_tokens: bool = False
    ) -> dict[str, list]:
        """``{"input_ids": [...]}`` plus character ``"offset_mapping"`` when asked."""
        ids, offsets = self._tokens(text)
        if add_special_tokens:
            ids = [self.bos_id, *ids, self.eos_id]
            offsets = [(0, 0), *offsets, (0, 0)]
        out: dict[str, list] = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = offsets
        return out
