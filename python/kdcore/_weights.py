"""Per-row weights that carry masking, the reduction and the T² factor into
the fused kernels: the kernel returns w_r · D_r per row and the gradient of
their sum, so ``mean`` / ``sum`` are a sum of rows and ``none`` is the rows.
"""

from __future__ import annotations

import torch

from . import _modes

#: Uniform row weights (no labels, no mask) of CPU calls in eager mode, kept for
#: the next call with the same rows and value: the kernels only read them, and
#: a new tensor per call costs about as much as a small kernel.
_UNIFORM: dict[tuple[int, float, torch.dtype], torch.Tensor] = {}
_UNIFORM_MAX = 64


def masked_row_weights(
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
        if (
            type(student) is torch.Tensor  # (no fake or other tensor subclass)
            and student.is_cpu
            and not torch.compiler.is_compiling()
            and not torch.is_inference_mode_enabled()
            and _modes.functorch_level() is None
        ):
            key = (rows, value, dtype)
            weight = _UNIFORM.get(key)
            if weight is None:
                weight = torch.full((rows,), value, dtype=dtype, device="cpu")
                if type(weight) is torch.Tensor:  # (a dispatch mode may have made another)
                    if len(_UNIFORM) >= _UNIFORM_MAX:
                        _UNIFORM.clear()
                    _UNIFORM[key] = weight
            return weight
        return torch.full((rows,), value, dtype=dtype, device=student.device)
    # A float64 mask is normalised in float64: weights of 1e-300 or 1e39 are
    # fine relative to each other but leave float32 before the division.
    wide = torch.float64 if mask is not None and mask.dtype == torch.float64 else dtype
    weight = torch.ones(lead, dtype=wide, device=student.device)
    if labels is not None:
        weight = weight * (labels != ignore_index).to(wide)
    if mask is not None:
        weight = weight * _checked_mask(mask).to(wide)
    weight = weight.reshape(-1)
    if reduction == "mean":
        total = weight.sum()
        weight = weight / torch.where(total != 0, total, torch.ones_like(total))
    if scale != 1.0:
        weight = weight * scale
    if wide != dtype and _modes.inspectable(weight):
        _check_fits(weight, dtype)
    return weight.to(dtype)


def _checked_mask(mask: torch.Tensor) -> torch.Tensor:
    """The mask, detached. Where its values cannot be checked (torch.compile, torch.func,
    meta), negative or infinite weights become NaN, so the loss is NaN rather than a
    plausible number (eager mode raises on them in ``_validate.mask``)."""
    mask = mask.detach()
    if not mask.is_floating_point() or _modes.inspectable(mask):
        return mask
    bad = (mask < 0) | torch.isinf(mask)
    return torch.where(bad, torch.full_like(mask, float("nan")), mask)


def _check_fits(weight: torch.Tensor, dtype: torch.dtype) -> None:
    limit = torch.finfo(dtype).max
    if bool((weight > limit).any()):
        raise ValueError(
            f"mask weights give row weights up to {float(weight.max()):g}, beyond {dtype}'s "
            f"range ({limit:g}) in which the loss is computed; scale the mask down or use "
            "reduction='mean'"
        )
