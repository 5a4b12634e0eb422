"""Backward helpers shared by the fused ops.

A fused op saves the gradient of its output sum, computed in the forward
pass; backward only scales it by the incoming gradient.

The saved gradient itself is handed out (no copy) only by a backward that
frees the graph: nothing of kdcore's reads it again, so the caller (and
AccumulateGrad, which keeps it as ``.grad``) may modify it. A backward that
keeps the graph (``retain_graph=True``, ``create_graph=True``) returns a new
tensor, so editing ``.grad`` in place never changes a later backward.
"""

from __future__ import annotations

import torch


def _is_one(grad_out: torch.Tensor) -> bool:
    # Only inspect real CPU tensors: no host sync on accelerators, and no
    # data-dependent branch while torch.compile traces (fake tensors).
    if type(grad_out) is not torch.Tensor or not grad_out.is_cpu:
        return False
    if grad_out.numel() == 1:
        return grad_out.item() == 1.0
    return bool((grad_out == 1).all())


_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def graph_kept() -> bool:
    """Whether the running backward keeps the graph (the saved gradient will
    be read again). True when torch cannot tell: then a copy is the safe answer."""
    if _keep_graph is None:
        return True
    try:
        return bool(_keep_graph())
    except RuntimeError:
        return True


def _own_copy(saved: torch.Tensor) -> torch.Tensor:
    if saved.device.type != "cpu":
        return saved.clone()
    from .. import _memory

    out = _memory.empty_like(saved)
    return out.copy_(saved)


def scale_rows(saved: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """``saved`` (rows, V) times ``grad_out`` (a scalar or one value per row), with
    torch ops on any device (backends with a device kernel for it: ``scale_grad``).

    ``loss.backward()`` on a scalar loss gives 1: then the saved gradient is
    returned as is when the graph is freed, else a copy of it. Otherwise the
    product is formed in float32 and rounded back to ``saved``'s dtype (a new
    tensor either way).
    """
    if _is_one(grad_out):
        return _own_copy(saved) if graph_kept() else saved
    wide = torch.promote_types(saved.dtype, torch.float32)
    factor = grad_out.to(wide)
    if factor.dim() > 0:
        factor = factor.unsqueeze(-1)
    return (saved * factor).to(saved.dtype)
