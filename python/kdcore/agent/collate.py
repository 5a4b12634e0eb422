"""Right-padding a list of encoded trajectories into a batch."""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence

import torch

from ..spans import Span
from .encoding import IGNORE_INDEX, Encoded

_KEYS = ("input_ids", "labels", "spans")
#: A stored top-k teacher per token (kdcore.train.topk_logprobs), (L, k) per item.
_TOPK_KEYS = ("teacher_ids", "teacher_logprobs")


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
    gives, is taken as its one sequence). Items that carry a stored top-k
    teacher (``teacher_ids``, ``teacher_logprobs``, ``(L, k)`` each; all items
    or none, one k) give ``(B, L, k)`` tensors of their dtypes, padded with the
    ids 0..k-1 and log-probability -inf (padding is masked; the padded rows
    are still a well-formed teacher). Usable as a DataLoader ``collate_fn``
    through ``functools.partial(collate, pad_id=...)``.
    """
    if isinstance(batch, (Encoded, Mapping)) or not isinstance(batch, Sequence) or not batch:
        raise ValueError("collate needs a non-empty list of Encoded items")
    pad_id = _pad_id(pad_id)
    rows, datas = [], [item.to_dict() if isinstance(item, Encoded) else item for item in batch]
    for k, data in enumerate(datas):
        if not isinstance(data, Mapping) or any(key not in data for key in _KEYS):
            raise TypeError(f"batch[{k}] must be an Encoded or a dict with keys {_KEYS}")
        tensors = [_sequence(data[key], f"batch[{k}][{key!r}]") for key in _KEYS]
        if len({t.shape[0] for t in tensors}) != 1:
            raise ValueError(f"batch[{k}]: input_ids, labels and spans differ in length")
        rows.append(tensors)
    topk = _topk_rows(datas, [r[0].shape[0] for r in rows])
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
    if topk is not None:
        ids, logprobs = topk
        k = ids[0].shape[1]
        out["teacher_ids"] = torch.arange(k, dtype=ids[0].dtype).expand(*shape, k).clone()
        out["teacher_logprobs"] = torch.full((*shape, k), -math.inf, dtype=logprobs[0].dtype)
        for b, (i, lp) in enumerate(zip(ids, logprobs, strict=True)):
            out["teacher_ids"][b, : i.shape[0]] = i
            out["teacher_logprobs"][b, : lp.shape[0]] = lp
    return out


def _topk_rows(datas: list[Mapping], lengths: list[int]):
    """The items' (ids, logprobs) lists of (L_b, k) tensors, or None if no item has them."""
    present = [sum(key in d for key in _TOPK_KEYS) for d in datas]
    if 1 in present:
        raise ValueError(f"batch[{present.index(1)}] has only one of {_TOPK_KEYS}: give both")
    if not any(present):
        return None
    if 0 in present:
        raise ValueError(f"batch[{present.index(0)}] has no {_TOPK_KEYS}: give them for all items")
    ids, logprobs = [], []
    for b, (d, n) in enumerate(zip(datas, lengths, strict=True)):
        i, lp = torch.as_tensor(d["teacher_ids"]), torch.as_tensor(d["teacher_logprobs"])
        if i.dim() == 3 and i.shape[0] == 1:  # a (1, L, k) row
            i, lp = i[0], lp[0]
        if i.dim() != 2 or i.shape != lp.shape or i.shape[0] != n:
            raise ValueError(
                f"batch[{b}]: teacher_ids {tuple(i.shape)} and teacher_logprobs "
                f"{tuple(lp.shape)} must both be (L, k) with L = {n}, the item's length"
            )
        if i.is_floating_point() or i.dtype == torch.bool or not lp.is_floating_point():
            raise TypeError(
                f"batch[{b}]: teacher_ids must hold integers and teacher_logprobs floats, "
                f"got {i.dtype} and {lp.dtype}"
            )
        ids.append(i)
        logprobs.append(lp)
    if len({i.shape[1] for i in ids}) != 1:
        raise ValueError(f"the items' top-k sizes differ: {sorted({i.shape[1] for i in ids})}")
    return ids, logprobs


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
