"""The built-in byte tokenizer and the adapter that gets ids and character
offsets out of any supported tokenizer."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch

Offsets = list[tuple[int, int]]


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0..255) plus PAD=256, BOS=257, EOS=258.

    Needs no download and never fails on any text, so it is the default of
    :func:`encode_react` / :func:`encode_chat`. Calling it like a Hugging Face
    fast tokenizer with ``return_offsets_mapping=True`` gives **character**
    offsets into the text: every byte of a multi-byte character maps to that
    character's ``(start, end)``.
    """

    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258

    # Hugging Face spelling of the same ids.
    @property
    def pad_token_id(self) -> int:
        return self.pad_id

    @property
    def bos_token_id(self) -> int:
        return self.bos_id

    @property
    def eos_token_id(self) -> int:
        return self.eos_id

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259, pad_id=256, bos_id=257, eos_id=258)"

    def encode(self, text: str) -> list[int]:
        """The bytes of ``text.encode("utf-8")``, no special tokens."""
        return list(_utf8(text))

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Bytes back to text; PAD/BOS/EOS are skipped, invalid UTF-8 becomes U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        out = bytearray()
        for raw in ids:
            i = int(raw)
            if 0 <= i < 256:
                out.append(i)
            elif (piece := self._piece(i)) is not None:
                out += piece
            elif not self.pad_id <= i <= self.eos_id:
                name = type(self).__name__
                raise ValueError(f"{i} is not a {name} id (0..{self.vocab_size - 1})")
        return out.decode("utf-8", errors="replace")

    def _piece(self, token: int) -> bytes | None:
        """The bytes of a multi-byte token (a subclass's vocabulary); None here."""
        return None

    def __call__(
        self,
        text: str,
        return_offsets_mapping: bool = False,
        add_special_tokens: bool = False,
    ) -> dict[str, list]:
        """``{"input_ids": [...]}`` plus ``"offset_mapping"`` when asked.

        ``add_special_tokens=True`` wraps the ids in BOS ... EOS with offsets
        ``(0, 0)`` as Hugging Face tokenizers give special tokens.
        """
        data = _utf8(text)
        ids = list(data)
        out: dict[str, list] = {"input_ids": ids}
        if return_offsets_mapping:
            if len(data) == len(text):  # all ASCII
                offsets = [(i, i + 1) for i in range(len(text))]
            else:
                offsets = []
                for i, ch in enumerate(text):
                    offsets.extend([(i, i + 1)] * len(ch.encode("utf-8")))
            out["offset_mapping"] = offsets
        if add_special_tokens:
            ids.insert(0, self.bos_id)
            ids.append(self.eos_id)
            if return_offsets_mapping:
                out["offset_mapping"] = [(0, 0), *out["offset_mapping"], (0, 0)]
        return out


def _utf8(text: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return text.encode("utf-8")


def token_offsets(tokenizer: Any, text: str) -> tuple[list[int], Offsets]:
    """Token ids of ``text`` (no special tokens added) and their character offsets.

    ``tokenizer``: a :class:`ByteTokenizer`, a Hugging Face fast tokenizer (any
    callable taking ``return_offsets_mapping=True, add_special_tokens=False``
    and returning ``input_ids`` and ``offset_mapping``), or a
    ``tokenizers.Tokenizer`` (anything whose ``encode(text)`` returns an object
    with ``.ids`` and ``.offsets``).
    """
    if callable(tokenizer):
        try:
            out = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        except NotImplementedError as exc:  # transformers' slow (Python) tokenizers
            raise TypeError(
                f"{type(tokenizer).__name__} cannot return an offset mapping; "
                "use a fast tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True))"
            ) from exc
        try:
            ids, offsets = out["input_ids"], out["offset_mapping"]
        except (KeyError, TypeError) as exc:
            raise TypeError(
                f"calling {type(tokenizer).__name__}(text, return_offsets_mapping=True) must "
                "return a mapping with 'input_ids' and 'offset_mapping'"
            ) from exc
    elif hasattr(tokenizer, "encode"):
        if type(tokenizer).__module__.split(".")[0] == "tokenizers":
            enc = tokenizer.encode(text, add_special_tokens=False)
        else:
            enc = tokenizer.encode(text)
        try:
            ids, offsets = enc.ids, enc.offsets
        except AttributeError as exc:
            raise TypeError(
                f"{type(tokenizer).__name__}.encode(text) must return an object with "
                "'.ids' and '.offsets' (as tokenizers.Tokenizer does)"
            ) from exc
    else:
        raise TypeError(
            "tokenizer must be None, a kdcore.agent.ByteTokenizer, a Hugging Face fast "
            f"tokenizer or a tokenizers.Tokenizer, got {type(tokenizer).__name__}"
        )
    try:
        ids = [operator.index(i) for i in _as_list(ids)]
        pairs = [(a, b) for a, b in _as_list(offsets)]
    except (TypeError, ValueError) as exc:
        raise TypeError(
            "the tokenizer must return, for one text, a flat list of integer ids and a list "
            "of (start, end) character offsets"
        ) from exc
    offsets = [_offset_pair(pair, k) for k, pair in enumerate(pairs)]
    if len(ids) != len(offsets):
        raise ValueError(f"tokenizer returned {len(ids)} ids but {len(offsets)} offsets")
    n = len(text)
    for k, pair in enumerate(offsets):
        if not 0 <= pair[0] <= pair[1] <= n:
            raise ValueError(
                f"tokenizer returned offset {pair} for token {k}, outside the text "
                f"(length {n}); kdcore needs character offsets" + _byte_hint(text, offsets)
            )
    return ids, offsets


def _offset_pair(pair: tuple[Any, Any], k: int) -> tuple[int, int]:
    """Integer (start, end); a float offset (even 3.0) is refused, never truncated."""
    try:
        return operator.index(pair[0]), operator.index(pair[1])
    except TypeError:
        raise TypeError(
            f"tokenizer returned offset {tuple(pair)} for token {k}: offsets must be integer "
            "character positions"
        ) from None


def _byte_hint(text: str, offsets: Offsets) -> str:
    """Why offsets overshoot the text, when they look like UTF-8 byte offsets."""
    n_bytes = len(text.encode("utf-8", "surrogatepass"))
    if n_bytes != len(text) and max(b for _, b in offsets) <= n_bytes:
        return (
            f"; these look like UTF-8 byte offsets (the text is {n_bytes} bytes, "
            f"{len(text)} characters): convert them to character offsets"
        )
    return ""


def _as_list(values: Any) -> list:
    if hasattr(values, "tolist"):  # tensors, numpy arrays
        values = values.tolist()
    return list(values)


def special_id(tokenizer: Any, name: str) -> int | None:
    """``tokenizer.<name>_token_id`` or ``.<name>_id`` (name: bos, eos, pad), else None."""
    for attr in (f"{name}_token_id", f"{name}_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
