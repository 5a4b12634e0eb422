"""Tensor and autograd modes the kernels cannot serve, recognised in one place.

The kernels run outside autograd: they compute the gradient in the forward
pass and backward only scales it. So

- ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, ...) cannot see
  through them: the public functions run the pure-PyTorch reference instead
  (``_dispatch.route``), which every transform understands;
- meta tensors have no data: the registered ``torch.library`` ops give the
  output shapes from their fake kernels, and data-dependent checks are
  skipped (:func:`inspectable`), as under ``torch.compile``;
- a gradient taken with ``create_graph=True`` would be a constant to
  autograd: :func:`first_order_only` makes that backward an error that names
  the op, never a silent zero second derivative.
"""

from __future__ import annotations

import torch

_functorch = getattr(torch._C, "_functorch", None)


def functorch_level() -> int | None:
    """The innermost running ``torch.func`` transform's level, None outside one."""
    return None if _functorch is None else _functorch.maybe_current_level()


def functorch_wrapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is wrapped by a ``torch.func`` transform."""
    return _functorch is not None and _functorch.is_functorch_wrapped_tensor(t)


def functorch_active(*tensors: torch.Tensor) -> bool:
    """Whether a ``torch.func`` transform is running (or a tensor is wrapped by one)."""
    if _functorch is None or torch.compiler.is_compiling():  # (dynamo cannot trace these calls)
        return False
    if _functorch.maybe_current_level() is not None:
        return True
    return any(_functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def any_meta(*tensors: torch.Tensor) -> bool:
    return any(t.device.type == "meta" for t in tensors)


def inspectable(*tensors: torch.Tensor) -> bool:
    """Whether data-dependent checks can run: eager mode, real data, no transform."""
    if torch.compiler.is_compiling():
        return False
    return not any_meta(*tensors) and not functorch_active(*tensors)


def readable(value: torch.Tensor) -> bool:
    """Whether one tensor's value can be read (``.item()``): eager, real data, and
    not itself carried by a torch.func transform."""
    if torch.compiler.is_compiling() or value.device.type == "meta":
        return False
    return not functorch_wrapped(value)


def first_order_only(grad: torch.Tensor | None, op: str) -> torch.Tensor | None:
    """``grad`` as is; raises when the backward builds a graph (``create_graph=True``).

    The kernel's gradient is a constant to autograd, so a gradient of it
    would be silently zero (a Hessian-vector product of 0). Raising here is
    the only point that sees ``create_graph``: a tensor returned from here
    has no path to the logits, so autograd would skip any node that raised later.
    """
    if grad is not None and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"{op}: create_graph=True (double backward: Hessians, gradient penalties, "
            "MAML) is not supported. The kernel computes its gradient in the forward pass, "
            "so that gradient has no graph and its derivative would be silently 0. Take "
            "this loss's gradient without create_graph, or use the pure-PyTorch reference "
            "(kdcore.reference), which supports higher-order gradients."
        )
    return grad
