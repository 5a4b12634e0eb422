"""Right-padding a list of encoded trajectories into a batch."""

from __future__ import annotations

import operator
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
    ``attention_mask`` ``(B, L)`` bool, True on real tokens. Each item's tensors
    must be 1-D integer sequences (a ``(1, L)`` row, as ``return_tensors="pt"``
    gives, is taken as its one sequence). Usable as a DataLoader ``collate_fn``
    through ``functools.partial(collate, pad_id=...)``.
    """
    if isinstance(batch, (Encoded, Mapping)) or not isinstance(batch, Sequence) or not batch:
        raise ValueError("collate needs a non-empty list of Encoded items")
    pad_id = _pad_id(pad_id)
    rows = []
    for k, item in enumerate(batch):
        data = item.to_dict() if isinstance(item, Encoded) else item
        if not isinstance(data, Mapping) or any(key not in data for key in _KEYS):
            raise TypeError(f"batch[{k}] must be an Encoded or a dict with keys {_KEYS}")
        tensors = [_sequence(data[key], f"batch[{k}][{key!r}]") for key in _KEYS]
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


def _pad_id(value: object) -> int:
    """An int from any integer (``int``, ``np.int64``, a 0-d integer tensor); not a bool."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"pad_id must be an int, got {type(value).__name__}")


def _sequence(value: object, where: str) -> torch.Tensor:
    """``value`` as one 1-D integer sequence; flattening a 2-D item would silently
    join its rows into one sequence, so only a single ``(1, L)`` row is accepted."""
    t = torch.as_tensor(value)
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise ValueError(
            f"{where} must be one sequence: a 1-D tensor (L,) or (1, L); got shape {tuple(t.shape)}"
        )
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{where} must hold integers, got dtype {t.dtype}")
    return t
