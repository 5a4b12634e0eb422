"""Calls into the Triton kernels: tensors in, kernel launches, tensors out.

The GPU twin of ``_rust.py`` (same functions, same contract). triton and the
kernels (``kdcore.kernels``) are imported on the first call, never by
``import kdcore``. CPU tensors run under the Triton interpreter (set
``TRITON_INTERPRET=1`` before triton is imported): that is how the tests
check these kernels without a GPU.

Launch shape: one program per row (or, for some tuned configurations, a
fixed number of programs looping over rows); a row is read in column blocks
of ``BLOCK`` elements. On CUDA the block size, warps and grid are chosen by
``triton.autotune`` per vocabulary size and kernel variant (a few
configurations, timed on the first call); ``KDCORE_TRITON_AUTOTUNE=0`` uses
one fixed configuration instead. ``KDCORE_TRITON_BLOCK=n`` (or
:func:`set_block`) forces the column block (tests use small blocks so that a
short row spans several).

Nothing here synchronises with the device on the hot path: no ``.item()``,
no data-dependent Python branch. (The sparse teacher's ids are validated
with one reduction and one sync per call, as on the CPU.)
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import types

import torch

from ._topk import check_rows

_DIVERGENCES = {"kl": 0, "reverse_kl": 1, "tvd": 2, "jsd": 3}
_TAILS = {"bucket": 0, "renormalize": 1, "zero": 2}
_LOG2E = 1.4426950408889634

#: Column block forced for every kernel (None: chosen per launch).
_block_override: int | None = int(os.environ.get("KDCORE_TRITON_BLOCK", "0") or 0) or None
_autotune = os.environ.get("KDCORE_TRITON_AUTOTUNE", "1") != "0"

#: Largest block of the interpreter (numpy per block op: bigger is faster).
_INTERPRETER_BLOCK = 4096
#: Rows shorter than this run one untuned configuration with the whole row in one block.
_SMALL_VOCAB = 4096
#: The fixed configuration (no autotune): block, warps.
_DEFAULT = (4096, 16)  # warps follow from the block: 8 elements per thread


def set_block(block: int | None) -> None:
    """Forces the column block of every kernel (a power of 2 >= 16), or restores
    the per-launch choice with ``None``."""
    global _block_override
    if block is not None and (block < 16 or block & (block - 1)):
        raise ValueError(f"block must be a power of 2 >= 16, got {block}")
    _block_override = block


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _modules() -> types.SimpleNamespace:
    try:
        import triton
    except ImportError as exc:  # pragma: no cover - guarded by _dispatch
        raise RuntimeError(f"the Triton kernels need triton: {exc}") from exc
    from .kernels import distill, scale, softmax, sparse

    ns = types.SimpleNamespace(triton=triton, distill=distill, scale=scale)
    ns.softmax, ns.sparse = softmax, sparse
    ns.tuned = {
        "softmax_fwd": _tuned(triton, softmax.softmax_fwd_kernel, ["V", "LOG"]),
        "softmax_bwd": _tuned(triton, softmax.softmax_bwd_kernel, ["V", "LOG"]),
        "distill": _tuned(
            triton,
            distill.distill_kernel,
            ["V", "DIV", "HAS_CE", "CE_T1", "GRAD_S", "GRAD_T"],
        ),
        "sparse_kl": _tuned(triton, sparse.sparse_kl_kernel, ["V", "TAIL", "GRAD"]),
    }
    return ns


def _tuned(triton, kernel, key):
    """The kernel under triton.autotune: column blocks of 1k-4k elements with
    8 or 16 elements per thread, one program per row or one or two per SM.

    (Compiled for sm_90a, the distill kernel needs 100-128 registers at 8
    elements per thread and 196-204 at 16, without spills; BLOCK 8192 with 16
    warps spills, so it is not offered.)"""
    configs = [
        triton.Config({"BLOCK": block, "PROGRAMS_PER_SM": pps}, num_warps=warps)
        for block, warps, pps in [
            (1024, 4, 0),
            (2048, 8, 0),
            (4096, 16, 0),
            (2048, 4, 0),
            (4096, 8, 0),
            (4096, 16, 1),
            (2048, 8, 2),
        ]
    ]
    return triton.autotune(configs=configs, key=key)(kernel)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _grid(rows: int, device: torch.device, programs_per_sm: int) -> tuple[int]:
    if programs_per_sm and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return (max(1, min(rows, _sm_count(index) * programs_per_sm)),)
    return (rows,)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch(name: str, kernel, rows: int, vocab: int, device: torch.device, args, consts):
    with _on(device):
        _launch_here(name, kernel, rows, vocab, device, args, consts)


def _launch_here(name, kernel, rows, vocab, device, args, consts):
    """Launches ``kernel`` over ``rows`` rows: autotuned on CUDA for long rows,
    else one configuration."""
    m = _modules()
    fixed = _block_override is not None or device.type != "cuda" or interpreting()
    if fixed or vocab <= _SMALL_VOCAB or not _autotune:
        if _block_override is not None:
            block = _block_override
        elif device.type != "cuda" or interpreting():
            block = min(_next_pow2(vocab), _INTERPRETER_BLOCK)
        elif vocab <= _SMALL_VOCAB:
            block = max(16, _next_pow2(vocab))
        else:
            block = _DEFAULT[0]
        warps = max(1, min(16, block // 256))  # 8 elements per thread
        kernel[(rows,)](*args, **consts, BLOCK=block, num_warps=warps)
        return
    tuned = m.tuned[name]
    tuned[lambda meta: _grid(rows, device, meta["PROGRAMS_PER_SM"])](*args, **consts)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """2-D logits with unit column stride (any row stride, even 0)."""
    x = x.detach()
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type == "cpu" and not interpreting():
            raise RuntimeError(
                "the Triton kernels run on CPU tensors only under the Triton interpreter: "
                "set TRITON_INTERPRET=1 before triton is imported (KDCORE_BACKEND=triton on "
                "CPU tensors is meant for testing), or use CUDA tensors."
            )


def _inverse_temperature(temperature: float) -> float:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: must be finite and > 0, got {temperature}")
    return 1.0 / temperature


def softmax(x: torch.Tensor, temperature: float, log: bool) -> torch.Tensor:
    _check(x)
    inv_t = _inverse_temperature(temperature)
    x = _rows(x)
    rows, vocab = x.shape
    out = torch.empty((rows, vocab), dtype=x.dtype, device=x.device)
    if out.numel():
        args = (x, out, rows, vocab, x.stride(0), out.stride(0), _LOG2E * inv_t)
        _launch("softmax_fwd", _modules().softmax.softmax_fwd_kernel, rows, vocab, x.device,
                args, {"LOG": bool(log)})  # fmt: skip
    return out


def softmax_backward(
    grad: torch.Tensor, y: torch.Tensor, temperature: float, log: bool
) -> torch.Tensor:
    _check(y, grad)
    inv_t = _inverse_temperature(temperature)
    y, grad = _rows(y), _rows(grad)
    rows, vocab = y.shape
    grad_x = torch.empty((rows, vocab), dtype=y.dtype, device=y.device)
    if grad_x.numel():
        args = (y, grad, grad_x, rows, vocab, y.stride(0), grad.stride(0), grad_x.stride(0), inv_t)
        _launch("softmax_bwd", _modules().softmax.softmax_bwd_kernel, rows, vocab, y.device,
                args, {"LOG": bool(log)})  # fmt: skip
    return grad_x


def distill(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: torch.Tensor,
    temperature: float,
    divergence: str,
    beta: float,
    labels: torch.Tensor | None,
    ce_weight: torch.Tensor | None,
    grad_student: bool,
    grad_teacher: bool,
    *,
    grad_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Per-row weighted divergence (and CE), plus gradients of their sum.

    Returns ``(div_rows, ce_rows or None, grad_student or None, grad_teacher or None)``
    exactly as ``_rust.distill``; ``grad_dtype`` (default: the student's) is
    the dtype the student gradient is stored in, rounded once in the kernel.
    (A label outside [0, V) with a non-zero CE weight gives a NaN CE instead
    of an error: checking would need a sync.)
    """
    _check(student, teacher)
    inv_t = _inverse_temperature(temperature)
    if divergence not in _DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"beta: JSD needs 0 < beta < 1 (0 and 1 are the KLs), got {beta}")
    if (labels is None) != (ce_weight is None):
        raise ValueError("labels and ce_weight go together: give both or neither")
    s, t = _rows(student), _rows(teacher)
    if s.shape != t.shape:
        raise ValueError(f"student and teacher shapes differ: {s.shape} vs {t.shape}")
    rows, vocab = s.shape
    dev = s.device
    weight = weight.detach().to(device=dev, dtype=torch.float32).contiguous()
    loss = torch.empty(rows, dtype=torch.float32, device=dev)
    ce_loss = None
    if labels is not None:
        labels = labels.detach().to(device=dev, dtype=torch.int64).contiguous()
        ce_weight = ce_weight.detach().to(device=dev, dtype=torch.float32).contiguous()
        ce_loss = torch.empty(rows, dtype=torch.float32, device=dev)
    gs_dtype = s.dtype if grad_dtype is None else grad_dtype
    gs = torch.empty((rows, vocab), dtype=gs_dtype, device=dev) if grad_student else None
    gt = torch.empty((rows, vocab), dtype=t.dtype, device=dev) if grad_teacher else None
    if rows == 0:
        return loss, ce_loss, gs, gt
    beta = float(beta)
    jsd = divergence == "jsd"
    args = (
        s, t, weight, loss,
        labels if labels is not None else loss,
        ce_weight if ce_weight is not None else loss,
        ce_loss if ce_loss is not None else loss,
        gs if gs is not None else s,
        gt if gt is not None else t,
        rows, vocab, s.stride(0), t.stride(0),
        gs.stride(0) if gs is not None else 0,
        gt.stride(0) if gt is not None else 0,
        inv_t, _LOG2E * inv_t, beta, 1.0 - beta,
        math.log(beta) if jsd else 0.0,
        math.log1p(-beta) if jsd else 0.0,
    )  # fmt: skip
    consts = {
        "DIV": _DIVERGENCES[divergence],
        "HAS_CE": labels is not None,
        "CE_T1": labels is not None and temperature != 1.0,
        "GRAD_S": bool(grad_student),
        "GRAD_T": bool(grad_teacher),
    }
    _launch("distill", _modules().distill.distill_kernel, rows, vocab, dev, args, consts)
    return loss, ce_loss, gs, gt


def _teacher(ids, logprobs, weight, vocab, ratio, tail):
    """The sparse teacher in float64, ids sorted per row: (ids, p, Σ p log p,
    p_tail, log p_tail, Σ p). Validates like the Rust kernel (rows of weight 0
    are not checked)."""
    k = ids.shape[-1]
    ids_sorted, lp, mass = check_rows(ids, logprobs, weight != 0, vocab)
    # The k ids plus the tail as one category, re-tempered: p_c ∝ m_c^ratio.
    if tail == "renormalize" or k == vocab:  # (k = V: the missing mass is rounding noise)
        m_tail = torch.zeros_like(mass)
    else:
        m_tail = (1.0 - mass).clamp_min(0.0)
    has_tail = m_tail > 0
    log_tail = torch.where(has_tail, ratio * m_tail.clamp_min(1e-300).log(), -math.inf)
    scaled = ratio * lp
    top = torch.maximum(scaled.amax(-1), log_tail)
    e = (scaled - top.unsqueeze(-1)).exp()
    e_tail = torch.where(has_tail, (log_tail - top).exp(), 0.0)
    z = e.sum(-1) + e_tail
    p = e / z.unsqueeze(-1)
    p_tail = e_tail / z
    plogp = torch.where(p > 0, p * p.clamp_min(1e-300).log(), 0.0).sum(-1)
    log_p_tail = torch.where(p_tail > 0, p_tail.clamp_min(1e-300).log(), 0.0)
    return ids_sorted.contiguous(), p.contiguous(), plogp, p_tail, log_p_tail, p.sum(-1)


def sparse_kl(
    student: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    weight: torch.Tensor,
    temperature: float,
    teacher_temperature: float,
    tail: str,
    grad_student: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row weighted sparse-teacher KL and, on request, the student gradient."""
    _check(student)
    inv_t = _inverse_temperature(temperature)
    inv_t0 = _inverse_temperature(teacher_temperature)
    if tail not in _TAILS:
        raise ValueError(f"tail must be bucket, renormalize or zero, got {tail}")
    s = _rows(student)
    rows, vocab = s.shape
    dev = s.device
    if teacher_ids.dim() != 2 or teacher_ids.shape != teacher_logprobs.shape:
        raise ValueError("teacher_ids and teacher_logprobs must have the same shape (rows, k)")
    if teacher_ids.shape[0] != rows:
        raise ValueError(f"teacher_ids has {teacher_ids.shape[0]} rows but student has {rows}")
    k = teacher_ids.shape[1]
    if k == 0:
        raise ValueError("k: the sparse teacher needs k >= 1 entries per row")
    weight = weight.detach().to(device=dev, dtype=torch.float32).contiguous()
    loss = torch.empty(rows, dtype=torch.float32, device=dev)
    grad = torch.empty((rows, vocab), dtype=s.dtype, device=dev) if grad_student else None
    if rows == 0:
        return loss, grad
    ids = teacher_ids.detach().to(device=dev, dtype=torch.int64)
    # As the CPU kernel: stored log-probabilities as float32, then float64 math.
    lps = teacher_logprobs.detach().to(device=dev, dtype=torch.float32).to(torch.float64)
    ids, p, plogp, p_tail, log_p_tail, p_sum = _teacher(
        ids, lps, weight, vocab, inv_t / inv_t0, tail
    )
    args = (
        s, ids, p, plogp, p_tail, log_p_tail, p_sum, weight, loss,
        grad if grad is not None else s,
        rows, vocab, k, s.stride(0), grad.stride(0) if grad is not None else 0,
        inv_t, _LOG2E * inv_t,
    )  # fmt: skip
    consts = {
        "TAIL": _TAILS[tail],
        "GRAD": bool(grad_student),
        "KBLOCK": min(_next_pow2(k), 1024),
    }
    _launch("sparse_kl", _modules().sparse.sparse_kl_kernel, rows, vocab, dev, args, consts)
    return loss, grad


def scale_grad(saved: torch.Tensor, grad_out: torch.Tensor, owner: object, key: str):
    """``saved * grad_out`` for the backward of a fused op, with no host sync
    and no second (rows, V) buffer in the common case.

    The first backward through ``owner`` (the autograd context) scales
    ``saved`` in place, skipping rows whose factor is exactly 1 on the
    device (so ``loss.backward()`` touches nothing), and returns it. A later
    backward through the same graph (``retain_graph=True``) writes a new
    tensor ``saved * grad_out / (factor of the first)`` instead, so a
    gradient already handed out is never changed.
    """
    if saved.numel() == 0:
        return saved
    rows, vocab = saved.shape
    factor = grad_out.detach().to(torch.float32).reshape(-1)
    if factor.numel() not in (1, rows):
        raise ValueError(f"grad_output of {factor.numel()} values for {rows} rows")
    stride_f = factor.stride(0) if factor.numel() == rows and rows > 1 else 0
    state = owner.__dict__.setdefault("_kdcore_scaled", {})
    kernel = _modules().scale.scale_kernel
    block = _block_override or min(_next_pow2(vocab), 4096)
    warps = 4 if interpreting() or saved.device.type != "cuda" else 8
    with _on(saved.device):
        return _scale(kernel, saved, factor, state, key, rows, vocab, stride_f, block, warps)


def _scale(kernel, saved, factor, state, key, rows, vocab, stride_f, block, warps):
    first = state.get(key)
    if first is None:
        state[key] = factor.clone()
        kernel[(rows,)](saved, saved, factor, factor, rows, vocab, saved.stride(0),
                        saved.stride(0), stride_f, 0, HAS_DEN=False, SKIP_ONE=True,
                        BLOCK=block, num_warps=warps)  # fmt: skip
        return saved
    out = torch.empty_like(saved)
    stride_d = first.stride(0) if first.numel() == rows and rows > 1 else 0
    kernel[(rows,)](saved, out, factor, first, rows, vocab, saved.stride(0), out.stride(0),
                    stride_f, stride_d, HAS_DEN=True, SKIP_ONE=False, BLOCK=block,
                    num_warps=warps)  # fmt: skip
    return out
