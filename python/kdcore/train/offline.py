"""A stored top-k teacher: what to keep of the teacher's logits for offline KD."""

from __future__ import annotations

import torch

from .. import _validate


@torch.no_grad()
def topk_logprobs(
    teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, logprobs)`` of the ``k`` most likely tokens of ``softmax(logits / T)``.

    ``ids`` are int32 (vocabularies fit), ``logprobs`` float32, both of shape
    ``(..., k)``: about 8·k bytes per token, against 2·V for bf16 logits.
    Batches that carry them as ``teacher_ids`` / ``teacher_logprobs`` train
    through :func:`kdcore.sparse_kl_loss` (pass ``teacher_temperature=T``
    when the student trains at another temperature).
    """
    logits = _validate.logits("teacher_logits", teacher_logits)
    t = _validate.temperature(temperature)
    vocab = logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, {vocab}] (the vocabulary size); got {k!r}")
    logprobs = torch.log_softmax(logits.float() / t, dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    return ids.to(torch.int32), values
