"""Per-row weights that carry masking, the reduction and the T² factor into
the fused kernels: the kernel returns w_r · D_r per row and the gradient of
their sum, so ``mean`` / ``sum`` are a sum of rows and ``none`` is the rows.
"""

from __future__ import annotations

import torch


def row_weights(
    student: torch.Tensor,
    *,
    labels: torch.Tensor | None,
    ignore_index: int,
    mask: torch.Tensor | None,
    reduction: str,
    scale: float,
) -> torch.Tensor:
    """Weights of shape (rows,) in the loss dtype (float64 for float64 inputs),
    from labels and mask the caller has validated.

    A row's base weight is 0 where ``labels == ignore_index`` or ``mask`` is
    False, the mask value for a float mask, else 1. ``mean`` divides by the sum
    of base weights (the number of valid rows for a bool mask); if it is 0 every
    weight is 0, so the loss and the gradients are 0, never NaN.
    """
    lead = student.shape[:-1]
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    if labels is None and mask is None:  # the common case, in one op
        rows = student.numel() // student.shape[-1]
        value = scale / rows if reduction == "mean" and rows else scale
        return torch.full((rows,), value, dtype=dtype, device=student.device)
    weight = torch.ones(lead, dtype=dtype, device=student.device)
    if labels is not None:
        weight = weight * (labels != ignore_index).to(dtype)
    if mask is not None:
        weight = weight * mask.detach().to(dtype)
    weight = weight.reshape(-1)
    if reduction == "mean":
        total = weight.sum()
        weight = weight / torch.where(total != 0, total, torch.ones_like(total))
    return weight * scale if scale != 1.0 else weight
