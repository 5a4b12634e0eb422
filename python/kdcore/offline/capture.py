"""``kdcore.offline.capture``: run a teacher once and store its top-k distributions."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .. import _validate
from ..train.distiller import model_logits
from ..train.offline import topk_logprobs
from . import writer

DEFAULT_SHARD_TOKENS = 1 << 18
#: fp32 elements of logits turned into log-probabilities at once (256 MiB).
_CHUNK_ELEMENTS = 1 << 26


def capture(
    teacher: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    k: int = 64,
    temperature: float = 1.0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    teacher_name: str | None = None,
    tokenizer_fingerprint: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs ``teacher`` on ``batches`` and stores its top-k log-probabilities in ``out_dir``.

    ``batches`` yields mappings with ``input_ids`` (B, L) and optionally
    ``attention_mask`` (B, L) (other keys, such as ``labels``, are ignored).
    A sequence is its tokens where the mask is set (all of them without a
    mask); for each of its positions t but the last, the ``k`` most likely
    tokens of ``softmax(logits[t] / temperature)`` and their
    log-probabilities are stored — row t is the teacher's distribution for
    token t + 1. The teacher runs in eval mode without gradients, under bf16
    autocast on CUDA.

    Shards of about ``shard_tokens`` tokens (whole batches) are written
    atomically, each followed by ``manifest.json``. After an interruption,
    calling ``capture`` again with the same batches and ``out_dir`` checks
    the finished shards' inputs, skips them without running the teacher and
    goes on: the result is the one an uninterrupted capture writes (a
    finished shard found damaged is captured again, with the ones after
    it). The settings and the batches must be the same (a clear error
    otherwise).
    ``teacher_name`` (default: a Hugging Face model's ``name_or_path``, else
    the class name) and ``tokenizer_fingerprint`` (see
    :func:`kdcore.offline.tokenizer_fingerprint`) go into the manifest.

    Returns the manifest (a dict). The format is in docs/offline.md.
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int; got {k!r}")
    t = float(_validate.temperature(temperature))
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"shard_tokens must be a positive int; got {shard_tokens!r}")
    if tokenizer_fingerprint is not None and not isinstance(tokenizer_fingerprint, str):
        raise TypeError(
            "tokenizer_fingerprint must be a str (kdcore.offline.tokenizer_fingerprint)"
        )
    settings = {
        "source": "capture",
        "k": k,
        "temperature": t,
        "shard_tokens": shard_tokens,
        "teacher": teacher_name if teacher_name is not None else _teacher_name(teacher),
        "tokenizer_fingerprint": tokenizer_fingerprint,
    }
    teacher.eval()
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    units = _units(teacher, batches, k, t)
    return writer.run(
        out_dir, units, settings, total=total, progress=progress, description="capture"
    )


def _teacher_name(teacher: nn.Module) -> str:
    for owner in (teacher, getattr(teacher, "config", None)):
        name = getattr(owner, "name_or_path", None) or getattr(owner, "_name_or_path", None)
        if isinstance(name, str) and name:
            return name
    return type(teacher).__name__


def _units(teacher: nn.Module, batches: Iterable, k: int, t: float) -> Iterator[writer.Unit]:
    for n, batch in enumerate(batches):
        ids, keep = _inputs(batch, n)
        sequences = [ids[b][keep[b]].numpy() for b in range(ids.shape[0])]
        for b, tokens in enumerate(sequences):
            if len(tokens) == 0:
                raise ValueError(f"batch {n}: sequence {b} has no tokens (attention_mask all 0)")

        def compute(batch=batch, ids=ids, keep=keep):
            return _teacher_topk(teacher, batch, ids, keep, k, t)

        yield writer.Unit(sequences, compute)


def _inputs(batch: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids int64 (B, L) on the CPU, bool mask of the kept tokens)."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError(f"batch {n} must be a mapping with 'input_ids' (B, L)")
    ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(f"batch {n}: input_ids must be a (batch, sequence) tensor")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"batch {n}: input_ids must hold integers, got {ids.dtype}")
    mask = batch.get("attention_mask")
    if mask is None:
        keep = torch.ones(ids.shape, dtype=torch.bool)
    else:
        if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
            raise ValueError(f"batch {n}: attention_mask must be a tensor shaped like input_ids")
        keep = mask.detach().cpu() != 0
    return ids.detach().cpu().to(torch.int64), keep


def _teacher_device(teacher: nn.Module) -> torch.device:
    for p in teacher.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def _teacher_topk(teacher, batch, ids, keep, k, t):
    device = _teacher_device(teacher)
    inputs = {"input_ids": batch["input_ids"].to(device)}
    if batch.get("attention_mask") is not None:
        inputs["attention_mask"] = batch["attention_mask"].to(device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    with autocast:
        logits = model_logits(teacher, inputs)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != ids.shape:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
        raise ValueError(
            f"the teacher gave logits of shape {shape} for input_ids {tuple(ids.shape)}"
        )
    vocab = logits.shape[-1]
    if k > vocab:
        raise ValueError(f"k = {k} is larger than the teacher's vocabulary ({vocab} tokens)")
    rows = _row_index(keep).to(device)
    flat = logits.reshape(-1, vocab)
    chunk = max(1, _CHUNK_ELEMENTS // vocab)
    out_ids, out_lps = [], []
    for start in range(0, rows.numel(), chunk):
        top, lps = topk_logprobs(flat[rows[start : start + chunk]], k, temperature=t)
        out_ids.append(top.cpu())
        out_lps.append(lps.cpu())
    if not out_ids:
        empty = torch.zeros(0, k)
        return empty.long(), empty, vocab
    return torch.cat(out_ids), torch.cat(out_lps), vocab


def _row_index(keep: torch.Tensor) -> torch.Tensor:
    """Flat (b * L + t) indices of each sequence's kept positions but its last."""
    index = torch.arange(keep.numel()).reshape(keep.shape)
    parts = []
    for b in range(keep.shape[0]):
        kept = index[b][keep[b]]
        parts.append(kept[:-1])
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
