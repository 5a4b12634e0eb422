"""Backward helpers shared by the fused ops.

A fused op saves the gradient of its output sum, computed in the forward
pass; backward only scales it by the incoming gradient.
"""

from __future__ import annotations

import torch


def _is_ones(grad_out: torch.Tensor) -> bool:
    # Only inspect real CPU tensors: no host sync on accelerators, and no
    # data-dependent branch while torch.compile traces (fake tensors).
    return (
        type(grad_out) is torch.Tensor
        and grad_out.device.type == "cpu"
        and bool((grad_out == 1).all())
    )


def scale_rows(saved: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """saved (rows, V) times grad_out (rows,), in saved's dtype.

    ``loss.backward()`` on a scalar loss gives ones: then the saved gradient
    is returned as is, exactly rounded once. Otherwise the product is formed
    in float32 and rounded back to saved's dtype.
    """
    if _is_ones(grad_out):
        return saved
    product = saved * grad_out.unsqueeze(-1).to(torch.promote_types(saved.dtype, torch.float32))
    return product.to(saved.dtype)
