"""Prompt log-probabilities from a serving engine (vLLM, SGLang) -> top-k shards.

A teacher served elsewhere scores each training sequence as a prompt and
returns, for every position t >= 1, the most likely tokens at that
position with their log-probabilities (position 0 has none). Position t
is the distribution of token t, i.e. kdcore's row t - 1.

Accepted per position (any mix):

- ``None`` (position 0 only);
- a mapping token id -> log-probability, or -> an object with a
  ``logprob`` attribute (vLLM's ``prompt_logprobs`` entries);
- a sequence of ``(logprob, token_id, ...)`` tuples (SGLang's
  ``input_top_logprobs``).

Engines add the prompt's own token when it is not among the top ones, so a
position may hold more than ``k`` entries: the ``k`` most likely are kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .. import _validate
from . import codec, writer
from .capture import DEFAULT_SHARD_TOKENS


def import_prompt_logprobs(
    records: Iterable[Any],
    out_dir: str | os.PathLike,
    *,
    k: int,
    vocab_size: int,
    temperature: float = 1.0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    teacher_name: str | None = None,
    tokenizer_fingerprint: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Stores serving-engine prompt log-probabilities as top-k shards in ``out_dir``.

    ``records`` yields one sequence each: a vLLM ``RequestOutput`` (its
    ``prompt_token_ids`` and ``prompt_logprobs``), a mapping with
    ``input_ids`` (or ``prompt_token_ids``) and ``prompt_logprobs`` (or
    ``input_top_logprobs``), or a pair ``(input_ids, prompt_logprobs)``.
    ``vocab_size`` is the teacher's (the student's logits must match it);
    ``temperature`` the one the engine's log-probabilities were taken at.
    Shards, manifest and resuming are those of :func:`capture`, one record
    being one unit. Returns the manifest.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int; got {k!r}")
    codec.check_vocab(vocab_size)
    if k > vocab_size:
        raise ValueError(f"k = {k} is larger than vocab_size = {vocab_size}")
    temperature = _validate.temperature(temperature)
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"shard_tokens must be a positive int; got {shard_tokens!r}")
    settings = {
        "source": "prompt_logprobs",
        "k": k,
        "temperature": float(temperature),
        "shard_tokens": shard_tokens,
        "teacher": teacher_name,
        "tokenizer_fingerprint": tokenizer_fingerprint,
    }
    total = len(records) if hasattr(records, "__len__") else None  # type: ignore[arg-type]
    units = _units(records, k, vocab_size)
    return writer.run(
        out_dir, units, settings, total=total, progress=progress, description="import"
    )


def _units(records: Iterable[Any], k: int, vocab: int) -> Iterator[writer.Unit]:
    for n, record in enumerate(records):
        tokens, positions = _split(record, n)
        if len(tokens) == 0:
            raise ValueError(f"record {n}: no prompt tokens")
        if len(positions) != len(tokens):
            raise ValueError(
                f"record {n}: {len(tokens)} prompt tokens but {len(positions)} positions of "
                "log-probabilities (one per token, the first None)"
            )

        def compute(positions=positions, n=n):
            return (*_rows(positions, k, n), vocab)

        yield writer.Unit([tokens], compute)


def _split(record: Any, n: int) -> tuple[np.ndarray, Sequence[Any]]:
    if hasattr(record, "prompt_token_ids") and hasattr(record, "prompt_logprobs"):
        ids, positions = record.prompt_token_ids, record.prompt_logprobs
    elif isinstance(record, Mapping):
        ids = record.get("input_ids", record.get("prompt_token_ids"))
        positions = record.get("prompt_logprobs", record.get("input_top_logprobs"))
        if ids is None or positions is None:
            raise KeyError(
                f"record {n} needs 'input_ids' (or 'prompt_token_ids') and 'prompt_logprobs' "
                f"(or 'input_top_logprobs'); got keys {sorted(record)}"
            )
    elif isinstance(record, (tuple, list)) and len(record) == 2:
        ids, positions = record
    else:
        raise TypeError(
            f"record {n} must be a vLLM RequestOutput, a mapping or an (input_ids, "
            f"prompt_logprobs) pair; got {type(record).__name__}"
        )
    tokens = torch.as_tensor(ids).reshape(-1)
    if tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise TypeError(f"record {n}: input_ids must be integers")
    return tokens.to(torch.int64).numpy(), list(positions)


def _entries(position: Any, where: str) -> list[tuple[int, float]]:
    """(token id, log-prob) pairs of one position."""
    if isinstance(position, Mapping):
        out = []
        for tid, value in position.items():
            lp = getattr(value, "logprob", value)
            out.append((int(tid), float(lp)))
        return out
    if isinstance(position, Sequence) and not isinstance(position, (str, bytes)):
        try:
            return [(int(e[1]), float(e[0])) for e in position]
        except (TypeError, IndexError, ValueError):
            pass
    raise TypeError(
        f"{where}: expected a mapping token id -> log-prob or (logprob, token_id, ...) "
        f"tuples; got {type(position).__name__}"
    )


def _rows(positions: Sequence[Any], k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = len(positions) - 1
    ids = torch.empty(rows, k, dtype=torch.int64)
    lps = torch.empty(rows, k, dtype=torch.float64)
    for t in range(1, len(positions)):
        where = f"record {n}, position {t}"
        if positions[t] is None:
            raise ValueError(f"{where}: no log-probabilities (only position 0 may be None)")
        entries = sorted(_entries(positions[t], where), key=lambda e: (-e[1], e[0]))
        if len(entries) < k:
            raise ValueError(
                f"{where}: {len(entries)} log-probabilities, fewer than k = {k} (ask the "
                "engine for at least k prompt log-probabilities)"
            )
        top = entries[:k]
        ids[t - 1] = torch.tensor([e[0] for e in top])
        lps[t - 1] = torch.tensor([e[1] for e in top], dtype=torch.float64)
    return ids, lps
