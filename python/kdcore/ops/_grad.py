"""Backward helpers shared by the fused ops.

A fused op saves the gradient of its output sum, computed in the forward
pass; backward only scales it by the incoming gradient.
"""

from __future__ import annotations

import torch


def _is_one(grad_out: torch.Tensor) -> bool:
    # Only inspect real CPU tensors: no host sync on accelerators, and no
    # data-dependent branch while torch.compile traces (fake tensors).
    if type(grad_out) is not torch.Tensor or grad_out.device.type != "cpu":
        return False
    if grad_out.numel() == 1:
        return grad_out.item() == 1.0
    return bool((grad_out == 1).all())


def scale_rows(
    saved: torch.Tensor, grad_out: torch.Tensor, owner: object = None, key: str = ""
) -> torch.Tensor:
    """``saved`` (rows, V) times ``grad_out`` (a scalar or one value per row).

    ``loss.backward()`` on a scalar loss gives 1: then the saved gradient is
    returned as is, rounded once. Otherwise the product is formed in float32
    and rounded back to ``saved``'s dtype.

    CUDA tensors in eager mode go to a Triton kernel that decides on the
    device (no host sync, no float32 copy); ``owner`` (the autograd context)
    and ``key`` identify the saved gradient (see ``_triton.scale_grad``).
    """
    if (
        owner is not None
        and saved.device.type == "cuda"
        and type(saved) is torch.Tensor
        and type(grad_out) is torch.Tensor
        and not torch.compiler.is_compiling()
    ):
        from .. import _triton

        return _triton.scale_grad(saved, grad_out, owner, key)
    if _is_one(grad_out):
        return saved
    wide = torch.promote_types(saved.dtype, torch.float32)
    factor = grad_out.to(wide)
    if factor.dim() > 0:
        factor = factor.unsqueeze(-1)
    return (saved * factor).to(saved.dtype)
