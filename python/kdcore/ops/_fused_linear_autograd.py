"""Autograd for the fused linear loss: the kernel op ``kdcore::fused_linear_distill``,
registered and eager, from one forward and one backward (``_kernel_op``).

Every strategy computes the loss and all requested gradients in one forward
call, ``loss_and_grads(kernels, h, w, b, problem, wants) -> (loss, grad_h,
grad_w, grad_b)``; backward only scales the saved gradients. ``fused_loss``
runs the op where ``_dispatch.route`` said: the eager twin on the backend
object, or the registered op (torch.compile, meta tensors; its fake kernel
gives the gradients' shapes)."""

from __future__ import annotations

from dataclasses import fields

import torch

from .. import _dispatch, _modes
from .._backend import KernelBackend
from . import _fused_linear_rows, _fused_linear_vocab
from ._fused_linear_problem import Problem
from ._grad import scale_rows
from ._kernel_op import kernel_op

OP = "kdcore::fused_linear_distill (fused_linear_distillation_loss)"

#: ``Problem.chunk_over`` -> its strategy's ``loss_and_grads``.
STRATEGIES = {
    "rows": _fused_linear_rows.loss_and_grads,
    "vocab": _fused_linear_vocab.loss_and_grads,
}


def _absent(hidden, weight, *_) -> tuple:
    """The registered op's outputs in place of gradients not asked for: distinct
    empty tensors (custom op outputs may not alias each other)."""
    return None, hidden.new_empty(0), weight.new_empty(0), weight.new_empty(0)


@kernel_op(
    "kdcore::fused_linear_distill",
    dispatch_on=("hidden",),
    differentiable=("hidden", "weight", "bias"),
    absent=_absent,
)
def FUSED_LINEAR(
    kernels: KernelBackend,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    labels: torch.Tensor | None,
    div_weight: torch.Tensor,
    ce_weight: torch.Tensor | None,
    temperature: float,
    teacher_temperature: float,
    tail: str,
    divergence: str,
    beta: float,
    vocab: int,
    chunk_size: int,
    chunk_over: str,
    student_scale: float,
    teacher_scale: float,
    student_cap: float | None,
    teacher_cap: float | None,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_h, grad_w, grad_b); gradients not asked for are empty (None
    in the eager twin). Only the loss is differentiable. The arguments after
    ``bias`` up to ``teacher_cap`` are the fields of ``Problem``, in order."""
    problem = Problem(
        teacher_logits,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        topk_ids,
        topk_logprobs,
        labels,
        div_weight,
        ce_weight,
        temperature,
        teacher_temperature,
        tail,
        divergence,
        beta,
        vocab,
        chunk_size,
        chunk_over,
        student_scale,
        teacher_scale,
        student_cap,
        teacher_cap,
    )
    wants = (grad_hidden, grad_weight, grad_bias)
    return STRATEGIES[chunk_over](kernels, hidden, weight, bias, problem, wants)


fused_linear_op = FUSED_LINEAR.op


@FUSED_LINEAR.register_fake
def _(hidden, weight, bias, *args):
    grad_hidden, grad_weight, grad_bias = args[-3:]
    return (
        hidden.new_empty((), dtype=torch.float32),
        torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if grad_weight else weight.new_empty(0),
        weight.new_empty(weight.shape[0], dtype=bias.dtype) if grad_bias else weight.new_empty(0),
    )


def _setup(ctx, inputs, output) -> None:
    ctx.wants = inputs[-3:]
    ctx.mark_non_differentiable(*(g for g in output[1:] if g is not None))
    ctx.save_for_backward(*output[1:])


def _backward(ctx, grad_loss, *_):
    # scale_rows on every backend: the saved gradients are (N, H), (V, H), (V,),
    # not the (rows, V) logit gradients a backend's scale_grad is made for.
    grads = [
        scale_rows(g, grad_loss) if want else None
        for g, want in zip(ctx.saved_tensors, ctx.wants, strict=True)
    ]
    return tuple(_modes.first_order_only(g, OP) for g in grads)


FUSED_LINEAR.register_autograd(_backward, setup_context=_setup)


def _needs_grad(x: torch.Tensor | None) -> bool:
    return x is not None and x.requires_grad and torch.is_grad_enabled()


def fused_loss(
    route: _dispatch.Route,
    h2: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    problem: Problem,
) -> torch.Tensor:
    """The loss through the kernel path, where ``route`` (not the reference) says."""
    loss, *_ = FUSED_LINEAR(
        route,
        h2,
        w,
        b,
        *(getattr(problem, f.name) for f in fields(problem)),
        _needs_grad(h2),
        _needs_grad(w),
        _needs_grad(b),
    )
    return loss
