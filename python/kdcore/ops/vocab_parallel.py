"""The fused linear loss with a vocabulary-parallel (tensor-parallel) LM head.

Each rank of a process group holds rows ``[start, stop)`` of the output
matrices (student and teacher) and of their biases; the hidden states and
the labels (global token ids) are the same on every rank. Per chunk of rows,
each rank forms only its own logits ``(chunk, stop - start)`` and three sums
over the group complete the row statistics:

1. all-reduce MAX: the row maxima of z_s / T, z_t / T and z_s (the CE at T = 1);
2. all-reduce SUM: Σ exp(logit − max) of each, and the label's logit (held by
   one rank) — giving the log-partitions, hence log Q, log P and the CE;
3. all-reduce SUM: the divergence's partial sums (and, for JSD, Σ Q·(log Q −
   log M), which its gradient needs).

The gradient w.r.t. the local logits then follows locally: the weight and
bias gradients are this rank's slice of the full ones, and the hidden-state
gradient (a sum over the vocabulary) is all-reduced once at the end, so every
rank holds the full gradient. Nothing of the full vocabulary's width is
formed and no weight is gathered. Arithmetic is torch's (fp32 elementwise,
float64 row totals; float64 throughout for float64 inputs), on any device.

Before any of that one all-gather of a few integers per rank checks that the
shards tile ``[0, V)`` exactly and that sizes and options agree, so a wrong
setup fails on every rank with the same error instead of hanging.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from .. import _modes, _validate
from ._fused_linear_problem import Checked, default_rows, weighted, zero_unread
from ._grad import scale_rows
from ._linear import addmm32_, mm32, tensor_cores

#: The divergences the sharded loss computes (JSD with β 0 or 1 is a KL).
DIVERGENCES = ("kl", "reverse_kl", "jsd")

#: A group of one rank holds the whole vocabulary and runs the plain fused
#: path (the Rust / Triton kernel); tests and benchmarks set this False to run
#: the sharded arithmetic there (without collectives).
PLAIN_PATH_AT_SIZE_ONE = True


@dataclass(frozen=True)
class VocabParallel:
    """This rank's slice ``[start, stop)`` of a vocabulary split over ``group``
    (a ``torch.distributed`` process group; None: the default group).

    Pass it as ``fused_linear_distillation_loss(..., vocab_parallel=...)``
    with this rank's rows of the output matrices and biases.
    """

    start: int
    stop: int
    group: Any = None

    def __post_init__(self) -> None:
        for name in ("start", "stop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"VocabParallel.{name} must be an int, got {value!r}")
        if not 0 <= self.start < self.stop:
            raise ValueError(
                f"VocabParallel needs 0 <= start < stop; got start={self.start}, stop={self.stop}"
            )

    @property
    def width(self) -> int:
        return self.stop - self.start

    def group_size(self) -> int:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            if self.group is not None:
                raise RuntimeError(
                    "VocabParallel has a group but torch.distributed is not initialised"
                )
            return 1
        return dist.get_world_size(self.group)


def reject_unsupported(vp: object, *, teacher_topk, chunk_over, pad_vocab, divergence) -> None:
    """Options the sharded loss does not offer: the same on every rank for the
    same call, so raising here (before any collective) cannot leave a rank waiting."""
    if not isinstance(vp, VocabParallel):
        raise TypeError(f"vocab_parallel must be a kdcore.VocabParallel, got {type(vp).__name__}")
    if teacher_topk is not None:
        raise ValueError("vocab_parallel needs a dense teacher (sharded logits or hidden states)")
    if chunk_over != "rows":
        raise ValueError(f"vocab_parallel chunks over rows; got chunk_over={chunk_over!r}")
    if pad_vocab:
        raise ValueError(
            "pad_vocab is not offered with vocab_parallel: shard both vocabularies alike"
        )
    if divergence not in DIVERGENCES:
        raise ValueError(
            f"vocab_parallel supports divergence {', '.join(DIVERGENCES)}; got {divergence!r}"
        )


def check_shards(
    vp: VocabParallel,
    *,
    vocab_s: int,
    vocab_t: int,
    rows: int,
    hidden: tuple[int, int],
    teacher_hidden: tuple[int, int],
    options: tuple,
    want: tuple[bool, bool, bool],
    chunk: int,
    device: torch.device,
) -> tuple[int, int, int]:
    """(global vocabulary, group size, common chunk rows), checked on every rank.

    ``hidden``: the hidden states' size and the weight's; ``teacher_hidden``
    the same for the teacher (zeros for teacher logits). A group of one rank
    must hold the whole vocabulary (``start == 0``); larger groups exchange
    one descriptor per rank and every rank raises the same ValueError for
    overlapping or missing shards, mismatched sizes or options.
    """
    local = []
    if vocab_s != vp.width:
        local.append(
            f"student_weight has {vocab_s} rows but VocabParallel({vp.start}, {vp.stop}) "
            f"covers {vp.width}"
        )
    if vocab_t != vp.width:
        local.append(f"the teacher's shard has {vocab_t} entries, the student's {vp.width}")
    for who, (h, w) in (("student", hidden), ("teacher", teacher_hidden)):
        if h != w:
            local.append(f"{who} hidden states have size {h} but its weight shard has {w} columns")
    size = vp.group_size()
    if size == 1:
        if vp.start != 0:
            local.append(
                f"a group of one rank holds the whole vocabulary: start must be 0, got {vp.start}"
            )
        if local:
            raise ValueError("vocab_parallel: " + "; ".join(local))
        return vp.stop, 1, chunk
    fingerprint = zlib.crc32(repr(options).encode())
    mine = torch.tensor(
        [
            vp.start,
            vp.stop,
            int(bool(local)),
            rows,
            hidden[1],
            teacher_hidden[1],
            fingerprint,
            int(want[0]),
            int(want[1]),
            int(want[2]),
            chunk,
        ],
        dtype=torch.int64,
        device=device,
    )
    every = [torch.empty_like(mine) for _ in range(size)]
    torch.distributed.all_gather(every, mine, group=vp.group)
    table = torch.stack(every).cpu().tolist()
    problems = ["this rank: " + "; ".join(local)] if local else []
    problems += [f"rank {r} does not fit its own shard" for r, d in enumerate(table) if d[2]]
    edge = 0
    for start, stop, r in sorted((d[0], d[1], r) for r, d in enumerate(table)):
        if start > edge:
            problems.append(f"no rank holds vocabulary rows [{edge}, {start})")
        elif start < edge:
            problems.append(f"rank {r}'s rows [{start}, {stop}) overlap another rank's (to {edge})")
        edge = max(edge, stop)
    names = (
        "rows of hidden states",
        "student weight hidden sizes",
        "teacher weight hidden sizes",
        "loss options or row weights (temperature, divergence, beta, labels, spans)",
        "hidden-state gradient requests",
        "weight gradient requests",
        "bias gradient requests",
    )
    for index, name in enumerate(names, start=3):
        seen = [d[index] for d in table]
        if len(set(seen)) > 1:
            problems.append(f"the {name} differ across ranks" + ("" if index == 6 else f": {seen}"))
    if problems:
        raise ValueError(
            "vocab_parallel shards do not fit (checked on every rank): "
            + "; ".join(problems)
            + ". Each rank passes its rows [start, stop) of the output matrices; together "
            "they tile [0, V) once, with the same hidden states on every rank"
        )
    return edge, size, min(d[10] for d in table)


def _all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    """In place over ``group``; without a process group (one rank) nothing to do.
    A one-rank group still runs it (the GPU check exercises NCCL that way)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(x, op=op, group=group)
    return x


OP = "fused_linear_distillation_loss(vocab_parallel=...)"


class ShardedLoss(torch.autograd.Function):
    """The strategy over vocabulary shards (row chunks of ``chunk`` rows of this
    rank's shard ``vp``; see the module docstring) under autograd: forward
    computes the loss (the same on every rank) and every requested gradient
    (the full ``grad_h`` on every rank, this rank's slice of the weight and
    bias gradients); backward scales them. Eager mode only, so no registered
    op: a process group is not an op argument."""

    @staticmethod
    def forward(ctx, h, w, b, problem, vp: VocabParallel, chunk: int):
        want_b = b is not None and ctx.needs_input_grad[2]
        loss, *grads = _sharded(h, w, b, problem, vp, chunk, *ctx.needs_input_grad[:2], want_b)
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grads = [None if g is None else scale_rows(g, grad_out) for g in ctx.saved_tensors]
        return (*(_modes.first_order_only(g, OP) for g in grads), None, None, None)


def _sharded(h, w, b, problem, vp: VocabParallel, chunk: int, want_h, want_w, want_b):
    from torch.distributed import ReduceOp

    def reduce(x, op):
        return _all_reduce(x, op, vp.group)

    wide = torch.float64 if torch.float64 in (h.dtype, w.dtype) else torch.float32
    rows, device = h.shape[0], h.device
    inv_t, code, beta = 1.0 / problem.temperature, problem.divergence, problem.beta
    hard = problem.hard
    read = problem.rows_read()
    # GEMM operands as in the row-chunk path: a 16-bit shard stays 16-bit on
    # CUDA (fp32 accumulation, the logit gradient rounded once to its dtype);
    # elsewhere one fp32 (float64) copy of the shard.
    w_mm = w if tensor_cores(w, w) else w.to(wide)
    b_w = None if b is None else b.to(wide)
    grad_h = torch.zeros(h.shape, dtype=wide, device=device) if want_h else None
    grad_w = torch.zeros(w.shape, dtype=wide, device=device) if want_w else None
    grad_b = torch.zeros(w.shape[0], dtype=wide, device=device) if want_b else None
    total = torch.zeros((), dtype=torch.float64, device=device)
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        keep = read[r0:r1]
        h_c = zero_unread(h[r0:r1], keep).to(w_mm.dtype)
        z_s = mm32(h_c, w_mm.t())
        if b_w is not None:
            z_s = z_s + b_w
        z_s = problem.student_transform(z_s, inplace=True)  # shard-local, elementwise
        z_t = zero_unread(problem.teacher_rows(r0, r1).to(wide), keep)
        a, t = z_s * inv_t, z_t * inv_t
        # 1. maxima over the whole vocabulary (a shard of -inf logits gives -inf).
        maxima = torch.stack([a.amax(1), t.amax(1), z_s.amax(1)]).to(torch.float64)
        reduce(maxima, ReduceOp.MAX)
        m_s, m_t, m_1 = (maxima[i].to(wide)[:, None] for i in range(3))
        # 2. partition sums and the label's logit.
        sums = torch.zeros(4, r1 - r0, dtype=torch.float64, device=device)
        sums[0] = torch.exp(a - m_s).sum(1, dtype=torch.float64)
        sums[1] = torch.exp(t - m_t).sum(1, dtype=torch.float64)
        if hard:
            labels = problem.labels[r0:r1].long()
            here = (labels >= vp.start) & (labels < vp.stop)
            col = (labels - vp.start).clamp(0, vp.width - 1)
            sums[2] = torch.exp(z_s - m_1).sum(1, dtype=torch.float64)
            picked = z_s.gather(1, col[:, None]).squeeze(1).to(torch.float64)
            sums[3] = torch.where(here, picked, 0.0)
        reduce(sums, ReduceOp.SUM)
        lse_s = maxima[0] + torch.log(sums[0])
        lse_t = maxima[1] + torch.log(sums[1])
        log_q = a - lse_s.to(wide)[:, None]
        log_p = t - lse_t.to(wide)[:, None]
        q, p = torch.exp(log_q), torch.exp(log_p)
        # 3. the divergence's partial sums.
        if code == "kl":
            parts = weighted(p, log_p - log_q)[None]
        elif code == "reverse_kl":
            parts = weighted(q, log_q - log_p)[None]
        elif code == "jsd":
            log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
            ell = log_q - log_m
            parts = torch.stack([weighted(p, log_p - log_m), weighted(q, ell)])
        else:
            raise ValueError(f"vocab_parallel supports kl, reverse_kl and jsd; got {code!r}")
        reduce(parts, ReduceOp.SUM)
        div = parts[0] if code != "jsd" else beta * parts[0] + (1.0 - beta) * parts[1]
        div_w = problem.div_weight[r0:r1].to(torch.float64)
        total += torch.where(keep & (div_w != 0), div * div_w, 0.0).sum()
        if hard:
            lse_1 = maxima[2] + torch.log(sums[2])
            ce_w = problem.ce_weight[r0:r1].to(torch.float64)
            ce = lse_1 - sums[3]
            total += torch.where(keep & (ce_w != 0), ce * ce_w, 0.0).sum()
        if not (want_h or want_w or want_b):
            continue
        # The gradient w.r.t. this shard's logits.
        if code == "kl":
            g = q - p
        elif code == "reverse_kl":
            g = torch.where(q > 0, q * (log_q - log_p - div.to(wide)[:, None]), 0.0)
        else:
            g = torch.where(q > 0, (1.0 - beta) * q * (ell - parts[1].to(wide)[:, None]), 0.0)
        g = g * (div_w * inv_t).to(wide)[:, None]
        if hard:
            soft = torch.exp(z_s - lse_1.to(wide)[:, None]) * ce_w.to(wide)[:, None]
            onehot = torch.where(here, ce_w, 0.0).to(wide)
            g = soft.scatter_add(1, col[:, None], -onehot[:, None]) + g
        g = zero_unread(problem.student_chain_(g, z_s, consume=True), keep)
        if want_h:
            grad_h[r0:r1] = mm32(g.to(w_mm.dtype), w_mm)
        if want_w:
            addmm32_(grad_w, g.to(w_mm.dtype).t(), h_c)
        if want_b:
            grad_b += g.sum(0)
    if want_h:  # Σ over the vocabulary = Σ over the ranks' shards
        reduce(grad_h, ReduceOp.SUM)
    return (
        total.to(torch.float64 if wide == torch.float64 else torch.float32),
        None if grad_h is None else grad_h.to(h.dtype),
        None if grad_w is None else grad_w.to(w.dtype),
        None if grad_b is None else grad_b.to(b.dtype),
    )


def _rows_fingerprint(problem) -> list[float]:
    """Position-weighted sums of the row weights and labels (a host sync): they
    differ across ranks when the ranks' labels or spans do."""
    position = torch.arange(1, problem.div_weight.shape[0] + 1, device=problem.div_weight.device)
    rows = [problem.div_weight, problem.ce_weight, problem.labels]
    sums = [(x.double() * position).sum() for x in rows if x is not None]
    return torch.stack(sums).tolist()


def vocab_parallel_loss(
    h2, w, b, checked: Checked, vp: VocabParallel, *, ignore_index: int, chunk_given: bool
):
    """The loss over this rank's shard, or None where the group has one rank
    (its shard is the whole vocabulary: the plain fused path runs). Eager
    mode: collectives and host syncs."""

    def needs(x):
        return x is not None and x.requires_grad and torch.is_grad_enabled()

    problem, labels = checked.problem, checked.labels
    want = (needs(h2), needs(w), needs(b))
    teacher_vocab = (
        problem.teacher_logits.shape[1]
        if problem.teacher_logits is not None
        else problem.teacher_weight.shape[0]
    )
    chunk = problem.chunk_size if chunk_given else default_rows(vp.width, h2.device)
    options = (
        problem.temperature,
        problem.divergence,
        problem.beta,
        problem.labels is None,
        problem.ce_weight is None,
        problem.teacher_logits is None,
        b is None,
        problem.teacher_bias is None,
        problem.student_scale,
        problem.teacher_scale,
        problem.student_cap,
        problem.teacher_cap,
        _rows_fingerprint(problem),
    )
    vocab, size, chunk = check_shards(
        vp,
        vocab_s=w.shape[0],
        vocab_t=teacher_vocab,
        rows=h2.shape[0],
        hidden=checked.hidden_sizes,
        teacher_hidden=checked.teacher_hidden_sizes,
        options=options,
        want=want,
        chunk=chunk,
        device=h2.device,
    )
    if labels is not None and not torch.compiler.is_compiling():
        _validate.labels_in_vocab(labels, vocab, ignore_index)
    if size == 1 and PLAIN_PATH_AT_SIZE_ONE:
        return None
    return ShardedLoss.apply(h2, w, b, problem, vp, chunk)
