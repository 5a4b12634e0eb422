"""The fused linear loss's logit transforms: a model's logits ``z`` become
``cap · tanh(scale · z / cap)``, or ``scale · z`` without a cap, before the
temperature divides them (heads with a logit scale or a final soft cap).

Every strategy applies them to one chunk's (or slice's, or shard's) logits,
before any -inf vocabulary padding (padding stays -inf), and multiplies the
gradient w.r.t. the transformed logits by :func:`slope` on the way back to
``z``. The identity (``scale = 1``, no cap) is never computed.
"""

from __future__ import annotations

import torch


def is_identity(scale: float, cap: float | None) -> bool:
    return scale == 1.0 and cap is None


def transform(
    z: torch.Tensor, scale: float, cap: float | None, *, inplace: bool = False
) -> torch.Tensor:
    """``cap · tanh(scale · z / cap)`` (``scale · z`` without a cap); ``z`` itself
    for the identity. ``inplace``: ``z`` is a fresh buffer that may be overwritten
    (never with autograd recording)."""
    if is_identity(scale, cap):
        return z
    if cap is None:
        return z.mul_(scale) if inplace else z * scale
    if inplace:
        return z.mul_(scale / cap).tanh_().mul_(cap)
    return torch.tanh(z * (scale / cap)) * cap


def slope(
    transformed: torch.Tensor, scale: float, cap: float | None, *, inplace: bool = False
) -> torch.Tensor | float:
    """d transform / dz from the transformed logits: ``scale · (1 − tanh²)`` with
    tanh = transformed / cap, or the number ``scale`` without a cap."""
    if cap is None:
        return scale
    u = transformed.div_(cap) if inplace else transformed / cap
    return u.square_().neg_().add_(1.0).mul_(scale)


def chain_(
    grad: torch.Tensor,
    transformed: torch.Tensor,
    scale: float,
    cap: float | None,
    *,
    consume: bool = False,
) -> torch.Tensor:
    """``grad`` (w.r.t. the transformed logits, a fresh buffer) times the slope, in
    place: the gradient w.r.t. the untransformed logits. ``consume``: the
    transformed logits are not needed again (the slope overwrites them)."""
    if is_identity(scale, cap):
        return grad
    return grad.mul_(slope(transformed, scale, cap, inplace=consume))
