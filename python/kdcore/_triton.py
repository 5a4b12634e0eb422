"""Calls into the Triton kernels: tensors in, kernel launches, tensors out.

The GPU twin of ``_rust.py``: ``BACKEND``, the same
:class:`kdcore._backend.KernelBackend` contract. triton and the
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

from . import _validate
from ._backend import DistillArgs, DistillResult, SparseKLArgs
from ._topk import check_rows
from .ops._grad import graph_kept, scale_rows

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


def softmax(x: torch.Tensor, temperature: float, log: bool) -> torch.Tensor:
    _check(x)
    inv_t = 1.0 / _validate.kernel_temperature(temperature)
    x = _rows(x)
    rows, vocab = x.shape
    out = torch.empty((rows, vocab), dtype=x.dtype, device=x.device)
    if out.numel():
        args = (x, out, rows, vocab, x.stride(0), out.stride(0), _LOG2E * inv_t)
        kernel = _modules().softmax.softmax_fwd_kernel
        _launch("softmax_fwd", kernel, rows, vocab, x.device, args, {"LOG": bool(log)})
    return out


def softmax_backward(
    grad: torch.Tensor, y: torch.Tensor, temperature: float, log: bool
) -> torch.Tensor:
    _check(y, grad)
    inv_t = 1.0 / _validate.kernel_temperature(temperature)
    y, grad = _rows(y), _rows(grad)
    rows, vocab = y.shape
    grad_x = torch.empty((rows, vocab), dtype=y.dtype, device=y.device)
    if grad_x.numel():
        args = (y, grad, grad_x, rows, vocab, y.stride(0), grad.stride(0), grad_x.stride(0), inv_t)
        kernel = _modules().softmax.softmax_bwd_kernel
        _launch("softmax_bwd", kernel, rows, vocab, y.device, args, {"LOG": bool(log)})
    return grad_x


def distill(args: DistillArgs) -> DistillResult:
    """As ``_rust``; the student gradient is stored in ``grad_dtype``, rounded
    once in the kernel. (A label outside [0, V) with a non-zero CE weight gives
    a NaN CE instead of an error: checking would need a sync.)"""
    _check(args.student, args.teacher)
    _validate.kernel_distill_args(args)
    inv_t = 1.0 / args.temperature
    s, t = _rows(args.student), _rows(args.teacher)
    rows, vocab = s.shape
    dev = s.device
    weight = args.weight.detach().to(device=dev, dtype=torch.float32).contiguous()
    loss = torch.empty(rows, dtype=torch.float32, device=dev)
    labels = ce_weight = ce_loss = None
    if args.labels is not None:
        labels = args.labels.detach().to(device=dev, dtype=torch.int64).contiguous()
        ce_weight = args.ce_weight.detach().to(device=dev, dtype=torch.float32).contiguous()
        ce_loss = torch.empty(rows, dtype=torch.float32, device=dev)
    gs_dtype = s.dtype if args.grad_dtype is None else args.grad_dtype
    gs = torch.empty((rows, vocab), dtype=gs_dtype, device=dev) if args.grad_student else None
    gt = torch.empty((rows, vocab), dtype=t.dtype, device=dev) if args.grad_teacher else None
    if rows == 0:
        return DistillResult(loss, ce_loss, gs, gt)
    beta = float(args.beta)
    jsd = args.divergence == "jsd"
    kernel_args = (
        *(s, t, weight, loss),
        labels if labels is not None else loss,
        ce_weight if ce_weight is not None else loss,
        ce_loss if ce_loss is not None else loss,
        gs if gs is not None else s,
        gt if gt is not None else t,
        *(rows, vocab, s.stride(0), t.stride(0)),
        gs.stride(0) if gs is not None else 0,
        gt.stride(0) if gt is not None else 0,
        *(inv_t, _LOG2E * inv_t, beta, 1.0 - beta),
        math.log(beta) if jsd else 0.0,
        math.log1p(-beta) if jsd else 0.0,
    )
    consts = {
        "DIV": _DIVERGENCES[args.divergence],
        "HAS_CE": labels is not None,
        "CE_T1": labels is not None and args.temperature != 1.0,
        "GRAD_S": bool(args.grad_student),
        "GRAD_T": bool(args.grad_teacher),
    }
    _launch("distill", _modules().distill.distill_kernel, rows, vocab, dev, kernel_args, consts)
    return DistillResult(loss, ce_loss, gs, gt)


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


def sparse_kl(args: SparseKLArgs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row weighted sparse-teacher KL and, on request, the student gradient."""
    _check(args.student)
    _validate.kernel_sparse_kl_args(args)
    inv_t, inv_t0 = 1.0 / args.temperature, 1.0 / args.teacher_temperature
    s = _rows(args.student)
    rows, vocab = s.shape
    dev = s.device
    k = args.teacher_ids.shape[1]
    weight = args.weight.detach().to(device=dev, dtype=torch.float32).contiguous()
    loss = torch.empty(rows, dtype=torch.float32, device=dev)
    grad = torch.empty((rows, vocab), dtype=s.dtype, device=dev) if args.grad_student else None
    if rows == 0:
        return loss, grad
    ids = args.teacher_ids.detach().to(device=dev, dtype=torch.int64)
    # As the CPU kernel: stored log-probabilities as float32, then float64 math.
    lps = args.teacher_logprobs.detach().to(device=dev, dtype=torch.float32).to(torch.float64)
    ids, p, plogp, p_tail, log_p_tail, p_sum = _teacher(
        ids, lps, weight, vocab, inv_t / inv_t0, args.tail
    )
    kernel_args = (
        *(s, ids, p, plogp, p_tail, log_p_tail, p_sum, weight, loss),
        grad if grad is not None else s,
        *(rows, vocab, k, s.stride(0), grad.stride(0) if grad is not None else 0),
        *(inv_t, _LOG2E * inv_t),
    )
    consts = {
        "TAIL": _TAILS[args.tail],
        "GRAD": bool(args.grad_student),
        "KBLOCK": min(_next_pow2(k), 1024),
    }
    _launch("sparse_kl", _modules().sparse.sparse_kl_kernel, rows, vocab, dev, kernel_args, consts)
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
    if first is None:  # in place, rows of factor 1 untouched
        state[key] = factor.clone()
        out, den, stride_d = saved, factor, 0
        flags = {"HAS_DEN": False, "SKIP_ONE": True}
    else:  # a new tensor: saved * factor / (factor of the first)
        out, den = torch.empty_like(saved), first
        stride_d = first.stride(0) if first.numel() == rows and rows > 1 else 0
        flags = {"HAS_DEN": True, "SKIP_ONE": False}
    strides = (saved.stride(0), out.stride(0), stride_f, stride_d)
    kernel[(rows,)](
        saved, out, factor, den, rows, vocab, *strides, **flags, BLOCK=block, num_warps=warps
    )
    return out


class TritonBackend:
    """The Triton kernels: the :class:`KernelBackend` of CUDA calls (and of CPU
    calls under ``KDCORE_BACKEND=triton``, run by the interpreter). The kernels
    cannot raise, so arguments are checked here (``_validate.kernel_*``)."""

    name = "triton"

    softmax = staticmethod(softmax)
    softmax_backward = staticmethod(softmax_backward)
    distill = staticmethod(distill)
    sparse_kl = staticmethod(sparse_kl)

    @staticmethod
    def scale_grad(
        saved: torch.Tensor, grad_out: torch.Tensor, owner: object, key: str
    ) -> torch.Tensor:
        """On CUDA, in eager mode, in a backward that frees the graph: the device
        kernel of :func:`scale_grad` (in place, no host sync); else ``scale_rows``."""
        if (
            saved.device.type == "cuda"
            and type(saved) is torch.Tensor
            and type(grad_out) is torch.Tensor
            and not torch.compiler.is_compiling()
            and not graph_kept()
        ):
            return scale_grad(saved, grad_out, owner, key)
        return scale_rows(saved, grad_out)


BACKEND = TritonBackend()
