"""The fused linear loss chunked over the vocabulary (``chunk_over="vocab"``).

Row chunking needs an fp32 accumulator for the weight gradient as large as
the weight (1 GiB at V = 128256, H = 2048). Here every vocabulary slice
``W[v0:v1]`` is visited twice, with all rows at once:

1. statistics: the slice's student and teacher logits (fp32, at temperature
   T) give per-row log-partitions of the slice and the KL cross term; after
   the last slice they combine (in float64) into each row's log Z_s, log Z_t,
   the divergence, and the hard-label CE;
2. gradients: the slice's logits are formed again, the gradient w.r.t. them
   follows from the row statistics, and the slice's weight gradient is one
   GEMM over all rows, written once in the weight's dtype; the hidden-state
   gradient accumulates over slices in fp32.

Nothing of size (rows, V) and no fp32 copy of W exists: the extra memory is
the gradients themselves, an fp32 (rows, H) accumulator and a few
(rows, slice) fp32 buffers. The price is a second pass of the logit GEMMs
(the teacher's included). Forward and reverse KL with optional hard-label CE;
the arithmetic is torch's (fp32 elementwise work, float64 row totals), on any
device.
"""

from __future__ import annotations

import math

import torch

from ._fused_linear_problem import Problem, weighted, zero_unread
from ._linear import logits_fp32, mm32, pad_vocab, tensor_cores


def _slice_logits(problem: Problem, h, w, b, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) fp32 logits of vocabulary columns [v0, v1), transformed
    (the logit transforms), not yet divided by T, in fresh buffers; columns beyond
    a model's vocabulary are -inf."""
    rows, width = h.shape[0], v1 - v0

    def linear(hidden, weight, bias, transform):
        hi = min(v1, weight.shape[0])
        if hi <= v0:
            return h.new_full((rows, width), -math.inf, dtype=torch.float32)
        z = logits_fp32(hidden, weight[v0:hi], None if bias is None else bias[v0:hi])
        return pad_vocab(transform(z, inplace=True), width)

    z_s = linear(h, w, b, problem.student_transform)
    with torch.no_grad():
        t = problem.teacher_logits
        if t is None:
            z_t = linear(
                problem.teacher_hidden,
                problem.teacher_weight,
                problem.teacher_bias,
                problem.teacher_transform,
            )
        elif min(v1, t.shape[1]) <= v0:
            z_t = h.new_full((rows, width), -math.inf, dtype=torch.float32)
        else:
            # A copy: the caller's teacher logits are never written (the passes work in place).
            z_t = t[:, v0:v1].to(torch.float32, copy=True)
            z_t = pad_vocab(problem.teacher_transform(z_t, inplace=True), width)
    return z_s, z_t


def loss_and_grads(kernels, h, w, b, problem: Problem, wants: tuple[bool, bool, bool]):
    """Loss and requested gradients, two passes over vocabulary slices
    (torch arithmetic: ``kernels``, the backend object, is not needed).

    ``problem`` has a dense teacher and divergence ``"kl"`` or
    ``"reverse_kl"``; ``problem.chunk_size`` is the slice width. Takes and
    returns what the row path's ``loss_and_grads`` does:
    ``(loss (float32, 0-d), grad_h, grad_w, grad_b)``.
    """
    want_h, want_w, want_b = wants
    rows, vocab, width = h.shape[0], problem.vocab, problem.chunk_size
    inv_t = 1.0 / problem.temperature
    reverse = problem.divergence == "reverse_kl"
    div_w = problem.div_weight.to(torch.float64)
    hard = problem.hard
    ce_w = problem.ce_weight.to(torch.float64) if hard else None
    labels = problem.labels.long() if hard else None
    slices = [(v0, min(vocab, v0 + width)) for v0 in range(0, vocab, width)]
    # Rows no term reads are never read: their logits may be NaN or -inf.
    read = problem.rows_read()

    # Pass 1: per slice and row, log Σ e^{z/T} of each model, the KL between
    # the slice's own (renormalised) softmaxes, and log Σ e^{z_s} at T = 1.
    ls, lt, kl_slice, l1 = [], [], [], []
    label_logit = torch.zeros(rows, dtype=torch.float64, device=h.device)
    with torch.no_grad():
        for v0, v1 in slices:
            z_s, z_t = _slice_logits(problem, h, w, b, v0, v1)
            if hard:  # at T = 1, before z_s is scaled in place
                l1.append(torch.logsumexp(z_s, dim=1).double())
                inside = (labels >= v0) & (labels < v1)
                col = (labels - v0).clamp(0, v1 - v0 - 1)
                picked = z_s.gather(1, col[:, None]).squeeze(1).double()
                label_logit = torch.where(inside, picked, label_logit)
            # In place from here: few (rows, slice) buffers live at once.
            log_q, log_p = z_s.mul_(inv_t), z_t.mul_(inv_t)
            ls_c, lt_c = torch.logsumexp(log_q, dim=1), torch.logsumexp(log_p, dim=1)
            log_q.sub_(ls_c[:, None])
            log_p.sub_(lt_c[:, None])
            first, second = (log_q, log_p) if reverse else (log_p, log_q)
            kl_slice.append(weighted(torch.exp(first), first.sub(second)))
            ls.append(ls_c.double())
            lt.append(lt_c.double())
    ls_t, lt_t = torch.stack(ls, 1), torch.stack(lt, 1)
    log_zs, log_zt = torch.logsumexp(ls_t, 1), torch.logsumexp(lt_t, 1)
    # The chain rule of KL over the slices: with π_c, ρ_c the teacher's and the
    # student's mass in slice c, KL(P‖Q) = Σ_c π_c (KL_c + log π_c − log ρ_c).
    # Every term is small: no cancellation between large log-partitions.
    log_pi, log_rho = lt_t - log_zt[:, None], ls_t - log_zs[:, None]
    if reverse:
        log_pi, log_rho = log_rho, log_pi
    per_slice = torch.stack(kl_slice, 1) + log_pi - log_rho
    # Mass of the first distribution in a slice where the second has none: +inf
    # (the slice-local KL is undefined there).
    per_slice = torch.where(torch.isneginf(log_rho), math.inf, per_slice)
    pi = torch.exp(log_pi)
    div = torch.where(pi > 0, pi * per_slice, 0.0).sum(1)
    total = torch.where(read & (div_w > 0), div * div_w, 0.0).sum()
    if hard:
        log_z1 = torch.logsumexp(torch.stack(l1, 1), 1)
        ce = log_z1 - label_logit
        total = total + torch.where(read & (ce_w > 0), ce * ce_w, 0.0).sum()

    # Pass 2: the gradient w.r.t. each slice's logits, then its GEMMs.
    grad_h32 = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if want_h else None
    grad_w = torch.empty_like(w) if want_w else None
    grad_b = torch.empty_like(b) if want_b else None
    if want_h or want_w or want_b:
        row_c = (div_w * inv_t).float()[:, None]
        log_zs32, log_zt32, div32 = log_zs.float()[:, None], log_zt.float()[:, None], div.float()
        # GEMM operands: fp32 on the CPU; on CUDA a 16-bit W keeps its dtype
        # (cuBLAS accumulates in fp32) and the slice gradient is rounded to it.
        gemm = w.dtype if tensor_cores(w, w) else torch.float32
        # Rows no term reads may hold NaN: zeros keep it out of the weight gradient.
        h_g = zero_unread(h, read).to(gemm) if want_w else None
        for v0, v1 in slices:
            hi = min(v1, w.shape[0])
            if hi <= v0:
                continue  # a teacher-only tail of a padded vocabulary: no student weights
            with torch.no_grad():
                z_s, z_t = _slice_logits(problem, h, w, b, v0, v1)
                # The student's transformed logits (before the in-place work below)
                # give the transform's slope.
                z_kept = z_s[:, : hi - v0].clone() if problem.student_cap is not None else None
                if hard:  # softmax at T = 1 minus the one-hot, times the CE weights
                    g_ce = z_s.sub(log_z1.float()[:, None]).exp_().mul_(ce_w.float()[:, None])
                    inside = (labels >= v0) & (labels < v1)
                    col = (labels - v0).clamp(0, v1 - v0 - 1)
                    onehot = torch.where(inside, ce_w.float(), 0.0)
                    g_ce.scatter_add_(1, col[:, None], -onehot[:, None])
                log_q = z_s.mul_(inv_t).sub_(log_zs32)
                log_p = z_t.mul_(inv_t).sub_(log_zt32)
                q = torch.exp(log_q)
                if reverse:
                    # Q (log Q − log P − D), 0 where Q = 0
                    g = log_q.sub_(log_p).sub_(div32[:, None]).mul_(q)
                    g = torch.where(q > 0, g, 0.0)
                else:
                    g = q.sub_(log_p.exp_())
                g.mul_(row_c)
                if hard:
                    g.add_(g_ce)
                g = zero_unread(g, read)[:, : hi - v0]
                if problem.student_transformed:
                    g = problem.student_chain_(g, z_kept, consume=True)
                g_g = g.to(gemm)
                if want_h:
                    grad_h32 += mm32(g_g, w[v0:hi].to(gemm))
                if want_w:
                    grad_w[v0:hi] = mm32(g_g.t(), h_g).to(w.dtype)
                if want_b:
                    grad_b[v0:hi] = g.sum(0).to(b.dtype)
    return (
        total.float(),
        None if grad_h32 is None else grad_h32.to(h.dtype),
        grad_w,
        grad_b,
    )
