"""The fused linear loss's problem: every argument checked once, in
``build_problem``, into one ``Problem``; the chunk budgets and the helpers
every strategy (row chunks, vocabulary slices, vocabulary shards, the
unfused reference) shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _modes, _validate
from .. import spans as _spans
from . import _logit_transform
from ._linear import logits_fp32
from .fused import DIVERGENCES
from .kl import kernel_divergence
from .sparse import TAILS

#: Row chunks: fp32 bytes of logits (student, teacher, gradient) one chunk may
#: hold. Chunks must be tall enough for the GEMMs to run at speed: each GEMM
#: call packs the whole (V, H) weight again, so short chunks pay that per chunk.
#: On the CPU at V = 32000, H = 512, 2048 rows: 350-row chunks (128 MiB) ran
#: 1.14-1.23x the full-size GEMMs' time, 700-row chunks (256 MiB) 1.10-1.12x,
#: 1024-row chunks 1.07-1.09x.
CHUNK_BUDGET_BYTES = {"cpu": 256 << 20, "cuda": 256 << 20}
MIN_CHUNK_ROWS = 64
#: Vocabulary slices: fp32 bytes of (rows, slice) temporaries one slice may
#: hold (about five of them).
SLICE_BUDGET_BYTES = {"cpu": 64 << 20, "cuda": 256 << 20}
MIN_SLICE = 128


def default_rows(width: int, device: torch.device) -> int:
    """Rows per chunk when each row's logits are ``width`` wide."""
    budget = CHUNK_BUDGET_BYTES.get(device.type, CHUNK_BUDGET_BYTES["cpu"])
    return max(MIN_CHUNK_ROWS, budget // (max(width, 1) * 4 * 3))


def default_slice(rows: int, device: torch.device) -> int:
    """Vocabulary columns per slice when all ``rows`` are processed at once."""
    budget = SLICE_BUDGET_BYTES.get(device.type, SLICE_BUDGET_BYTES["cpu"])
    return max(MIN_SLICE, budget // (max(rows, 1) * 4 * 5) // MIN_SLICE * MIN_SLICE)


def zero_unread(x: torch.Tensor, read: torch.Tensor | None) -> torch.Tensor:
    """``x`` (rows, ...) with the rows no term reads set to 0: they may hold
    NaN, which must reach neither a sum nor a gradient. ``read=None``: every
    row is read, ``x`` is returned as it is."""
    return x if read is None else torch.where(read[:, None], x, 0.0)


def unless_all_read(read: torch.Tensor) -> torch.Tensor | None:
    """``read``, or None where every row is read and that is known on the CPU
    (one host check saves a masking copy of each chunk; on CUDA it would cost
    a device sync)."""
    return None if read.device.type == "cpu" and bool(read.all()) else read


def weighted(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ_j p_j x_j per row in float64, 0 · anything = 0 (x may be ±inf or NaN where p = 0)."""
    return torch.where(p > 0, p * x, 0.0).sum(dim=1, dtype=torch.float64)


@dataclass(frozen=True)
class Problem:
    """Everything one fused-linear call needs besides the student's h, W, b.

    Rows are flattened: ``teacher_logits`` (N, V_t) or ``teacher_hidden``
    (N, H_t) with ``teacher_weight`` (V_t, H_t), or ``topk_ids`` /
    ``topk_logprobs`` (N, k); ``labels`` (N,) with masked rows set to 0;
    ``div_weight`` and ``ce_weight`` are per-row weights of the two terms.
    The field order is the registered op's argument order.
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
    # Logit transforms (``_logit_transform``): z -> cap · tanh(scale · z / cap).
    student_scale: float = 1.0
    teacher_scale: float = 1.0
    student_cap: float | None = None
    teacher_cap: float | None = None

    @property
    def hard(self) -> bool:
        """Whether the hard-label CE term is present (labels and their weights)."""
        return self.labels is not None and self.ce_weight is not None

    def rows_read(self) -> torch.Tensor:
        """Rows some term has a non-zero weight on (bool, (N,))."""
        read = self.div_weight != 0
        return read | (self.ce_weight != 0) if self.ce_weight is not None else read

    def teacher_rows(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense teacher's logits of rows [start, stop), at least fp32, no
        gradient, transformed (``teacher_logit_scale``, ``teacher_softcap``);
        computed from teacher hidden states into ``out`` where the dtypes allow
        (a buffer the caller reuses)."""
        with torch.no_grad():
            if self.teacher_logits is not None:
                z = self.teacher_logits[start:stop]
                z = z.to(torch.promote_types(z.dtype, torch.float32))
                return self.teacher_transform(z, inplace=False)  # z may be the caller's
            hidden = self.teacher_hidden[start:stop]
            z = logits_fp32(hidden, self.teacher_weight, self.teacher_bias, out)
            return self.teacher_transform(z, inplace=True)

    def teacher_transform(self, z: torch.Tensor, *, inplace: bool) -> torch.Tensor:
        return _logit_transform.transform(z, self.teacher_scale, self.teacher_cap, inplace=inplace)

    def student_transform(self, z: torch.Tensor, *, inplace: bool) -> torch.Tensor:
        """The student's logits transformed (``student_logit_scale``, ``student_softcap``);
        ``inplace`` for a fresh buffer outside autograd."""
        return _logit_transform.transform(z, self.student_scale, self.student_cap, inplace=inplace)

    @property
    def student_transformed(self) -> bool:
        return not _logit_transform.is_identity(self.student_scale, self.student_cap)

    def student_chain_(
        self, grad: torch.Tensor, transformed: torch.Tensor, *, consume: bool = False
    ) -> torch.Tensor:
        """``grad`` w.r.t. the transformed student logits -> w.r.t. the logits (in
        place); ``consume``: ``transformed`` may be overwritten."""
        return _logit_transform.chain_(
            grad, transformed, self.student_scale, self.student_cap, consume=consume
        )


@dataclass(frozen=True)
class Checked:
    """``build_problem``'s result: the flattened hidden states, the problem,
    and what the vocabulary-parallel path checks across ranks."""

    hidden: torch.Tensor  # (N, H)
    problem: Problem
    divergence: str  # the user's name (the reference path's)
    labels: torch.Tensor | None  # as given (global token ids)
    hidden_sizes: tuple[int, int]  # student: hidden states', weight's
    teacher_hidden_sizes: tuple[int, int]  # the same for the teacher; zeros without one


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


def build_problem(
    student_hidden,
    student_weight,
    *,
    teacher_hidden,
    teacher_weight,
    teacher_logits,
    teacher_topk,
    labels,
    student_bias,
    teacher_bias,
    divergence,
    beta,
    temperature,
    alpha,
    ignore_index,
    spans,
    span_weights,
    normalize,
    teacher_temperature,
    tail,
    reduction,
    scale_t2,
    pad_vocab,
    chunk_size,
    chunk_over,
    sharded: bool,
    student_logit_scale=1.0,
    teacher_logit_scale=1.0,
    student_softcap=None,
    teacher_softcap=None,
) -> Checked:
    """Check every argument of ``fused_linear_distillation_loss`` and build its
    problem: labels, spans, reduction and T² folded into per-row weights of the
    divergence and CE terms. ``sharded``: the weights are vocabulary shards
    (their sizes and the label range are checked across ranks instead)."""
    h = _matrix("student_hidden", student_hidden, student_hidden.dim())
    if h.dim() < 2:
        raise ValueError(f"student_hidden must have shape (..., H), got {tuple(h.shape)}")
    w = _matrix("student_weight", student_weight, 2)
    if w.shape[1] != h.shape[-1] and not sharded:
        raise ValueError(
            f"student_weight must have shape (V, {h.shape[-1]}) for student_hidden "
            f"{tuple(h.shape)}, got {tuple(w.shape)}"
        )
    lead, vocab_s = h.shape[:-1], w.shape[0]
    if student_bias is not None:
        _bias("student_bias", student_bias, vocab_s, "student_weight")
    t = _validate.temperature(temperature)
    a = _validate.alpha(alpha)
    beta = _validate.beta(beta)
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}; got {divergence!r}")
    red = _validate.reduction(reduction)
    s_scale = _validate.logit_scale("student_logit_scale", student_logit_scale)
    t_scale = _validate.logit_scale("teacher_logit_scale", teacher_logit_scale)
    s_cap = _validate.softcap("student_softcap", student_softcap)
    t_cap = _validate.softcap("teacher_softcap", teacher_softcap)
    if red == "none":
        raise ValueError(
            "reduction='none' is not offered by the fused linear loss; use 'mean' or 'sum'"
        )
    given = [
        teacher_logits is not None,
        teacher_hidden is not None or teacher_weight is not None,
        teacher_topk is not None,
    ]
    if sum(given) != 1:
        raise ValueError(
            "give the teacher once: as teacher_logits, as teacher_hidden and teacher_weight, "
            "or as teacher_topk=(ids, logprobs)"
        )
    topk = None
    t_sizes = (0, 0)
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
        if not _logit_transform.is_identity(t_scale, t_cap):
            raise ValueError(
                "teacher_logit_scale / teacher_softcap transform teacher logits, but a top-k "
                "teacher gives log-probabilities: store them from the transformed logits"
            )
        if tail not in TAILS:
            raise ValueError(f"tail must be one of {', '.join(TAILS)}; got {tail!r}")
        ids, lps = teacher_topk
        # A zero-stride stand-in for the student logits: shapes only, no memory.
        shape_only = h.new_zeros(()).expand(*lead, vocab_s)
        lps = _validate.topk_teacher(ids, lps, shape_only)
        topk = (ids.reshape(-1, ids.shape[-1]), lps.reshape(-1, lps.shape[-1]))
        vocab_t = vocab_s
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("teacher_hidden and teacher_weight go together")
        th = _matrix("teacher_hidden", teacher_hidden, teacher_hidden.dim())
        tw = _matrix("teacher_weight", teacher_weight, 2)
        sizes_differ = tw.shape[1] != th.shape[-1] and not sharded
        if th.shape[:-1] != lead or sizes_differ:
            raise ValueError(
                f"teacher_hidden {tuple(th.shape)} and teacher_weight {tuple(tw.shape)} do not "
                f"fit student_hidden {tuple(h.shape)}"
            )
        vocab_t = tw.shape[0]
        t_sizes = (th.shape[-1], tw.shape[1])
        if teacher_bias is not None:
            _bias("teacher_bias", teacher_bias, vocab_t, "teacher_weight")
    if teacher_bias is not None and teacher_weight is None:
        raise ValueError("teacher_bias goes with teacher_hidden and teacher_weight")
    if min(vocab_s, vocab_t) < 1 and not sharded:  # sharded: a shard's size is checked on all ranks
        who = "student_weight" if vocab_s < 1 else "teacher_weight"
        raise ValueError(f"{who} has no rows: the vocabulary needs at least one entry")
    if vocab_s != vocab_t and not pad_vocab and not sharded:  # sharded: collective
        raise ValueError(
            f"student vocabulary {vocab_s} != teacher vocabulary {vocab_t}; pass pad_vocab=True "
            "to pad the smaller one with -inf logits (zero probability)"
        )
    vocab = max(vocab_s, vocab_t)
    if labels is not None:
        labels = _validate.labels(labels, lead, h)
        if _modes.inspectable(labels, h) and not sharded:
            _validate.labels_in_vocab(labels, vocab_s, ignore_index)  # sharded: global ids
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
        spans, weights = _validate.spans_beside_labels(spans, span_weights, normalize, red, lead, h)
        base, _ = _spans.span_row_weights(spans, weights, normalize, 1.0, weight_dtype, valid=valid)
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
        chunk = default_slice(rows, h.device)
    else:
        chunk = default_rows(vocab, h.device)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    problem = Problem(
        teacher_logits=None if teacher_logits is None else teacher_logits.reshape(-1, vocab_t),
        teacher_hidden=(None if teacher_hidden is None else teacher_hidden.reshape(-1, t_sizes[0])),
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias,
        topk_ids=None if topk is None else topk[0],
        topk_logprobs=None if topk is None else topk[1],
        labels=safe,
        div_weight=div_w,
        ce_weight=ce_w,
        temperature=t,
        teacher_temperature=t0,
        tail=tail,
        divergence=code,
        beta=beta,
        vocab=vocab,
        chunk_size=chunk,
        chunk_over=chunk_over,
        student_scale=s_scale,
        teacher_scale=t_scale,
        student_cap=s_cap,
        teacher_cap=t_cap,
    )
    return Checked(
        hidden=h2,
        problem=problem,
        divergence=divergence,
        labels=labels,
        hidden_sizes=(h.shape[-1], w.shape[1]),
        teacher_hidden_sizes=t_sizes,
    )
