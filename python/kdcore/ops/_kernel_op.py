"""A registered ``torch.library`` op and its eager ``autograd.Function`` twin,
from one forward and one backward.

Under torch.compile (and for meta tensors) a kernel op must be a registered
op: the compiler traces its schema and fake kernel. In eager mode the same
call through a plain ``autograd.Function`` costs less per call. Both run the
same code:

- ``forward(kernels, *inputs)``: the kernel call; ``kernels`` is the
  :class:`~kdcore._backend.KernelBackend` (handed over by the eager caller,
  looked up by the registered op from its ``dispatch_on`` inputs). The op's
  schema is inferred from the other parameters' annotations. An output not
  computed is ``None``: the twin returns it so (no allocation per call), the
  registered op (which cannot return None) the tensor ``absent(*inputs)``
  gives in its place. An output may be the same tensor as another (a total
  of one term); it is copied only where outputs must be distinct tensors
  (the registered op; the twin unless it sums the first output).
- ``setup(ctx, inputs, output)`` and ``backward(ctx, *grad_outputs)``, as for
  ``register_autograd``. Only the first output is differentiable, and only
  the leading inputs named in ``differentiable``: ``backward`` returns their
  gradients; the ``None`` of every later input is added here.
  :func:`scale_saved` scales a saved gradient through the right backend.

The eager twin is what every eager call pays, so it is lean: ``apply`` gets
the backend, the inputs as one tuple and the differentiable inputs (the only
ones autograd must see), and returns the first output alone; the others come
back beside autograd (they are not differentiable, so autograd has nothing to
track), and its backward gets one incoming gradient.

``KernelOp.__call__(route, *inputs)`` runs the op where ``_dispatch.route``
said: the registered op, or the twin on that backend.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from .. import _dispatch
from ._grad import scale_rows


def scale_saved(ctx, saved: torch.Tensor, grad_out: torch.Tensor, key: str) -> torch.Tensor:
    """``saved × grad_out`` in a backward: the eager twin's backend may scale ``saved``
    in place (the twin's callers drop it); the registered op's saved gradients are
    also its outputs, so they are scaled out of place."""
    kernels = ctx.kernels
    if kernels is None:
        return scale_rows(saved, grad_out)
    return kernels.scale_grad(saved, grad_out, ctx, key)


def _distinct(output):
    """``output`` with each tensor that is also a later output copied (op outputs
    may not alias each other; the first output, the loss, becomes the copy)."""
    if not isinstance(output, tuple):
        return output
    fixed = list(output)
    for i, o in enumerate(fixed):
        if o is not None and any(o is p for p in fixed[i + 1 :]):
            fixed[i] = o.clone()
    return tuple(fixed)


class KernelOp:
    """A kernel op, registered and eager; made by :func:`kernel_op`."""

    def __init__(
        self,
        name: str,
        forward: Callable,
        dispatch_on: tuple[str, ...],
        differentiable: tuple[str, ...],
        absent: Callable | None,
    ) -> None:
        signature = inspect.signature(forward, eval_str=True)
        params = list(signature.parameters.values())[1:]  # without `kernels`
        names = [p.name for p in params]
        picks = [names.index(n) for n in dispatch_on]
        if tuple(names[: len(differentiable)]) != tuple(differentiable):
            raise TypeError(f"{name}: differentiable inputs must lead the inputs, got {names}")
        self.name = name
        self._forward = forward
        self._inputs = len(params)
        self._differentiable = len(differentiable)

        def body(*inputs):
            kernels = _dispatch.kernels_for(name, *(inputs[i] for i in picks))
            output = forward(kernels, *inputs)
            if absent is not None and isinstance(output, tuple) and None in output:
                output = tuple(
                    a if o is None else o for o, a in zip(output, absent(*inputs), strict=True)
                )
            return _distinct(output)

        body.__signature__ = signature.replace(parameters=params)
        body.__name__ = forward.__name__
        body.__doc__ = forward.__doc__
        self.op = torch.library.custom_op(name, body, mutates_args=())
        self._twin: type[torch.autograd.Function] | None = None

    def register_fake(self, fake: Callable) -> Callable:
        """The output shapes and dtypes (torch.compile, meta tensors)."""
        self.op.register_fake(fake)
        return fake

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        """One backward for the registered op and the eager twin."""
        forward, nones = self._forward, (None,) * self._inputs

        def padded(grads: tuple) -> tuple:
            return (*grads, *nones[len(grads) :])

        def op_setup(ctx, inputs, output) -> None:  # (torch passes these by name)
            ctx.kernels = None
            setup_context(ctx, inputs, output)

        def op_backward(ctx, *grad_outputs):
            return padded(backward(ctx, *grad_outputs))

        self.op.register_autograd(op_backward, setup_context=op_setup)

        n_diff = self._differentiable
        leading_nones = (None,) * 4  # (kernels, reduce_first, inputs, rest)

        def twin_forward(ctx, kernels, reduce_first, inputs, rest, *_differentiable):
            # The differentiable inputs are in `inputs` too (autograd only needs to
            # see them). One output: its incoming gradient is always defined.
            output = forward(kernels, *inputs)
            if not reduce_first:  # (summed, the first output is a new tensor anyway)
                output = _distinct(output)
            ctx.kernels = kernels
            setup_context(ctx, inputs, output)
            rest.append(output)
            first = output[0] if isinstance(output, tuple) else output
            return first.sum() if reduce_first else first

        def twin_backward(ctx, grad):
            grads = backward(ctx, grad)
            return (*leading_nones, *grads, *nones[len(grads) : n_diff])

        # Named after the op: autograd shows e.g. DistillFunctionBackward.
        name = forward.__name__.title().replace("_", "") + "Function"
        methods = {"forward": staticmethod(twin_forward), "backward": staticmethod(twin_backward)}
        self._twin = type(name, (torch.autograd.Function,), methods)

    def __call__(self, route: _dispatch.Route, *inputs, reduce_first: bool = False):
        """The op's outputs (its first summed with ``reduce_first``): through the
        registered op for ``_dispatch.REGISTERED``, else the eager twin on ``route``."""
        if route is _dispatch.REGISTERED or self._twin is None:
            output = self.op(*inputs)
            return (output[0].sum(), *output[1:]) if reduce_first else output
        rest: list = []
        first = self._twin.apply(route, reduce_first, inputs, rest, *inputs[: self._differentiable])
        output = rest[0]
        return (first, *output[1:]) if isinstance(output, tuple) else first


def kernel_op(
    name: str,
    *,
    dispatch_on: tuple[str, ...],
    differentiable: tuple[str, ...],
    absent: Callable | None = None,
) -> Callable[[Callable], KernelOp]:
    """Decorator: ``forward(kernels: KernelBackend, *inputs)`` -> a :class:`KernelOp`
    registered as ``name``; ``dispatch_on`` names the tensor inputs whose device
    and dtype pick the registered op's backend; ``differentiable`` the leading
    inputs its backward differentiates; ``absent(*inputs)`` gives the
    registered op's (empty) tensors for outputs the forward leaves None."""

    def make(forward: Callable) -> KernelOp:
        return KernelOp(name, forward, dispatch_on, differentiable, absent)

    return make
