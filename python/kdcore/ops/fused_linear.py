"""Linear layer + distillation loss without materialising the logits:
``kdcore.fused_linear_distillation_loss`` (CPU: chunked matmuls around the
fused Rust kernel; elsewhere the unfused reference)."""

from __future__ import annotations

import math

import torch

from .. import _dispatch, _rust, _validate, reference
from .distillation import _alpha, _check_label_range
from .fused import DIVERGENCES
from .kl import beta_value, kernel_divergence

#: fp32 bytes of logits (student, teacher, gradient) one chunk may hold.
CHUNK_BUDGET_BYTES = 64 << 20
MIN_CHUNK_ROWS = 64


def _matrix(name: str, x: object, dim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(x.shape)}")
    return x


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """hidden @ weight.T + bias with fp32 accumulation and an fp32 result
    (never rounded to bf16 before the loss)."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)  # float64 stays float64
    out = hidden.to(dtype) @ weight.to(dtype).t()
    return out + bias.to(dtype) if bias is not None else out


def _pad(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Extra vocabulary entries get probability 0 (-inf logits), never logit 0."""
    if logits.shape[-1] == vocab:
        return logits
    pad = logits.new_full((*logits.shape[:-1], vocab - logits.shape[-1]), -math.inf)
    return torch.cat([logits, pad], dim=-1)


class _FusedLinearFunction(torch.autograd.Function):
    """All gradients are computed chunk by chunk in forward; backward scales them."""

    @staticmethod
    def forward(ctx, h, w, b, teacher_fn, labels, div_w, ce_w, temperature, divergence, beta,
                vocab, chunk_rows):  # fmt: skip
        rows = h.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = b is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32) if want_w else None
        grad_b = torch.zeros(w.shape[0], dtype=torch.float32) if want_b else None
        w32 = w.float()
        total = torch.zeros((), dtype=torch.float64)
        for start in range(0, rows, chunk_rows):
            stop = min(rows, start + chunk_rows)
            h32 = h[start:stop].float()
            z_s = _pad(h32 @ w32.t() + (b.float() if b is not None else 0.0), vocab)
            z_t = _pad(teacher_fn(start, stop), vocab)
            y = None if labels is None else labels[start:stop]
            div_rows, ce_rows, g_z, _ = _rust.distill(
                z_s, z_t, div_w[start:stop], temperature, divergence, beta, y,
                None if ce_w is None else ce_w[start:stop], True, False,
            )  # fmt: skip
            total += div_rows.double().sum()
            if ce_rows is not None:
                total += ce_rows.double().sum()
            g_z = g_z[:, : w.shape[0]]
            if want_h:
                grad_h[start:stop] = (g_z @ w32).to(h.dtype)
            if want_w:
                grad_w.addmm_(g_z.t(), h32)
            if want_b:
                grad_b += g_z.sum(0)
        ctx.save_for_backward(
            grad_h,
            None if grad_w is None else grad_w.to(w.dtype),
            None if grad_b is None else grad_b.to(b.dtype),
        )
        return total.float()

    @staticmethod
    def backward(ctx, grad_out):
        grads = []
        for g in ctx.saved_tensors:
            if g is None or (grad_out.device.type == "cpu" and grad_out.item() == 1.0):
                grads.append(g)
            else:
                grads.append((g.float() * grad_out.float()).to(g.dtype))
        return (*grads, None, None, None, None, None, None, None, None, None)


def fused_linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    alpha: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    scale_t2: bool = True,
    pad_vocab: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""``distillation_loss`` on ``student_hidden @ student_weight.T (+ bias)``
    without ever holding the full (tokens × vocab) logits.

    .. math:: L = \alpha \cdot \mathrm{CE}(y, z_s) + (1-\alpha) \cdot T^2 \cdot D(P_t^T, P_s^T),
              \quad z_s = h_s W_s^\top + b_s

    The teacher is given as ``teacher_logits`` (..., V) or as ``teacher_hidden``
    and ``teacher_weight`` (and ``teacher_bias``); it is treated as frozen (no
    gradient). Rows are processed in chunks of ``chunk_size`` (default: what
    fits 64 MiB of fp32 logits, at least 64 rows): each chunk's logits are
    formed with fp32 accumulation and kept in fp32 (never rounded to bf16
    before the loss), go through the fused kernel, and give their share of the
    gradients w.r.t. ``student_hidden``, ``student_weight`` (accumulated in
    fp32, cast at the end) and ``student_bias``.

    Student and teacher vocabularies must match; with ``pad_vocab=True`` the
    smaller one is padded with -inf logits (probability 0), never 0.
    ``reduction`` is ``"mean"`` (over rows with ``labels != ignore_index``) or
    ``"sum"``; ``"none"`` is not offered (the weight gradient is summed over
    rows as it is computed). ``alpha > 0`` needs ``labels``.
    On devices without a kernel (and for float64) the unfused reference runs.
    """
    h = _matrix("student_hidden", student_hidden, student_hidden.dim())
    if h.dim() < 2:
        raise ValueError(f"student_hidden must have shape (..., H), got {tuple(h.shape)}")
    w = _matrix("student_weight", student_weight, 2)
    if w.shape[1] != h.shape[-1]:
        raise ValueError(
            f"student_weight must have shape (V, {h.shape[-1]}) for student_hidden "
            f"{tuple(h.shape)}, got {tuple(w.shape)}"
        )
    lead, vocab_s = h.shape[:-1], w.shape[0]
    t = _validate.temperature(temperature)
    a = _alpha(alpha)
    beta = beta_value(beta)
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}; got {divergence!r}")
    red = _validate.reduction(reduction)
    if red == "none":
        raise ValueError(
            "reduction='none' is not offered by the fused linear loss; use 'mean' or 'sum'"
        )
    if (teacher_logits is None) == (teacher_hidden is None and teacher_weight is None):
        raise ValueError(
            "give the teacher as teacher_logits, or as teacher_hidden and teacher_weight"
        )
    if teacher_logits is not None:
        t_logits = _validate.logits("teacher_logits", teacher_logits)
        if t_logits.shape[:-1] != lead:
            raise ValueError(
                f"teacher_logits must have leading shape {tuple(lead)}, got {tuple(t_logits.shape)}"
            )
        vocab_t = t_logits.shape[-1]
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("teacher_hidden and teacher_weight go together")
        th = _matrix("teacher_hidden", teacher_hidden, teacher_hidden.dim())
        tw = _matrix("teacher_weight", teacher_weight, 2)
        if th.shape[:-1] != lead or tw.shape[1] != th.shape[-1]:
            raise ValueError(
                f"teacher_hidden {tuple(th.shape)} and teacher_weight {tuple(tw.shape)} do not "
                f"fit student_hidden {tuple(h.shape)}"
            )
        vocab_t = tw.shape[0]
    if vocab_s != vocab_t and not pad_vocab:
        raise ValueError(
            f"student vocabulary {vocab_s} != teacher vocabulary {vocab_t}; pass pad_vocab=True "
            "to pad the smaller one with -inf logits (zero probability)"
        )
    vocab = max(vocab_s, vocab_t)
    if labels is not None:
        labels = _validate.labels(labels, lead, h)
        _check_label_range(labels, vocab_s, ignore_index)
    elif a > 0:
        raise ValueError(f"alpha={a} weights a hard-label term: pass labels")

    def teacher_rows(start: int, stop: int) -> torch.Tensor:
        with torch.no_grad():
            if teacher_logits is not None:
                return teacher_logits.reshape(-1, vocab_t)[start:stop].float()
            th2 = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
            return _logits(th2[start:stop], teacher_weight, teacher_bias)

    h2 = h.reshape(-1, h.shape[-1])
    rows = h2.shape[0]
    valid = (
        torch.ones(rows, dtype=torch.bool) if labels is None else labels.reshape(-1) != ignore_index
    )
    base = valid.to(torch.float32)
    if red == "mean":
        n = base.sum()
        base = base / torch.where(n > 0, n, torch.ones_like(n))
    scale = t * t if scale_t2 else 1.0
    div_w = base * ((1.0 - a) * scale)
    ce_w = base * a if labels is not None else None
    safe = None if labels is None else torch.where(valid, labels.reshape(-1), 0)

    kernel_ok = _dispatch.select(h, w) == "rust" and h.device.type == "cpu"
    if not kernel_ok:
        out_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
        z_s = _pad(_logits(h2, w, student_bias).to(_dispatch.reference_dtype(h.device)), vocab)
        z_t = _pad(teacher_rows(0, rows).to(z_s.dtype), vocab)
        if labels is None:
            rows_d = reference.divergence_rows(z_s, z_t, divergence, beta, t) * scale
            return (rows_d * base.to(rows_d.dtype)).sum().to(out_dtype)
        return reference.distillation_loss(
            z_s, z_t, labels.reshape(-1), alpha=a, temperature=t, divergence=divergence,
            beta=beta, ignore_index=ignore_index, reduction=red, scale_t2=scale_t2,
        ).to(out_dtype)  # fmt: skip
    chunk = chunk_size or max(MIN_CHUNK_ROWS, CHUNK_BUDGET_BYTES // (vocab * 4 * 3))
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return _FusedLinearFunction.apply(
        h2, w, student_bias, teacher_rows, safe, div_w, ce_w, t,
        kernel_divergence(divergence, beta), beta, vocab, chunk,
    )  # fmt: skip
