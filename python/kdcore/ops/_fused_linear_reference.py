"""The fused linear loss's unfused reference (devices without a kernel, float64):
the full logits through ``kdcore.reference``, ordinary autograd."""

from __future__ import annotations

import torch

from .. import _dispatch, reference
from ._fused_linear_problem import Problem, zero_unread
from ._linear import logits_fp32, pad_vocab


def unfused_loss(h2, w, bias, problem: Problem, divergence: str) -> torch.Tensor:
    """The loss of ``problem`` on ``h2 @ w.T + bias``; ``divergence`` is the user's name."""
    out_dtype = torch.float64 if h2.dtype == torch.float64 else torch.float32
    div_w, ce_w, t = problem.div_weight, problem.ce_weight, problem.temperature
    # Rows no term reads are never read (NaN there must not reach a gradient
    # through torch.where's backward): their hidden states and logits become 0 first.
    read = problem.rows_read()
    h2 = zero_unread(h2, read)
    z_s = logits_fp32(h2, w, bias).to(_dispatch.reference_dtype(h2.device))
    z_s = problem.student_transform(z_s, inplace=False)  # (autograd records it)
    z_s = zero_unread(pad_vocab(z_s, problem.vocab), read)
    if problem.topk_ids is None:
        z_t = pad_vocab(problem.teacher_rows(0, h2.shape[0]).to(z_s.dtype), problem.vocab)
        z_t = zero_unread(z_t, read)
        div = reference.divergence_rows(z_s, z_t, divergence, problem.beta, t)
    else:
        lps = problem.topk_logprobs.to(z_s.dtype)
        div = reference.sparse_kl_rows(
            z_s, problem.topk_ids, lps, t, problem.teacher_temperature, problem.tail
        )
    total = torch.where(div_w > 0, div * div_w.to(z_s.dtype), 0.0).sum()
    if ce_w is not None:
        ce = reference.cross_entropy_rows(z_s, problem.labels)
        total = total + torch.where(ce_w > 0, ce * ce_w.to(z_s.dtype), 0.0).sum()
    return total.to(out_dtype)
