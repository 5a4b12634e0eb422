"""From a rendered text and its character spans to token ids, labels and span ids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import _validate
from ..spans import Span, span_name
from .errors import TrajectoryError, reject_lone_surrogate
from .segments import CharSpans, SegmentBuilder, span_of_token
from .tokenizer import ByteTokenizer, special_id, token_offsets

IGNORE_INDEX = -100
TRUNCATION = ("right", "left")

_DEFAULT_TOKENIZER = ByteTokenizer()


@dataclass(frozen=True, eq=False, repr=False)
class Encoded:
    """One tokenized trajectory.

    ``input_ids``, ``labels`` and ``spans`` are aligned ``(L,)`` int64 tensors:
    ``labels[i]`` is ``input_ids[i]`` where the token's span has a positive
    weight and -100 elsewhere (Hugging Face convention: the model shifts by
    one). ``text`` is the whole rendered text and ``char_spans`` its
    ``(start, end, span id)`` segmentation (before truncation); ``offsets`` are
    the kept tokens' character offsets (BOS ``(0, 0)``, EOS ``(len, len)``).
    ``truncated`` counts the tokens that ``max_length`` dropped.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    spans: torch.Tensor
    text: str
    char_spans: list[tuple[int, int, int]]
    offsets: list[tuple[int, int]]
    truncated: int = 0

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __repr__(self) -> str:
        counts = {getattr(k, "name", k): n for k, n in self.span_counts().items()}
        # Position 0 is never a target once the loss shifts by one.
        learned = int((self.labels[1:] != IGNORE_INDEX).sum())
        return (
            f"Encoded(tokens={len(self)}, labelled={learned}, spans={counts}, "
            f"chars={len(self.text)}, truncated={self.truncated})"
        )

    def span_counts(self) -> dict[int, int]:
        """Number of tokens of each span id present, e.g. ``{Span.PROMPT: 12, ...}``."""
        ids, counts = torch.unique(self.spans, return_counts=True)
        return {span_name(int(i)): int(c) for i, c in zip(ids, counts, strict=True)}

    def pieces(self) -> list[tuple[int, str]]:
        """``[(span, text), ...]`` of the rendered text, for reading what got which span."""
        return [(span_name(k), self.text[s:e]) for s, e, k in self.char_spans]

    def to_dict(self) -> dict[str, torch.Tensor]:
        """``{"input_ids", "labels", "spans"}``; what :func:`collate` also accepts."""
        return {"input_ids": self.input_ids, "labels": self.labels, "spans": self.spans}


def encode_segments(
    segments: Sequence[tuple[str, int]],
    tokenizer: Any = None,
    *,
    span_weights: Mapping[int, float] | None = None,
    max_length: int | None = None,
    truncation: str = "right",
    add_bos: bool = False,
    add_eos: bool = False,
    allow_missing: bool = False,
) -> Encoded:
    """Encodes a text given as ``[(piece, span id), ...]`` (for formats of your own).

    The pieces are concatenated and tokenized as one text; the other arguments
    are those of :func:`encode_react`.
    """
    builder = SegmentBuilder()
    for k, item in enumerate(segments):
        try:
            piece, span = item
        except (TypeError, ValueError) as exc:
            raise TypeError(f"segments[{k}] must be a (text, span id) pair") from exc
        if not isinstance(piece, str):
            raise TypeError(f"segments[{k}] text must be a str, got {type(piece).__name__}")
        reject_lone_surrogate(piece, f"segments[{k}]")
        builder.add(piece, _span_id(span, f"segments[{k}]"))
    text, char_spans = builder.build()
    if not text.strip():
        raise TrajectoryError("empty trajectory: the segments have no text")
    return encode_text(
        text,
        char_spans,
        tokenizer,
        span_weights=span_weights,
        max_length=max_length,
        truncation=truncation,
        add_bos=add_bos,
        add_eos=add_eos,
        allow_missing=allow_missing,
    )


def _span_id(span: object, where: str) -> int:
    if isinstance(span, bool) or not isinstance(span, int) or not 0 <= span <= 1023:
        raise ValueError(f"{where}: span id must be an int in [0, 1023], got {span!r}")
    return int(span)


def check_options(max_length: int | None, truncation: str) -> None:
    if max_length is not None and (
        isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
    ):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be 'right' or 'left', got {truncation!r}")


def encode_text(
    text: str,
    char_spans: CharSpans,
    tokenizer: Any,
    *,
    span_weights: Mapping[int, float] | None,
    max_length: int | None,
    truncation: str,
    add_bos: bool,
    add_eos: bool,
    allow_missing: bool,
) -> Encoded:
    """The shared back end: tokenize ``text`` once, give every token the span of
    its first non-whitespace character, label, add BOS/EOS, truncate, check."""
    check_options(max_length, truncation)
    reject_lone_surrogate(text, "the rendered text")  # callers name the source; this is the net
    weights = _validate.span_weights(span_weights)
    tok = _DEFAULT_TOKENIZER if tokenizer is None else tokenizer
    ids, offsets = token_offsets(tok, text)
    starts = [s for s, _, _ in char_spans]
    spans = [span_of_token(text, starts, char_spans, s, e) for s, e in offsets]
    if add_bos and (bos := special_id(tok, "bos")) is not None:
        ids.insert(0, bos)
        offsets.insert(0, (0, 0))
        spans.insert(0, int(Span.PROMPT))  # input only: nothing predicts it
    if add_eos and (eos := special_id(tok, "eos")) is not None:
        ids.append(eos)
        offsets.append((len(text), len(text)))
        spans.append(char_spans[-1][2])  # stopping belongs to the last segment
    labels = [
        i if weights.get(k, 0.0) > 0 else IGNORE_INDEX for i, k in zip(ids, spans, strict=True)
    ]
    dropped = 0
    if max_length is not None and len(ids) > max_length:
        dropped = len(ids) - max_length
        keep = slice(0, max_length) if truncation == "right" else slice(dropped, None)
        ids, labels, spans, offsets = ids[keep], labels[keep], spans[keep], offsets[keep]
    if not allow_missing:
        _check_present(spans, max_length if dropped else None, truncation)
    return Encoded(
        input_ids=torch.tensor(ids, dtype=torch.int64),
        labels=torch.tensor(labels, dtype=torch.int64),
        spans=torch.tensor(spans, dtype=torch.int64),
        text=text,
        char_spans=list(char_spans),
        offsets=list(offsets),
        truncated=dropped,
    )


def _check_present(spans: list[int], max_length: int | None, truncation: str) -> None:
    # Only positions 1.. are predicted after the loss's shift by one, so a span
    # kept only at position 0 (left truncation) teaches nothing.
    targets = set(spans[1:])
    missing = [s for s in (Span.REASON, Span.ACT) if s not in targets]
    if not missing:
        return
    what = " and ".join(s.name for s in missing)
    after = (
        f" after truncation to max_length={max_length} (truncation={truncation!r})"
        if max_length is not None
        else ""
    )
    first = (
        f" (the first token is {Span(spans[0]).name}, but no position predicts it)"
        if spans and spans[0] in missing
        else ""
    )
    raise TrajectoryError(
        f"the trajectory has no {what} tokens{after}{first}; a span-level distillation "
        "example needs reasoning and actions. Pass allow_missing=True to accept it"
    )
