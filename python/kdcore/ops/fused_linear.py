"""Linear layer + distillation loss without materialising the logits:
``kdcore.fused_linear_distillation_loss``. The arguments are checked into one
problem (``_fused_linear_problem``), which one of three paths computes: row
chunks around the fused Rust or Triton kernel (``_fused_linear_rows``) or
vocabulary slices (``_fused_linear_vocab``), both under the autograd of
``_fused_linear_autograd``; vocabulary shards of a tensor-parallel head
(``vocab_parallel``); or, for float64 and devices without a kernel, the
unfused reference (``_fused_linear_reference``)."""

from __future__ import annotations

import torch

from .. import _dispatch
from ._fused_linear_autograd import fused_loss
from ._fused_linear_problem import build_problem
from ._fused_linear_reference import unfused_loss
from .vocab_parallel import VocabParallel, reject_unsupported, vocab_parallel_loss

__all__ = ["VocabParallel", "fused_linear_distillation_loss"]


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
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
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

    Rows are processed in chunks of ``chunk_size`` (default: what fits 256 MiB
    of fp32 logits, at least 64 rows): each
    chunk's logits are formed with fp32 accumulation and kept in fp32 (never
    rounded to bf16 before the loss), go through the fused kernel, and give
    their share of the gradients w.r.t. ``student_hidden``, ``student_weight``
    (accumulated in fp32, cast at the end) and ``student_bias``.

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

    Logit transforms, per model: ``student_logit_scale`` / ``teacher_logit_scale``
    multiply the logits, ``student_softcap`` / ``teacher_softcap`` cap them
    softly: the logits become ``cap · tanh(scale · z / cap)`` (``scale · z``
    without a cap), then are divided by the temperature; the CE term sees the
    transformed student logits too. Gradients flow through the tanh. Applied to
    each chunk's logits (never to a full (tokens × vocab) tensor), before any
    ``pad_vocab`` padding (padded entries stay -inf; a teacher's own -inf logit
    becomes -cap under a cap, as the formula says). A top-k teacher takes no
    teacher transform (its log-probabilities are final).

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
    sharded = vocab_parallel is not None
    if sharded:
        reject_unsupported(
            vocab_parallel,
            teacher_topk=teacher_topk,
            chunk_over=chunk_over,
            pad_vocab=pad_vocab,
            divergence=divergence,
        )
    checked = build_problem(
        student_hidden,
        student_weight,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        teacher_logits=teacher_logits,
        teacher_topk=teacher_topk,
        labels=labels,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        alpha=alpha,
        ignore_index=ignore_index,
        spans=spans,
        span_weights=span_weights,
        normalize=normalize,
        teacher_temperature=teacher_temperature,
        tail=tail,
        reduction=reduction,
        scale_t2=scale_t2,
        pad_vocab=pad_vocab,
        chunk_size=chunk_size,
        chunk_over=chunk_over,
        sharded=sharded,
        student_logit_scale=student_logit_scale,
        teacher_logit_scale=teacher_logit_scale,
        student_softcap=student_softcap,
        teacher_softcap=teacher_softcap,
    )
    h2, w, problem = checked.hidden, student_weight, checked.problem
    if sharded:
        loss = vocab_parallel_loss(
            h2,
            w,
            student_bias,
            checked,
            vocab_parallel,
            ignore_index=ignore_index,
            chunk_given=chunk_size is not None,
        )
        if loss is not None:
            return loss
    route = _dispatch.route(student_hidden, w)
    if route is None:
        return unfused_loss(h2, w, student_bias, problem, checked.divergence)
    return fused_loss(route, h2, w, student_bias, problem)
