"""Temperature softmax and log-softmax: ``kdcore::softmax`` and its backward."""

from __future__ import annotations

import torch

from .. import _dispatch, _validate, reference
from .._backend import KernelBackend
from ._kernel_op import kernel_op


@kernel_op("kdcore::softmax", dispatch_on=("x",), differentiable=("x",))
def SOFTMAX(kernels: KernelBackend, x: torch.Tensor, temperature: float, log: bool) -> torch.Tensor:
    """softmax(x / T) (or log-softmax) over the last axis of a 2-D tensor."""
    return kernels.softmax(x, temperature, log)


@SOFTMAX.register_fake
def _(x: torch.Tensor, temperature: float, log: bool) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@kernel_op("kdcore::softmax_backward", dispatch_on=("y",), differentiable=())
def SOFTMAX_BACKWARD(
    kernels: KernelBackend, grad: torch.Tensor, y: torch.Tensor, temperature: float, log: bool
) -> torch.Tensor:
    """Gradient w.r.t. x of softmax(x / T) (or log-softmax) from its output y."""
    return kernels.softmax_backward(grad, y, temperature, log)


@SOFTMAX_BACKWARD.register_fake
def _(grad: torch.Tensor, y: torch.Tensor, temperature: float, log: bool) -> torch.Tensor:
    return torch.empty_like(y, memory_format=torch.contiguous_format)


softmax_op, softmax_backward_op = SOFTMAX.op, SOFTMAX_BACKWARD.op


def _setup(ctx, inputs, output) -> None:
    _, ctx.temperature, ctx.log = inputs
    ctx.save_for_backward(output)


def _backward(ctx, grad):
    (y,) = ctx.saved_tensors
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # create_graph=True: the same gradient from differentiable torch ops, so
        # a second backward (through y, saved with its history) is exact.
        return (_differentiable_backward(grad, y, ctx.temperature, ctx.log),)
    if ctx.kernels is None:  # the registered op: its backward is an op too
        return (softmax_backward_op(grad, y, ctx.temperature, ctx.log),)
    return (ctx.kernels.softmax_backward(grad, y, ctx.temperature, ctx.log),)


def _differentiable_backward(grad, y, temperature: float, log: bool) -> torch.Tensor:
    """d/dx of softmax(x / T) (or log-softmax) from its output y, in float32 or wider."""
    wide = torch.promote_types(y.dtype, torch.float32)
    g, y = grad.to(wide), y.to(wide)
    if log:
        dx = g - y.exp() * g.sum(-1, keepdim=True)
    else:
        dx = y * (g - (g * y).sum(-1, keepdim=True))
    return (dx / temperature).to(grad.dtype)


SOFTMAX.register_autograd(_backward, setup_context=_setup)


def _apply(x: object, temperature: float, dim: int, log: bool) -> torch.Tensor:
    x = _validate.logits("x", x)
    t = _validate.temperature(temperature)
    dim = _validate.dim(dim, x)
    route = _dispatch.route(x)
    if route is None:
        fn = reference.log_softmax if log else reference.softmax
        return fn(x.to(_dispatch.reference_dtype(x.device)), t, dim).to(x.dtype)
    moved = x.movedim(dim, -1)
    out = SOFTMAX(route, moved.reshape(-1, moved.shape[-1]), t, log)
    return out.reshape(moved.shape).movedim(-1, dim)


def softmax(x: torch.Tensor, temperature: float = 1.0, dim: int = -1) -> torch.Tensor:
    """Temperature softmax: ``softmax(x / temperature)`` along ``dim``.

    Same dtype as ``x`` (float32, bfloat16, float16 or float64); computed in
    float32 (float64 for float64 input). ``dim`` may hold any size >= 1.
    Differentiable, and traceable by ``torch.compile(fullgraph=True)``.
    """
    return _apply(x, temperature, dim, log=False)


def log_softmax(x: torch.Tensor, temperature: float = 1.0, dim: int = -1) -> torch.Tensor:
    """Temperature log-softmax: ``log_softmax(x / temperature)`` along ``dim``.

    Same conventions as :func:`kdcore.softmax`.
    """
    return _apply(x, temperature, dim, log=True)
