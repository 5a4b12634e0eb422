"""Temperature softmax and log-softmax: ``kdcore::softmax`` and its backward."""

from __future__ import annotations

import torch

from .. import _dispatch, _modes, _validate, reference


@torch.library.custom_op("kdcore::softmax", mutates_args=())
def softmax_op(x: torch.Tensor, temperature: float, log: bool) -> torch.Tensor:
    """softmax(x / T) (or log-softmax) over the last axis of a 2-D tensor."""
    return _dispatch.kernels("kdcore::softmax", x).softmax(x, temperature, log)


@softmax_op.register_fake
def _(x: torch.Tensor, temperature: float, log: bool) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("kdcore::softmax_backward", mutates_args=())
def softmax_backward_op(
    grad: torch.Tensor, y: torch.Tensor, temperature: float, log: bool
) -> torch.Tensor:
    """Gradient w.r.t. x of softmax(x / T) (or log-softmax) from its output y."""
    kernels = _dispatch.kernels("kdcore::softmax_backward", y)
    return kernels.softmax_backward(grad, y, temperature, log)


@softmax_backward_op.register_fake
def _(grad: torch.Tensor, y: torch.Tensor, temperature: float, log: bool) -> torch.Tensor:
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output) -> None:
    _, ctx.temperature, ctx.log = inputs
    ctx.save_for_backward(output)


def _backward(ctx, grad):
    (y,) = ctx.saved_tensors
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # create_graph=True: the same gradient from differentiable torch ops, so
        # a second backward (through y, saved with its history) is exact.
        return _differentiable_backward(grad, y, ctx.temperature, ctx.log), None, None
    return softmax_backward_op(grad, y, ctx.temperature, ctx.log), None, None


def _differentiable_backward(grad, y, temperature: float, log: bool) -> torch.Tensor:
    """d/dx of softmax(x / T) (or log-softmax) from its output y, in float32 or wider."""
    wide = torch.promote_types(y.dtype, torch.float32)
    g, y = grad.to(wide), y.to(wide)
    if log:
        dx = g - y.exp() * g.sum(-1, keepdim=True)
    else:
        dx = y * (g - (g * y).sum(-1, keepdim=True))
    return (dx / temperature).to(grad.dtype)


softmax_op.register_autograd(_backward, setup_context=_setup)


def _apply(x: object, temperature: float, dim: int, log: bool) -> torch.Tensor:
    x = _validate.logits("x", x)
    t = _validate.temperature(temperature)
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim() - 1}], got {dim!r}")
    if _modes.backend(x) == "torch":
        fn = reference.log_softmax if log else reference.softmax
        return fn(x.to(_dispatch.reference_dtype(x.device)), t, dim).to(x.dtype)
    moved = x.movedim(dim, -1)
    out = softmax_op(moved.reshape(-1, moved.shape[-1]), t, log)
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
