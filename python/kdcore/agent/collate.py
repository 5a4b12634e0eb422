"""Right-padding a list of encoded trajectories into a batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..spans import Span
from .encoding import IGNORE_INDEX, Encoded

_KEYS = ("input_ids", "labels", "spans")


def collate(
    batch: Sequence[Encoded | Mapping[str, torch.Tensor]],
    pad_id: int = 0,
    *,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pads ``Encoded`` items (or dicts with ``input_ids``, ``labels``,
    ``spans``) to the longest one (rounded up to ``pad_to_multiple_of``).

    Returns ``input_ids`` (padded with ``pad_id``), ``labels`` (padded with
    -100), ``spans`` (padded with ``Span.PROMPT``), each ``(B, L)`` int64, and
    ``attention_mask`` ``(B, L)`` bool, True on real tokens. Usable as a
    DataLoader ``collate_fn`` through ``functools.partial(collate, pad_id=...)``.
    """
    if isinstance(batch, (Encoded, Mapping)) or not isinstance(batch, Sequence) or not batch:
        raise ValueError("collate needs a non-empty list of Encoded items")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int):
        raise TypeError(f"pad_id must be an int, got {type(pad_id).__name__}")
    rows = []
    for k, item in enumerate(batch):
        data = item.to_dict() if isinstance(item, Encoded) else item
        if not isinstance(data, Mapping) or any(key not in data for key in _KEYS):
            raise TypeError(f"batch[{k}] must be an Encoded or a dict with keys {_KEYS}")
        tensors = [torch.as_tensor(data[key]).reshape(-1) for key in _KEYS]
        if len({t.shape[0] for t in tensors}) != 1:
            raise ValueError(f"batch[{k}]: input_ids, labels and spans differ in length")
        rows.append(tensors)
    length = max(r[0].shape[0] for r in rows)
    if pad_to_multiple_of is not None:
        if isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int):
            raise TypeError("pad_to_multiple_of must be a positive int or None")
        if pad_to_multiple_of < 1:
            raise ValueError("pad_to_multiple_of must be a positive int or None")
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    shape = (len(rows), length)
    out = {
        "input_ids": torch.full(shape, pad_id, dtype=torch.int64),
        "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.int64),
        "spans": torch.full(shape, int(Span.PROMPT), dtype=torch.int64),
        "attention_mask": torch.zeros(shape, dtype=torch.bool),
    }
    for b, tensors in enumerate(rows):
        n = tensors[0].shape[0]
        for key, t in zip(_KEYS, tensors, strict=True):
            out[key][b, :n] = t
        out["attention_mask"][b, :n] = True
    return out
