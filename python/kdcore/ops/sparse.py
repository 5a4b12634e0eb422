"""Distillation from a sparse (top-k) teacher: ``kdcore.sparse_kl_loss``."""

from __future__ import annotations

import math

import torch

from .. import _dispatch, _modes, _topk, _validate, _weights, reference
from ._grad import scale_rows

TAILS = ("bucket", "renormalize", "zero")
# Stored log-probabilities a hair above 0 are rounding noise; above this, an error.
_POSITIVE_SLACK = 1e-5
OP = "kdcore::sparse_kl (sparse_kl_loss)"


@torch.library.custom_op("kdcore::sparse_kl", mutates_args=())
def sparse_kl_op(
    student: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    weight: torch.Tensor,
    temperature: float,
    teacher_temperature: float,
    tail: str,
    grad_student: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D student logits -> (weighted rows, gradient or an empty tensor)."""
    kernels = _dispatch.kernels("kdcore::sparse_kl", student)  # Rust or Triton
    rows, grad = kernels.sparse_kl(
        student, teacher_ids, teacher_logprobs, weight, temperature, teacher_temperature, tail,
        grad_student,
    )  # fmt: skip
    return rows, grad if grad is not None else student.new_empty(0)


@sparse_kl_op.register_fake
def _(student, teacher_ids, teacher_logprobs, weight, temperature, t0, tail, grad_student):
    rows = student.new_empty(student.shape[0], dtype=torch.float32)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    return rows, grad if grad_student else student.new_empty(0)


def _setup(ctx, inputs, output) -> None:
    ctx.grad_student = inputs[7]
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_rows, _):
    (grad,) = ctx.saved_tensors
    grad_s = scale_rows(grad, grad_rows) if ctx.grad_student else None
    return _modes.first_order_only(grad_s, OP), None, None, None, None, None, None, None


sparse_kl_op.register_autograd(_backward, setup_context=_setup)


class _SparseKLFunction(torch.autograd.Function):
    """Eager path of ``kdcore::sparse_kl`` (same kernel call and backward)."""

    @staticmethod
    def forward(ctx, student, ids, logprobs, weight, temperature, t0, tail, reduce):
        kernels = _dispatch.kernels("kdcore::sparse_kl", student)
        rows, grad = kernels.sparse_kl(
            student, ids, logprobs, weight, temperature, t0, tail, ctx.needs_input_grad[0]
        )
        ctx.save_for_backward(grad)
        return rows.sum() if reduce else rows

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        grad_s = None if grad is None else scale_rows(grad, grad_loss, ctx, "student")
        return _modes.first_order_only(grad_s, OP), None, None, None, None, None, None, None


def _validate_teacher(ids, logprobs, student, active=None):
    """Shapes, dtypes, devices; then (eager only) ids in [0, V) and log-probs <= 0 in the
    rows where ``active`` (leading shape; rows of weight 0 are never read)."""
    lead = student.shape[:-1]
    if not isinstance(ids, torch.Tensor) or not isinstance(logprobs, torch.Tensor):
        raise TypeError("teacher_ids and teacher_logprobs must be torch.Tensors")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"teacher_ids must be an integer tensor, got {ids.dtype}")
    if not logprobs.dtype.is_floating_point:
        raise TypeError(f"teacher_logprobs must be floating point, got {logprobs.dtype}")
    if ids.shape != logprobs.shape:
        raise ValueError(
            "teacher_ids and teacher_logprobs must have the same shape (..., k), got "
            f"{tuple(ids.shape)} and {tuple(logprobs.shape)}"
        )
    if ids.dim() != student.dim() or ids.shape[:-1] != lead:
        raise ValueError(
            f"teacher_ids must have shape {(*lead, 'k')} to match student_logits "
            f"{tuple(student.shape)}, got {tuple(ids.shape)}"
        )
    if ids.shape[-1] == 0:
        raise ValueError("the sparse teacher needs k >= 1 entries per position, got k = 0")
    for name, x in (("teacher_ids", ids), ("teacher_logprobs", logprobs)):
        _validate.same_device(name, x, student)
    if not _modes.inspectable(student, ids, logprobs):
        return logprobs
    vocab = student.shape[-1]
    read = torch.ones_like(ids, dtype=torch.bool) if active is None else active[..., None]
    bad = read & ((ids < 0) | (ids >= vocab))
    if bool(bad.any()):
        raise ValueError(f"teacher_ids must be in [0, {vocab}), got {ids[bad][:5].tolist()}")
    bad = read & ((logprobs > _POSITIVE_SLACK) | torch.isnan(logprobs))
    if bool(bad.any()):
        seen = logprobs[bad][:5].tolist()
        raise ValueError(f"teacher_logprobs must be log-probabilities (<= 0), got {seen}")
    return logprobs.clamp_max(0.0)


def _unread_rows_neutral(ids, logprobs, weight, vocab: int):
    """Rows of weight 0 get in-range ids and finite log-probs: the reference indexes
    every row (an id out of range would raise there, a NaN would reach the gradient)."""
    read = (weight != 0).reshape(ids.shape[:-1])[..., None]
    k = ids.shape[-1]
    neutral_ids = torch.arange(k, device=ids.device).remainder(vocab).to(ids.dtype)
    neutral_lps = torch.full((), -math.log(k + 1), dtype=logprobs.dtype, device=logprobs.device)
    return torch.where(read, ids, neutral_ids), torch.where(read, logprobs, neutral_lps)


def _check_renormalizable(logprobs: torch.Tensor, active: torch.Tensor, tail: str) -> None:
    """tail="renormalize" divides by the top-k mass: a read row needs some."""
    if tail != "renormalize":
        return
    empty = active & torch.isneginf(logprobs).all(-1)
    if bool(empty.any()):
        r = int(empty.nonzero()[0, 0])
        raise ValueError(
            f"teacher: row {r}: every top-k log-probability is -inf, so tail='renormalize' "
            "has no mass to renormalise (use tail='bucket', or mask the row)"
        )


def sparse_kl_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    tail: str = "bucket",
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = True,
) -> torch.Tensor:
    r"""KL distillation from a sparse teacher: its top-k ids and log-probs per position.

    The teacher is given as ``teacher_ids`` (..., k) and ``teacher_logprobs``
    (..., k) — log-probabilities at ``teacher_temperature`` (what vLLM's
    prompt_logprobs or a stored cache holds); the student as full logits
    (..., V). Per position, with :math:`Q = \mathrm{softmax}(z_s / T)`:

    - ``tail="bucket"``: one extra category — the teacher's missing mass
      :math:`1 - \sum_i p_i` against the student's mass outside the k ids;
      :math:`\sum_c p_c (\log p_c - \log Q_c)` over k + 1 categories.
    - ``"renormalize"``: the teacher's top-k renormalised to sum to 1.
    - ``"zero"``: the top-k probabilities as given; the missing mass is dropped.

    Re-tempering: the stored distribution (k ids plus the tail as one category)
    is raised to the power ``teacher_temperature / temperature`` and
    renormalised — exact for the k ids relative to each other, an
    approximation for the tail. The gradient w.r.t. the full student logits is
    exact for this loss, computed with one pass of exponentials over the
    vocabulary. ``scale_t2``, masking and ``reduction`` as in :func:`kdcore.kl_loss`.

    Errors: ids outside [0, V) or repeated within a position, positive
    log-probabilities (above 1e-5; smaller ones are clamped to 0), top-k
    masses summing above 1, k = 0, shapes that disagree.
    """
    student = _validate.logits("student_logits", student_logits)
    t = _validate.temperature(temperature)
    t0 = _validate.temperature(teacher_temperature)
    red = _validate.reduction(reduction)
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {', '.join(TAILS)}; got {tail!r}")
    lead = student.shape[:-1]
    if labels is not None:
        labels = _validate.labels(labels, lead, student)
    if mask is not None:
        _validate.mask(mask, lead, student)
    weight = _weights.row_weights(
        student, labels=labels, ignore_index=ignore_index, mask=mask, reduction=red,
        scale=t * t if scale_t2 else 1.0,
    )  # fmt: skip
    active = None if labels is None and mask is None else (weight != 0).reshape(lead)
    logprobs = _validate_teacher(teacher_ids, teacher_logprobs, student, active)
    k, vocab = teacher_ids.shape[-1], student.shape[-1]
    s2, ids, lps = student.reshape(-1, vocab), teacher_ids.reshape(-1, k), logprobs.reshape(-1, k)
    backend = _modes.backend(student)
    compiling = _modes.registered_op(student)
    if _modes.inspectable(student, ids, lps):  # rows of weight 0 are never read, so never checked
        active = weight.reshape(-1) != 0
        if backend == "torch":  # the kernels check these rows themselves
            _topk.check_rows(ids, lps, active, vocab)
        _check_renormalizable(lps, active, tail)
    if backend == "torch":
        wide = _dispatch.reference_dtype(student.device)
        teacher_ids, logprobs = _unread_rows_neutral(teacher_ids, logprobs, weight, vocab)
        loss = reference.sparse_kl_loss(
            student.to(wide), teacher_ids, logprobs.to(wide), temperature=t,
            teacher_temperature=t0, tail=tail, labels=labels, ignore_index=ignore_index,
            mask=mask, reduction=red, scale_t2=scale_t2,
        )  # fmt: skip
        return loss.to(torch.float64 if student.dtype == torch.float64 else torch.float32)
    if not compiling:
        loss = _SparseKLFunction.apply(s2, ids, lps, weight, t, t0, tail, red != "none")
    else:
        rows, _ = sparse_kl_op(
            s2, ids, lps, weight, t, t0, tail, student.requires_grad and torch.is_grad_enabled()
        )
        loss = rows if red == "none" else rows.sum()
    return loss.reshape(lead) if red == "none" else loss
