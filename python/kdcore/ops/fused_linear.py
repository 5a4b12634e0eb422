"""Linear layer + distillation loss without materialising the logits:
``kdcore.fused_linear_distillation_loss`` (CPU: chunked matmuls around the
fused Rust kernel; elsewhere the unfused reference)."""

from __future__ import annotations

import math

import torch

from .. import _dispatch, _validate, reference
from .. import spans as _spans
from .distillation import _alpha, _check_label_range
from .fused import DIVERGENCES
from .kl import beta_value, kernel_divergence
from .sparse import TAILS, _validate_teacher

#: fp32 bytes of logits (student, teacher, gradient) one chunk may hold: a
#: CPU chunk stays in cache-friendly sizes, a GPU chunk must be big enough for
#: the GEMMs to run at speed.
CHUNK_BUDGET_BYTES = {"cpu": 64 << 20, "cuda": 256 << 20}
MIN_CHUNK_ROWS = 64


def _matrix(name: str, x: object, dim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(x.shape)}")
    return x


_HALF = (torch.bfloat16, torch.float16)


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with fp32 accumulation and an fp32 result (float64 stays float64).

    On CUDA, 16-bit operands go to cuBLAS as they are with an fp32 output
    (``out_dtype``), so no fp32 copy of a (V, H) weight is ever made; elsewhere
    (or on a torch without it) they are widened first.
    """
    if a.device.type == "cuda" and a.dtype == b.dtype and a.dtype in _HALF:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.to(dtype) @ b.to(dtype)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """hidden @ weight.T + bias with fp32 accumulation and an fp32 result
    (never rounded to bf16 before the loss)."""
    if hidden.dtype != weight.dtype:
        dtype = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    out = _mm32(hidden, weight.t())
    return out + bias.to(out.dtype) if bias is not None else out


def _pad(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Extra vocabulary entries get probability 0 (-inf logits), never logit 0."""
    if logits.shape[-1] == vocab:
        return logits
    pad = logits.new_full((*logits.shape[:-1], vocab - logits.shape[-1]), -math.inf)
    return torch.cat([logits, pad], dim=-1)


class _FusedLinearFunction(torch.autograd.Function):
    """All gradients are computed chunk by chunk in forward; backward scales them."""

    @staticmethod
    def forward(ctx, h, w, b, chunk_loss, vocab, chunk_rows):
        rows, device = h.shape[0], h.device
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = b is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=device) if want_w else None
        grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=device) if want_b else None
        # CPU: one fp32 copy of W (fp32 GEMMs are the fast ones there). CUDA, 16-bit:
        # W stays as it is, cuBLAS accumulates in fp32 and returns fp32 logits; the
        # chunk's logit gradient is rounded to W's dtype for the hidden-state GEMM.
        w_mm = w if (device.type == "cuda" and w.dtype in _HALF) else w.float()
        total = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, rows, chunk_rows):
            stop = min(rows, start + chunk_rows)
            h_c = h[start:stop]
            z_s = _mm32(h_c.to(w_mm.dtype), w_mm.t())
            z_s = _pad(z_s + b.float() if b is not None else z_s, vocab)
            loss, g_z = chunk_loss(z_s, start, stop)
            total += loss
            g_z = g_z[:, : w.shape[0]]
            if want_h:
                grad_h[start:stop] = _mm32(g_z.to(w_mm.dtype), w_mm).to(h.dtype)
            if want_w:
                grad_w.addmm_(g_z.t(), h_c.float())
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
        return (*grads, None, None, None)


def fused_linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    labels: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    alpha: float = 0.0,
    ignore_index: int = -100,
    spans: torch.Tensor | None = None,
    span_weights: dict[int, float] | None = None,
    normalize: str = "span",
    teacher_temperature: float = 1.0,
    tail: str = "bucket",
    reduction: str = "mean",
    scale_t2: bool = True,
    pad_vocab: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""``distillation_loss`` on ``student_hidden @ student_weight.T (+ bias)``
    without ever holding the full (tokens × vocab) logits.

    .. math:: L = \alpha \cdot \mathrm{CE}(y, z_s) + (1-\alpha) \cdot T^2 \cdot D(P_t^T, P_s^T),
              \quad z_s = h_s W_s^\top + b_s

    The teacher is given as ``teacher_logits`` (..., V), as ``teacher_hidden``
    and ``teacher_weight`` (and ``teacher_bias``), or as a stored top-k
    ``teacher_topk = (ids, logprobs)`` of shape (..., k) — then D is the
    sparse KL of :func:`kdcore.sparse_kl_loss` (``tail``,
    ``teacher_temperature``; ``divergence`` must be ``"kl"``). The teacher is
    treated as frozen (no gradient). ``spans`` / ``span_weights`` /
    ``normalize`` weight rows as in :func:`kdcore.distillation_loss` (both
    terms; ``reduction`` must be ``"mean"``).

    Rows are processed in chunks of ``chunk_size`` (default: what fits 64 MiB
    of fp32 logits, at least 64 rows): each chunk's logits are formed with
    fp32 accumulation and kept in fp32 (never rounded to bf16 before the
    loss), go through the fused kernel, and give their share of the gradients
    w.r.t. ``student_hidden``, ``student_weight`` (accumulated in fp32, cast
    at the end) and ``student_bias``.

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
    given = [teacher_logits is not None, teacher_hidden is not None or teacher_weight is not None,
             teacher_topk is not None]  # fmt: skip
    if sum(given) != 1:
        raise ValueError(
            "give the teacher once: as teacher_logits, as teacher_hidden and teacher_weight, "
            "or as teacher_topk=(ids, logprobs)"
        )
    topk = None
    t0 = _validate.temperature(teacher_temperature)
    if teacher_logits is not None:
        t_logits = _validate.logits("teacher_logits", teacher_logits)
        if t_logits.shape[:-1] != lead:
            raise ValueError(
                f"teacher_logits must have leading shape {tuple(lead)}, got {tuple(t_logits.shape)}"
            )
        vocab_t = t_logits.shape[-1]
    elif teacher_topk is not None:
        if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
            raise TypeError("teacher_topk must be a pair (ids, logprobs) of tensors (..., k)")
        if divergence != "kl":
            raise ValueError(f"a top-k teacher trains with divergence='kl'; got {divergence!r}")
        if tail not in TAILS:
            raise ValueError(f"tail must be one of {', '.join(TAILS)}; got {tail!r}")
        ids, lps = teacher_topk
        # A zero-stride stand-in for the student logits: shapes only, no memory.
        shape_only = h.new_zeros(()).expand(*lead, vocab_s)
        lps = _validate_teacher(ids, lps, shape_only)
        topk = (ids.reshape(-1, ids.shape[-1]), lps.reshape(-1, lps.shape[-1]))
        vocab_t = vocab_s
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
        torch.ones(rows, dtype=torch.bool, device=h.device)
        if labels is None
        else labels.reshape(-1) != ignore_index
    )
    if spans is not None:
        spans, weights = _spans.prepare(spans, span_weights, normalize, red, lead, h)
        base, _ = _spans.row_weights(spans, weights, normalize, 1.0, torch.float32, valid=valid)
    else:
        base = valid.to(torch.float32)
        if red == "mean":
            n = base.sum()
            base = base / torch.where(n > 0, n, torch.ones_like(n))
    scale = t * t if scale_t2 else 1.0
    div_w = base * ((1.0 - a) * scale)
    ce_w = base * a if labels is not None else None
    safe = None if labels is None else torch.where(valid, labels.reshape(-1), 0)

    backend = _dispatch.select(h, w)
    if backend not in ("rust", "triton"):
        return _unfused(h2, w, student_bias, teacher_rows, topk, safe, div_w, ce_w, t, t0, tail,
                        divergence, beta, vocab)  # fmt: skip
    budget = CHUNK_BUDGET_BYTES.get(h.device.type, CHUNK_BUDGET_BYTES["cpu"])
    chunk = chunk_size or max(MIN_CHUNK_ROWS, budget // (vocab * 4 * 3))
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    code = kernel_divergence(divergence, beta)
    kernels = _dispatch.kernels("fused_linear_distillation_loss", h)  # _rust or _triton

    def chunk_loss(z_s: torch.Tensor, start: int, stop: int):
        """Loss sum and gradient w.r.t. one chunk's student logits."""
        y = None if safe is None else safe[start:stop]
        ce = None if ce_w is None else ce_w[start:stop]
        if topk is None:
            div_rows, ce_rows, g_z, _ = kernels.distill(
                z_s, _pad(teacher_rows(start, stop), vocab), div_w[start:stop], t, code, beta,
                y, ce, True, False,
            )  # fmt: skip
            loss = div_rows.double().sum()
            return loss + (ce_rows.double().sum() if ce_rows is not None else 0.0), g_z
        div_rows, g_z = kernels.sparse_kl(
            z_s, topk[0][start:stop], topk[1][start:stop], div_w[start:stop], t, t0, tail, True
        )
        loss = div_rows.double().sum()
        if ce is not None:  # the hard-label term: the distill kernel with a zero divergence weight
            _, ce_rows, g_ce, _ = kernels.distill(
                z_s, z_s, torch.zeros_like(ce), 1.0, code, beta, y, ce, True, False
            )
            loss, g_z = loss + ce_rows.double().sum(), g_z + g_ce
        return loss, g_z

    return _FusedLinearFunction.apply(h2, w, student_bias, chunk_loss, vocab, chunk)


def _unfused(h2, w, bias, teacher_rows, topk, safe, div_w, ce_w, t, t0, tail, divergence, beta,
             vocab) -> torch.Tensor:  # fmt: skip
    """The reference path (devices without a kernel, float64): full logits, autograd."""
    out_dtype = torch.float64 if h2.dtype == torch.float64 else torch.float32
    z_s = _pad(_logits(h2, w, bias).to(_dispatch.reference_dtype(h2.device)), vocab)
    keep = div_w > 0
    if topk is None:
        z_t = _pad(teacher_rows(0, h2.shape[0]).to(z_s.dtype), vocab)
        div = reference.divergence_rows(z_s, z_t, divergence, beta, t)
    else:
        div = reference.sparse_kl_rows(z_s, topk[0], topk[1].to(z_s.dtype), t, t0, tail)
    total = torch.where(keep, div * div_w.to(z_s.dtype), 0.0).sum()
    if ce_w is not None:
        ce = reference.cross_entropy_rows(z_s, safe)
        total = total + torch.where(ce_w > 0, ce * ce_w.to(z_s.dtype), 0.0).sum()
    return total.to(out_dtype)
