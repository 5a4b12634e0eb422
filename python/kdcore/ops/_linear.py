"""Logit GEMMs of the fused linear loss: fp32 accumulation and fp32 results,
and -inf padding of a vocabulary (shared by the row and vocabulary paths)."""

from __future__ import annotations

import math

import torch

HALF = (torch.bfloat16, torch.float16)


def tensor_cores(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a @ b`` may go to cuBLAS as 16-bit operands with an fp32 result."""
    return a.device.type == "cuda" and a.dtype == b.dtype and a.dtype in HALF


def mm32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` with fp32 accumulation and an fp32 result (float64 stays float64).

    On CUDA, 16-bit operands go to cuBLAS as they are with an fp32 output
    (``out_dtype``), so no fp32 copy of a (V, H) weight is ever made; elsewhere
    (or on a torch without it) they are widened first. ``out`` (contiguous, of
    the result's shape), when the operands already have its dtype, receives
    the product: a chunk loop then writes every chunk's logits into one buffer
    instead of paging in a fresh one per chunk (costly on the CPU).
    """
    if out is not None and a.dtype == b.dtype == out.dtype and out.dtype not in HALF:
        return torch.mm(a, b, out=out)
    if tensor_cores(a, b):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.to(dtype) @ b.to(dtype)


def addmm32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` in place for an fp32 (or float64) ``acc``.

    On CUDA, 16-bit operands stay 16-bit: one cuBLAS call reads ``acc``,
    accumulates in fp32 and writes it back (``out_dtype``), so the weight
    gradient's GEMM runs on tensor cores and no fp32 copy of an operand is
    made; elsewhere (or on a torch without it) the operands are widened.
    """
    if acc.dtype == torch.float32 and tensor_cores(a, b):
        try:
            return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    return acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def logits_fp32(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """hidden @ weight.T + bias with fp32 accumulation and an fp32 result
    (never rounded to bf16 before the loss); written into ``out`` where
    :func:`mm32` can (outside autograd: the bias is then added in place)."""
    if hidden.dtype != weight.dtype:
        dtype = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    z = mm32(hidden, weight.t(), out)
    if bias is None:
        return z
    return z.add_(bias.to(z.dtype)) if z is out else z + bias.to(z.dtype)


def pad_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Extra vocabulary entries get probability 0 (-inf logits), never logit 0."""
    if logits.shape[-1] == vocab:
        return logits
    pad = logits.new_full((*logits.shape[:-1], vocab - logits.shape[-1]), -math.inf)
    return torch.cat([logits, pad], dim=-1)
