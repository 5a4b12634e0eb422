"""``torch.nn.Module`` wrappers of the functional losses (same arguments)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from . import _validate
from .ops.distillation import distillation_loss
from .ops.kl import jsd_loss, kl_loss, tvd_loss
from .ops.span import span_loss
from .ops.sparse import sparse_kl_loss


class _DivergenceLoss(torch.nn.Module):
    """Shared body of the divergence-loss modules."""

    _fn = staticmethod(kl_loss)

    def __init__(self, **options) -> None:
        super().__init__()
        _validate.loss_options(**options)
        self.options = options

    def forward(self, student_logits, teacher_logits, labels=None, mask=None):
        return type(self)._fn(
            student_logits, teacher_logits, labels=labels, mask=mask, **self.options
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class JSDLoss(_DivergenceLoss):
    """Module form of :func:`kdcore.jsd_loss`: ``JSDLoss(beta=0.5, temperature=1.0, ...)``,
    ``forward(student_logits, teacher_logits, labels=None, mask=None)``."""

    _fn = staticmethod(jsd_loss)

    def __init__(
        self, *, beta=0.5, temperature=1.0, ignore_index=-100, reduction="mean", scale_t2=True
    ) -> None:
        super().__init__(
            beta=beta,
            temperature=temperature,
            ignore_index=ignore_index,
            reduction=reduction,
            scale_t2=scale_t2,
        )


class TVDLoss(_DivergenceLoss):
    """Module form of :func:`kdcore.tvd_loss`: ``TVDLoss(temperature=1.0, ...)``,
    ``forward(student_logits, teacher_logits, labels=None, mask=None)``."""

    _fn = staticmethod(tvd_loss)

    def __init__(
        self, *, temperature=1.0, ignore_index=-100, reduction="mean", scale_t2=False
    ) -> None:
        super().__init__(
            temperature=temperature,
            ignore_index=ignore_index,
            reduction=reduction,
            scale_t2=scale_t2,
        )


class KLLoss(torch.nn.Module):
    """Module form of :func:`kdcore.kl_loss`; arguments are fixed at construction.

    ``forward(student_logits, teacher_logits, labels=None, mask=None)``.
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        reverse: bool = False,
        ignore_index: int = -100,
        reduction: str = "mean",
        scale_t2: bool = True,
    ) -> None:
        super().__init__()
        _validate.loss_options(
            temperature=temperature, ignore_index=ignore_index, reduction=reduction
        )
        self.temperature = temperature
        self.reverse = reverse
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.scale_t2 = scale_t2

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return kl_loss(
            student_logits,
            teacher_logits,
            temperature=self.temperature,
            reverse=self.reverse,
            labels=labels,
            ignore_index=self.ignore_index,
            mask=mask,
            reduction=self.reduction,
            scale_t2=self.scale_t2,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, reverse={self.reverse}, "
            f"reduction={self.reduction!r}, scale_t2={self.scale_t2}"
        )


class SpanLoss(torch.nn.Module):
    """Module form of :func:`kdcore.span_loss`.

    ``forward(student_logits, teacher_logits, spans)``; returns the loss, or
    ``(loss, components)`` with ``return_components=True``.
    """

    def __init__(
        self,
        *,
        span_weights: Mapping[int, float] | None = None,
        divergence: str = "kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        normalize: str = "span",
        scale_t2: bool = True,
        return_components: bool = False,
    ) -> None:
        super().__init__()
        _validate.loss_options(
            span_weights=span_weights,
            divergence=divergence,
            beta=beta,
            temperature=temperature,
            normalize=normalize,
        )
        self.span_weights = None if span_weights is None else dict(span_weights)
        self.divergence = divergence
        self.beta = beta
        self.temperature = temperature
        self.normalize = normalize
        self.scale_t2 = scale_t2
        self.return_components = return_components

    def forward(self, student_logits, teacher_logits, spans):
        return span_loss(
            student_logits,
            teacher_logits,
            spans,
            span_weights=self.span_weights,
            divergence=self.divergence,
            beta=self.beta,
            temperature=self.temperature,
            normalize=self.normalize,
            scale_t2=self.scale_t2,
            return_components=self.return_components,
        )

    def extra_repr(self) -> str:
        return (
            f"span_weights={self.span_weights}, divergence={self.divergence!r}, "
            f"beta={self.beta}, temperature={self.temperature}, normalize={self.normalize!r}"
        )


class DistillationLoss(torch.nn.Module):
    """Module form of :func:`kdcore.distillation_loss`.

    ``forward(student_logits, teacher_logits, labels, spans=None)``; returns the
    loss, or ``(loss, components)`` with ``return_components=True``.
    """

    def __init__(
        self,
        *,
        alpha: float = 0.5,
        temperature: float = 1.0,
        divergence: str = "kl",
        beta: float = 0.5,
        ignore_index: int = -100,
        span_weights: Mapping[int, float] | None = None,
        normalize: str = "span",
        reduction: str = "mean",
        scale_t2: bool = True,
        return_components: bool = False,
    ) -> None:
        super().__init__()
        self.options = dict(
            alpha=alpha,
            temperature=temperature,
            divergence=divergence,
            beta=beta,
            ignore_index=ignore_index,
            span_weights=None if span_weights is None else dict(span_weights),
            normalize=normalize,
            reduction=reduction,
            scale_t2=scale_t2,
            return_components=return_components,
        )
        _validate.loss_options(**self.options)

    def forward(self, student_logits, teacher_logits, labels, spans=None):
        return distillation_loss(
            student_logits, teacher_logits, labels, spans=spans, **self.options
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class SparseKLLoss(torch.nn.Module):
    """Module form of :func:`kdcore.sparse_kl_loss`.

    ``forward(student_logits, teacher_ids, teacher_logprobs, labels=None, mask=None)``.
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        teacher_temperature: float = 1.0,
        tail: str = "bucket",
        ignore_index: int = -100,
        reduction: str = "mean",
        scale_t2: bool = True,
    ) -> None:
        super().__init__()
        self.options = dict(
            temperature=temperature,
            teacher_temperature=teacher_temperature,
            tail=tail,
            ignore_index=ignore_index,
            reduction=reduction,
            scale_t2=scale_t2,
        )
        _validate.loss_options(**self.options)

    def forward(self, student_logits, teacher_ids, teacher_logprobs, labels=None, mask=None):
        return sparse_kl_loss(
            student_logits,
            teacher_ids,
            teacher_logprobs,
            labels=labels,
            mask=mask,
            **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
