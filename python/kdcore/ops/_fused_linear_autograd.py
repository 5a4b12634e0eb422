"""Autograd for the fused linear loss. Every strategy computes the loss and
all requested gradients in one forward call,
``loss_and_grads(h, w, b, problem, wants) -> (loss, grad_h, grad_w, grad_b)``;
backward only scales the saved gradients. Eager mode runs them in
``EagerLoss`` (an autograd.Function); ``torch.compile`` in the registered op
``kdcore::fused_linear_distill`` (a fake implementation gives the shapes)."""

from __future__ import annotations

from dataclasses import fields

import torch

from .. import _modes
from . import _fused_linear_rows, _fused_linear_vocab
from ._fused_linear_problem import Problem
from ._grad import scale_rows

OP = "kdcore::fused_linear_distill (fused_linear_distillation_loss)"

#: ``Problem.chunk_over`` -> its strategy's ``loss_and_grads``.
STRATEGIES = {
    "rows": _fused_linear_rows.loss_and_grads,
    "vocab": _fused_linear_vocab.loss_and_grads,
}


def strategy(problem: Problem):
    return STRATEGIES[problem.chunk_over]


def _needs_grad(x: torch.Tensor | None) -> bool:
    return x is not None and x.requires_grad and torch.is_grad_enabled()


class EagerLoss(torch.autograd.Function):
    """Eager path: ``loss_and_grads`` computes every gradient in forward;
    backward scales them."""

    @staticmethod
    def forward(ctx, h, w, b, problem, loss_and_grads):
        want_b = b is not None and ctx.needs_input_grad[2]
        wants = (*ctx.needs_input_grad[:2], want_b)
        loss, *grads = loss_and_grads(h, w, b, problem, wants)
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grads = [None if g is None else scale_rows(g, grad_out) for g in ctx.saved_tensors]
        return (*(_modes.first_order_only(g, OP) for g in grads), None, None)


@torch.library.custom_op("kdcore::fused_linear_distill", mutates_args=())
def fused_linear_op(
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
    """The traceable twin of ``EagerLoss``: (loss, grad_h, grad_w, grad_b),
    gradients not asked for are empty. Only the loss is differentiable."""
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
    loss, gh, gw, gb = strategy(problem)(hidden, weight, bias, problem, wants)
    return (
        loss,
        gh if gh is not None else hidden.new_empty(0),
        gw if gw is not None else weight.new_empty(0),
        gb if gb is not None else weight.new_empty(0),
    )


@fused_linear_op.register_fake
def _(hidden, weight, bias, *args):
    grad_hidden, grad_weight, grad_bias = args[-3:]
    return (
        hidden.new_empty((), dtype=torch.float32),
        torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if grad_weight else weight.new_empty(0),
        weight.new_empty(weight.shape[0], dtype=bias.dtype) if grad_bias else weight.new_empty(0),
    )


def _op_setup(ctx, inputs, output) -> None:
    ctx.wants = inputs[-3:]
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[1:])


def _op_backward(ctx, grad_loss, *_):
    grads = [
        scale_rows(g, grad_loss) if want else None
        for g, want in zip(ctx.saved_tensors, ctx.wants, strict=True)
    ]
    grads = [_modes.first_order_only(g, OP) for g in grads]
    return (*grads, *([None] * 24))


fused_linear_op.register_autograd(_op_backward, setup_context=_op_setup)


def fused_loss(h2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, problem: Problem):
    """The loss through the kernel path: ``EagerLoss`` in eager mode, the
    registered op where it must be traced."""
    if not _modes.registered_op(h2):
        return EagerLoss.apply(h2, w, b, problem, strategy(problem))
    loss, *_ = fused_linear_op(
        h2,
        w,
        b,
        *(getattr(problem, f.name) for f in fields(problem)),
        _needs_grad(h2),
        _needs_grad(w),
        _needs_grad(b),
    )
    return loss
