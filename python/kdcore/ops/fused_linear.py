"""Linear layer + distillation loss without materialising the logits:
``kdcore.fused_linear_distillation_loss`` (row chunks around the fused Rust or
Triton kernel, or vocabulary slices in ``fused_linear_vocab``; float64 and
other devices: the unfused reference)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .. import _dispatch, _modes, _validate, reference
from .. import spans as _spans
from ._grad import scale_rows
from ._linear import addmm32_, logits_fp32, mm32, pad_vocab, tensor_cores
from .distillation import _alpha, _check_label_range
from .fused import DIVERGENCES
from .fused_linear_vocab import default_slice, vocab_chunked
from .kl import beta_value, kernel_divergence
from .sparse import TAILS, _validate_teacher
from .vocab_parallel import VocabParallel, reject_unsupported, vocab_parallel_loss

#: fp32 bytes of logits (student, teacher, gradient) one chunk may hold: a
#: CPU chunk stays in cache-friendly sizes, a GPU chunk must be big enough for
#: the GEMMs to run at speed.
CHUNK_BUDGET_BYTES = {"cpu": 64 << 20, "cuda": 256 << 20}
MIN_CHUNK_ROWS = 64
OP = "kdcore::fused_linear_distill (fused_linear_distillation_loss)"


def _matrix(name: str, x: object, dim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(x.shape)}")
    return x


def _bias(name: str, b: object, vocab: int, weight_name: str) -> None:
    _matrix(name, b, 1)
    if b.shape[0] != vocab:
        raise ValueError(
            f"{name} must have shape ({vocab},) for a {weight_name} of {vocab} rows, "
            f"got {tuple(b.shape)}"
        )


@dataclass(frozen=True)
class _Problem:
    """Everything one fused-linear call needs besides the student's h, W, b.

    Rows are flattened: ``teacher_logits`` (N, V_t) or ``teacher_hidden``
    (N, H_t) with ``teacher_weight`` (V_t, H_t), or ``topk_ids`` /
    ``topk_logprobs`` (N, k); ``labels`` (N,) with masked rows set to 0;
    ``div_weight`` and ``ce_weight`` are per-row weights of the two terms.
    """

    teacher_logits: torch.Tensor | None
    teacher_hidden: torch.Tensor | None
    teacher_weight: torch.Tensor | None
    teacher_bias: torch.Tensor | None
    topk_ids: torch.Tensor | None
    topk_logprobs: torch.Tensor | None
    labels: torch.Tensor | None
    div_weight: torch.Tensor
    ce_weight: torch.Tensor | None
    temperature: float
    teacher_temperature: float
    tail: str
    divergence: str  # the kernel's name (kernel_divergence)
    beta: float
    vocab: int
    chunk_size: int  # rows per chunk, or vocabulary columns per slice (chunk_over="vocab")
    chunk_over: str = "rows"

    def rows_read(self) -> torch.Tensor:
        """Rows some term has a non-zero weight on (bool, (N,))."""
        read = self.div_weight != 0
        return read | (self.ce_weight != 0) if self.ce_weight is not None else read

    def teacher_rows(self, start: int, stop: int) -> torch.Tensor:
        with torch.no_grad():
            if self.teacher_logits is not None:
                z = self.teacher_logits[start:stop]
                return z.to(torch.promote_types(z.dtype, torch.float32))
            hidden = self.teacher_hidden[start:stop]
            return logits_fp32(hidden, self.teacher_weight, self.teacher_bias)

    def chunk_loss(self, kernels, z_s: torch.Tensor, start: int, stop: int, grad_dtype):
        """Loss sum (float64) and gradient w.r.t. one chunk's student logits,
        stored in ``grad_dtype``."""
        # The CE term needs both labels and their weights.
        hard = self.labels is not None and self.ce_weight is not None
        y = self.labels[start:stop] if hard else None
        ce = self.ce_weight[start:stop] if hard else None
        div_w, t = self.div_weight[start:stop], self.temperature
        code, beta = self.divergence, self.beta
        if self.topk_ids is None:
            z_t = pad_vocab(self.teacher_rows(start, stop), self.vocab)
            div_rows, ce_rows, g_z, _ = kernels.distill(
                z_s, z_t, div_w, t, code, beta, y, ce, True, False, grad_dtype=grad_dtype
            )
            loss = div_rows.double().sum()
            return loss + (ce_rows.double().sum() if ce_rows is not None else 0.0), g_z
        div_rows, g_z = kernels.sparse_kl(
            z_s, self.topk_ids[start:stop], self.topk_logprobs[start:stop], div_w, t,
            self.teacher_temperature, self.tail, True,
        )  # fmt: skip
        loss = div_rows.double().sum()
        if ce is not None:  # the hard-label term: the distill kernel with a zero divergence weight
            _, ce_rows, g_ce, _ = kernels.distill(
                z_s, z_s, torch.zeros_like(ce), 1.0, code, beta, y, ce, True, False
            )
            loss, g_z = loss + ce_rows.double().sum(), g_z + g_ce
        return loss, g_z.to(grad_dtype)


def _chunked(h, w, b, problem: _Problem, want_h: bool, want_w: bool, want_b: bool):
    """The loss and every requested gradient, chunk by chunk over rows.

    Returns ``(loss (float32, 0-d), grad_h, grad_w, grad_b)``, each gradient
    None unless requested; the weight and bias gradients are accumulated in
    fp32 and cast to their parameter's dtype at the end.
    """
    if problem.chunk_over == "vocab":
        return vocab_chunked(h, w, b, problem, want_h, want_w, want_b)
    rows, device = h.shape[0], h.device
    kernels = _dispatch.kernels("fused_linear_distillation_loss", h)  # _rust or _triton
    grad_h = torch.empty_like(h) if want_h else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=device) if want_w else None
    grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=device) if want_b else None
    # CPU: one fp32 copy of W (fp32 GEMMs are the fast ones there). CUDA, 16-bit:
    # W stays as it is; the kernel stores the chunk's logit gradient in W's
    # dtype (rounded once), the GEMM operand of all three gradients, and
    # cuBLAS accumulates in fp32 (fp32 logits, fp32 weight-gradient accumulator).
    w_mm = w if tensor_cores(w, w) else w.float()
    read = problem.rows_read()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, rows, problem.chunk_size):
        stop = min(rows, start + problem.chunk_size)
        # Rows no term reads may hold NaN: zeros keep it out of the weight gradient.
        h_c = torch.where(read[start:stop, None], h[start:stop], 0.0).to(w_mm.dtype)
        z_s = mm32(h_c, w_mm.t())
        z_s = pad_vocab(z_s + b.float() if b is not None else z_s, problem.vocab)
        loss, g_z = problem.chunk_loss(kernels, z_s, start, stop, w_mm.dtype)
        del z_s
        total += loss
        g_z = g_z[:, : w.shape[0]]
        if want_h:
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


class _FusedLinearFunction(torch.autograd.Function):
    """Eager path: all gradients are computed chunk by chunk in forward;
    backward scales them."""

    @staticmethod
    def forward(ctx, h, w, b, problem):
        want_b = b is not None and ctx.needs_input_grad[2]
        loss, *grads = _chunked(h, w, b, problem, *ctx.needs_input_grad[:2], want_b)
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grads = [None if g is None else scale_rows(g, grad_out) for g in ctx.saved_tensors]
        return (*(_modes.first_order_only(g, OP) for g in grads), None)


@torch.library.custom_op("kdcore::fused_linear_distill", mutates_args=())
def fused_linear_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    labels: torch.Tensor | None,
    div_weight: torch.Tensor,
    ce_weight: torch.Tensor | None,
    temperature: float,
    teacher_temperature: float,
    tail: str,
    divergence: str,
    beta: float,
    vocab: int,
    chunk_size: int,
    chunk_over: str,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The traceable twin of the eager path: (loss, grad_h, grad_w, grad_b),
    gradients not asked for are empty. Only the loss is differentiable."""
    problem = _Problem(
        teacher_logits, teacher_hidden, teacher_weight, teacher_bias, topk_ids, topk_logprobs,
        labels, div_weight, ce_weight, temperature, teacher_temperature, tail, divergence, beta,
        vocab, chunk_size, chunk_over,
    )  # fmt: skip
    loss, gh, gw, gb = _chunked(hidden, weight, bias, problem, grad_hidden, grad_weight, grad_bias)
    return (
        loss,
        gh if gh is not None else hidden.new_empty(0),
        gw if gw is not None else weight.new_empty(0),
        gb if gb is not None else weight.new_empty(0),
    )


@fused_linear_op.register_fake
def _(hidden, weight, bias, *args):
    grad_hidden, grad_weight, grad_bias = args[-3:]
    return (
        hidden.new_empty((), dtype=torch.float32),
        torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if grad_weight else weight.new_empty(0),
        weight.new_empty(weight.shape[0], dtype=bias.dtype) if grad_bias else weight.new_empty(0),
    )


def _op_setup(ctx, inputs, output) -> None:
    ctx.wants = inputs[-3:]
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[1:])


def _op_backward(ctx, grad_loss, *_):
    grads = [scale_rows(g, grad_loss) if want else None
             for g, want in zip(ctx.saved_tensors, ctx.wants, strict=True)]  # fmt: skip
    grads = [_modes.first_order_only(g, OP) for g in grads]
    return (*grads, *([None] * 20))


fused_linear_op.register_autograd(_op_backward, setup_context=_op_setup)


def _needs_grad(x: torch.Tensor | None) -> bool:
    return x is not None and x.requires_grad and torch.is_grad_enabled()


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
    chunk_over: str = "rows",
    vocab_parallel: VocabParallel | None = None,
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

    ``chunk_over="vocab"`` trades time for memory: all rows at once, two
    passes over vocabulary slices of ``chunk_size`` columns (default: what
    fits 64 MiB of fp32 temporaries, 256 MiB on CUDA), the first for each
    row's log-partitions, the second for the gradients; each slice's weight
    gradient is written once, so neither an fp32 weight-gradient accumulator
    nor an fp32 copy of the weight exists. The logit GEMMs (the teacher's too)
    run twice. Dense teachers with ``divergence`` ``"kl"`` or ``"reverse_kl"``
    only (and hard labels, spans, biases, padding).

    Student and teacher vocabularies must match; with ``pad_vocab=True`` the
    smaller one is padded with -inf logits (probability 0), never 0.
    ``reduction`` is ``"mean"`` (over rows with ``labels != ignore_index``) or
    ``"sum"``; ``"none"`` is not offered (the weight gradient is summed over
    rows as it is computed). ``alpha > 0`` needs ``labels``.
    On devices without a kernel (and for float64) the unfused reference runs.

    ``vocab_parallel=kdcore.VocabParallel(start, stop, group)``: a
    tensor-parallel head. Each rank of ``group`` passes its rows
    ``[start, stop)`` of ``student_weight`` (and ``teacher_weight`` or the
    columns of ``teacher_logits``) and of the biases; ``student_hidden`` and
    ``labels`` (global token ids) are the same on every rank. Row maxima,
    log-partitions and divergence sums are all-reduced over the group
    (kdcore.ops.vocab_parallel), so every rank gets the full-vocabulary loss;
    the hidden-state gradient is all-reduced too (the full gradient on every
    rank: do not reduce it again), the weight and bias gradients are this
    rank's slices. ``"kl"``, ``"reverse_kl"``, ``"jsd"``, hard labels and
    spans; eager mode. A group of one rank runs the plain path.
    """
    if vocab_parallel is not None:
        reject_unsupported(
            vocab_parallel, teacher_topk=teacher_topk, chunk_over=chunk_over,
            pad_vocab=pad_vocab, divergence=divergence,
        )  # fmt: skip
    h = _matrix("student_hidden", student_hidden, student_hidden.dim())
    if h.dim() < 2:
        raise ValueError(f"student_hidden must have shape (..., H), got {tuple(h.shape)}")
    w = _matrix("student_weight", student_weight, 2)
    if w.shape[1] != h.shape[-1] and vocab_parallel is None:  # sharded: checked on every rank
        raise ValueError(
            f"student_weight must have shape (V, {h.shape[-1]}) for student_hidden "
            f"{tuple(h.shape)}, got {tuple(w.shape)}"
        )
    lead, vocab_s = h.shape[:-1], w.shape[0]
    if student_bias is not None:
        _bias("student_bias", student_bias, vocab_s, "student_weight")
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
        sizes_differ = tw.shape[1] != th.shape[-1] and vocab_parallel is None
        if th.shape[:-1] != lead or sizes_differ:
            raise ValueError(
                f"teacher_hidden {tuple(th.shape)} and teacher_weight {tuple(tw.shape)} do not "
                f"fit student_hidden {tuple(h.shape)}"
            )
        vocab_t = tw.shape[0]
        if teacher_bias is not None:
            _bias("teacher_bias", teacher_bias, vocab_t, "teacher_weight")
    if teacher_bias is not None and teacher_weight is None:
        raise ValueError("teacher_bias goes with teacher_hidden and teacher_weight")
    if vocab_s != vocab_t and not pad_vocab and vocab_parallel is None:  # sharded: collective
        raise ValueError(
            f"student vocabulary {vocab_s} != teacher vocabulary {vocab_t}; pass pad_vocab=True "
            "to pad the smaller one with -inf logits (zero probability)"
        )
    vocab = max(vocab_s, vocab_t)
    if labels is not None:
        labels = _validate.labels(labels, lead, h)
        if _modes.inspectable(labels, h) and vocab_parallel is None:
            _check_label_range(labels, vocab_s, ignore_index)  # sharded: global ids
    elif a > 0:
        raise ValueError(f"alpha={a} weights a hard-label term: pass labels")

    h2 = h.reshape(-1, h.shape[-1])
    rows = h2.shape[0]
    valid = (
        torch.ones(rows, dtype=torch.bool, device=h.device)
        if labels is None
        else labels.reshape(-1) != ignore_index
    )
    # Row weights in float64 for float64 inputs (the reference path), else float32.
    weight_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    if spans is not None:
        spans, weights = _spans.prepare(spans, span_weights, normalize, red, lead, h)
        base, _ = _spans.row_weights(spans, weights, normalize, 1.0, weight_dtype, valid=valid)
    else:
        base = valid.to(weight_dtype)
        if red == "mean":
            n = base.sum()
            base = base / torch.where(n > 0, n, torch.ones_like(n))
    scale = t * t if scale_t2 else 1.0
    div_w = base * ((1.0 - a) * scale)
    ce_w = base * a if labels is not None else None
    safe = None if labels is None else torch.where(valid, labels.reshape(-1), 0)

    code = kernel_divergence(divergence, beta)
    if chunk_over not in ("rows", "vocab"):
        raise ValueError(f"chunk_over must be 'rows' or 'vocab'; got {chunk_over!r}")
    if chunk_over == "vocab" and (teacher_topk is not None or code not in ("kl", "reverse_kl")):
        raise ValueError(
            "chunk_over='vocab' supports a dense teacher (logits or hidden states) with "
            f"divergence 'kl' or 'reverse_kl'; got divergence={divergence!r}"
            + (" and a top-k teacher" if teacher_topk is not None else "")
            + ": use chunk_over='rows'"
        )
    if chunk_size is not None:
        chunk = chunk_size
    elif chunk_over == "vocab":
        chunk = default_slice(h2.shape[0], h.device)
    else:
        budget = CHUNK_BUDGET_BYTES.get(h.device.type, CHUNK_BUDGET_BYTES["cpu"])
        chunk = max(MIN_CHUNK_ROWS, budget // (vocab * 4 * 3))
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    problem = _Problem(
        None if teacher_logits is None else teacher_logits.reshape(-1, vocab_t),
        None if teacher_hidden is None else teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
        teacher_weight, teacher_bias,
        None if topk is None else topk[0], None if topk is None else topk[1],
        safe, div_w, ce_w, t, t0, tail, code, beta, vocab, chunk, chunk_over,
    )  # fmt: skip
    if vocab_parallel is not None:
        t_sizes = (0, 0) if teacher_hidden is None else (th.shape[-1], tw.shape[1])
        loss = vocab_parallel_loss(
            h2, w, student_bias, problem, vocab_parallel, hidden=(h.shape[-1], w.shape[1]),
            teacher_hidden=t_sizes, labels=labels, ignore_index=ignore_index,
            chunk_given=chunk_size is not None,
        )  # fmt: skip
        if loss is not None:
            return loss
    if _modes.backend(h, w) not in ("rust", "triton", "meta"):
        return _unfused(h2, w, student_bias, problem, divergence)
    if not _modes.registered_op(h2):
        return _FusedLinearFunction.apply(h2, w, student_bias, problem)
    loss, *_ = fused_linear_op(
        h2, w, student_bias, *(getattr(problem, f.name) for f in fields(problem)),
        _needs_grad(h2), _needs_grad(w), _needs_grad(student_bias),
    )  # fmt: skip
    return loss


def _unfused(h2, w, bias, problem: _Problem, divergence: str) -> torch.Tensor:
    """The reference path (devices without a kernel, float64): full logits, autograd."""
    out_dtype = torch.float64 if h2.dtype == torch.float64 else torch.float32
    div_w, ce_w, t = problem.div_weight, problem.ce_weight, problem.temperature
    # Rows no term reads are never read (NaN there must not reach a gradient
    # through torch.where's backward): their hidden states and logits become 0 first.
    read = problem.rows_read()
    h2 = torch.where(read[:, None], h2, 0.0)
    z_s = logits_fp32(h2, w, bias).to(_dispatch.reference_dtype(h2.device))
    z_s = pad_vocab(z_s, problem.vocab)
    z_s = torch.where(read[:, None], z_s, 0.0)
    if problem.topk_ids is None:
        z_t = pad_vocab(problem.teacher_rows(0, h2.shape[0]).to(z_s.dtype), problem.vocab)
        z_t = torch.where(read[:, None], z_t, 0.0)
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
