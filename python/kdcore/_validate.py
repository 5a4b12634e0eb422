"""Argument checks shared by the public ops.

Every failure is a ``TypeError`` or ``ValueError`` whose message names the
argument and what was seen (shape, dtype, device, value).
"""

from __future__ import annotations

import math

import torch

from . import _modes

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none", "batchmean")


def logits(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have shape (..., V), got a 0-d tensor")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension: shape {tuple(x.shape)}")
    return x


def logit_pair(student: object, teacher: object) -> tuple[torch.Tensor, torch.Tensor]:
    s = logits("student_logits", student)
    t = logits("teacher_logits", teacher)
    if s.shape != t.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape, got "
            f"{tuple(s.shape)} and {tuple(t.shape)}"
        )
    same_device("teacher_logits", t, s)
    return s, t


def same_device(name: str, x: torch.Tensor, like: torch.Tensor) -> None:
    if x.device != like.device:
        raise ValueError(
            f"{name} is on {x.device} but student_logits is on {like.device}; "
            "move them to one device"
        )


#: Low: 1/T and T² stay finite, non-zero float32 numbers. High: at T = 1e3 the
#: softmaxes differ from uniform by ~1e-3 relative, and float32 kernels keep
#: only ~4 digits of their differences (JSD error ~1e-3 there, 10 % at 1e4).
TEMPERATURE_RANGE = (1e-18, 1e3)


def temperature(value: object) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"temperature must be a scalar, got shape {tuple(value.shape)}")
        if value.requires_grad:
            raise ValueError(
                "temperature is a tensor that requires grad, but kdcore's losses take T as a "
                "constant (no gradient w.r.t. T); pass a float or temperature.detach()"
            )
        if not _modes.readable(value):
            raise TypeError(
                "temperature must be a Python float under torch.compile, torch.func transforms "
                "and for meta tensors (a tensor's value cannot be read there)"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(value).__name__}")
    t = float(value)
    if not math.isfinite(t) or t <= 0.0:
        raise ValueError(f"temperature must be finite and > 0, got {t}")
    low, high = TEMPERATURE_RANGE
    if not low <= t <= high:
        raise ValueError(
            f"temperature must be in [{low:g}, {high:g}], got {t:g} (float32 kernels cannot "
            "resolve the softmaxes' differences beyond that)"
        )
    return t


def reduction(value: object) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {value!r}")
    return "mean" if value == "batchmean" else str(value)


#: Unsigned label dtypes widened to int64, so ``labels == ignore_index`` compares
#: values, not ``ignore_index`` wrapped into the dtype (-100 is 156 as uint8).
_EXACT_IN_INT64 = (torch.uint8, torch.uint16, torch.uint32)


def labels(value: object, lead: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """The labels, as int64 when they were unsigned (use the returned tensor)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {value.dtype}")
    if value.dtype == torch.uint64:
        raise TypeError(
            "labels must be a signed integer tensor (int64 as torch uses), or uint8 / uint16 / "
            "uint32; uint64 values above 2**63 do not fit the int64 comparison with ignore_index"
        )
    if value.shape != lead:
        raise ValueError(
            f"labels must have the logits' leading shape {tuple(lead)}, got {tuple(value.shape)}"
        )
    same_device("labels", value, like)
    return comparable_labels(value)


def comparable_labels(value: torch.Tensor) -> torch.Tensor:
    """Unsigned integer labels as int64, so ``== ignore_index`` compares values."""
    return value.long() if value.dtype in _EXACT_IN_INT64 else value


def mask(value: object, lead: torch.Size, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(value).__name__}")
    if not (value.dtype == torch.bool or value.dtype.is_floating_point):
        raise TypeError(
            f"mask must be bool or floating point (per-token weight), got {value.dtype}"
        )
    if value.shape != lead:
        raise ValueError(
            f"mask must have the logits' leading shape {tuple(lead)}, got {tuple(value.shape)}"
        )
    same_device("mask", value, like)
    # Weights are finite and >= 0: a mean divides by their sum, which mixed signs
    # can zero. Eager only (a host sync); see _weights.row_weights for the rest.
    if value.is_floating_point() and _modes.inspectable(value):
        bad = (value < 0) | ~torch.isfinite(value)
        if bool(bad.any()):
            seen = value[bad][:5].tolist()
            raise ValueError(f"a float mask holds per-token weights >= 0 and finite; got {seen}")
    return value


def _ignore_index(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"ignore_index must be an int, got {type(value).__name__}")
    return value


def _choice(name: str, choices: tuple[str, ...]):
    def check(value: object) -> str:
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
        return str(value)

    return check


def loss_options(**options: object) -> None:
    """Checks a loss's scalar arguments once, where they are fixed (the ``kdcore.nn``
    modules, ``Distiller``), rather than at the first batch after minutes of work.

    Every keyword is checked as the functional losses check it; unknown names
    are not checked.
    """
    from . import spans
    from .ops.distillation import _alpha
    from .ops.fused import DIVERGENCES
    from .ops.kl import beta_value
    from .ops.sparse import TAILS

    checks = {
        "temperature": temperature,
        "teacher_temperature": temperature,
        "reduction": reduction,
        "alpha": _alpha,
        "beta": beta_value,
        "divergence": _choice("divergence", DIVERGENCES),
        "normalize": _choice("normalize", spans.NORMALIZE),
        "tail": _choice("tail", TAILS),
        "span_weights": spans.validate_weights,
        "ignore_index": _ignore_index,
    }
    for name, value in options.items():
        check = checks.get(name)
        if check is None:
            continue
        try:
            check(value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{name}: {exc}") from None
