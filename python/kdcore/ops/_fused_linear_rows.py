"""The fused linear loss chunked over rows (``chunk_over="rows"``, the default):
per chunk, fp32 logits of ``h @ W.T``, the fused Rust or Triton kernel for the
loss and the gradient w.r.t. those logits, then the chunk's share of the
hidden-state, weight and bias gradients."""

from __future__ import annotations

import torch

from .. import _memory
from .._backend import DistillArgs, KernelBackend, SparseKLArgs
from ._fused_linear_problem import Problem, unless_all_read, zero_unread
from ._linear import addmm32_, mm32, pad_vocab, tensor_cores


def _chunk_loss(
    kernels: KernelBackend,
    problem: Problem,
    z_s: torch.Tensor,
    start: int,
    stop: int,
    grad_dtype,
    teacher_out: torch.Tensor | None,
):
    """Loss sum (float64) and gradient w.r.t. one chunk's student logits,
    stored in ``grad_dtype``; the teacher's logits go to ``teacher_out`` where
    they can."""
    hard = problem.hard
    y = problem.labels[start:stop] if hard else None
    ce = problem.ce_weight[start:stop] if hard else None
    div_w, t = problem.div_weight[start:stop], problem.temperature
    code, beta = problem.divergence, problem.beta
    if problem.topk_ids is None:
        z_t = pad_vocab(problem.teacher_rows(start, stop, teacher_out), problem.vocab)
        args = DistillArgs(z_s, z_t, div_w, t, code, beta, y, ce, True, False, grad_dtype)
        div_rows, ce_rows, g_z, _ = kernels.distill(args)
        loss = div_rows.double().sum()
        return loss + (ce_rows.double().sum() if ce_rows is not None else 0.0), g_z
    div_rows, g_z = kernels.sparse_kl(
        SparseKLArgs(
            z_s,
            problem.topk_ids[start:stop],
            problem.topk_logprobs[start:stop],
            div_w,
            t,
            problem.teacher_temperature,
            problem.tail,
            True,
        )
    )
    loss = div_rows.double().sum()
    if ce is not None:  # the hard-label term: the distill kernel with a zero divergence weight
        args = DistillArgs(z_s, z_s, torch.zeros_like(ce), 1.0, code, beta, y, ce, True, False)
        _, ce_rows, g_ce, _ = kernels.distill(args)
        loss, g_z = loss + ce_rows.double().sum(), g_z + g_ce
    return loss, g_z.to(grad_dtype)


def _logit_buffers(problem: Problem, w_mm: torch.Tensor, chunk: int, device):
    """Buffers of (chunk, V) for the student's and the teacher's logits, or None
    where ``mm32`` would not write into one (16-bit operands; a teacher given
    as logits or top-k)."""

    def buffer(width: int, *dtypes: torch.dtype) -> torch.Tensor | None:
        if len(set(dtypes)) != 1 or dtypes[0] not in (torch.float32, torch.float64):
            return None
        return _memory.empty((chunk, width), dtypes[0], device)

    z_buf = buffer(w_mm.shape[0], w_mm.dtype)
    t_buf = None
    if problem.topk_ids is None and problem.teacher_logits is None:
        tw = problem.teacher_weight
        t_buf = buffer(tw.shape[0], tw.dtype, problem.teacher_hidden.dtype)
    return z_buf, t_buf


def loss_and_grads(
    kernels: KernelBackend, h, w, b, problem: Problem, wants: tuple[bool, bool, bool]
):
    """The loss and every requested gradient, chunk by chunk over rows, each
    chunk's loss through ``kernels`` (the Rust or Triton backend).

    ``wants``: whether the hidden-state, weight and bias gradients are asked for.
    Returns ``(loss (float32, 0-d), grad_h, grad_w, grad_b)``, each gradient
    None unless requested; the weight and bias gradients are accumulated in
    fp32 and cast to their parameter's dtype at the end.
    """
    want_h, want_w, want_b = wants
    rows, device = h.shape[0], h.device
    grad_h = _memory.empty_like(h) if want_h else None
    grad_w = _memory.empty(w.shape, torch.float32, device).zero_() if want_w else None
    grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=device) if want_b else None
    # CPU: one fp32 copy of W (fp32 GEMMs are the fast ones there). CUDA, 16-bit:
    # W stays as it is; the kernel stores the chunk's logit gradient in W's
    # dtype (rounded once), the GEMM operand of all three gradients, and
    # cuBLAS accumulates in fp32 (fp32 logits, fp32 weight-gradient accumulator).
    w_mm = w if tensor_cores(w, w) else w.float()
    # A logit transform multiplies the kernel's gradient by its slope first: in fp32.
    grad_dtype = torch.float32 if problem.student_transformed else w_mm.dtype
    read = unless_all_read(problem.rows_read())
    total = torch.zeros((), dtype=torch.float64, device=device)
    # Every chunk's student and teacher logits go into the same two buffers: on
    # the CPU a fresh (chunk, V) tensor per chunk pays page faults on all of it.
    z_buf, t_buf = _logit_buffers(problem, w_mm, min(rows, problem.chunk_size), device)
    for start in range(0, rows, problem.chunk_size):
        stop = min(rows, start + problem.chunk_size)
        rows_read = None if read is None else read[start:stop]
        h_c = zero_unread(h[start:stop], rows_read).to(w_mm.dtype)
        z_s = mm32(h_c, w_mm.t(), None if z_buf is None else z_buf[: stop - start])
        if b is not None:
            z_s = z_s.add_(b.to(z_s.dtype))  # (z_s is this function's own: a buffer or new)
        z_s = problem.student_transform(z_s, inplace=True)
        t_out = None if t_buf is None else t_buf[: stop - start]
        loss, g_z = _chunk_loss(
            kernels, problem, pad_vocab(z_s, problem.vocab), start, stop, grad_dtype, t_out
        )
        total += loss
        g_z = g_z[:, : w.shape[0]]
        if problem.student_transformed:
            g_z = problem.student_chain_(g_z, z_s, consume=True).to(w_mm.dtype)
        del z_s
        if want_h and grad_h.dtype == g_z.dtype == w_mm.dtype == torch.float32:
            torch.mm(g_z, w_mm, out=grad_h[start:stop])  # no (chunk, H) temporary
        elif want_h:
            grad_h[start:stop] = mm32(g_z, w_mm).to(h.dtype)
        if want_w:
            addmm32_(grad_w, g_z.t(), h_c)
        if want_b:
            grad_b += g_z.sum(0, dtype=torch.float32)
    return (
        total.float(),
        grad_h,
        None if grad_w is None else grad_w.to(w.dtype),
        None if grad_b is None else grad_b.to(b.dtype),
    )
