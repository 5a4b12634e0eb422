"""Argument checks shared by the public ops.

Every failure is a ``TypeError`` or ``ValueError`` whose message names the
argument and what was seen (shape, dtype, device, value).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping

import torch

from . import _modes
from . import spans as _spans
from ._backend import DIVERGENCES, TAILS, DistillArgs, SparseKLArgs

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
    if x.is_cpu and like.is_cpu:  # (one CPU device; no device objects to build)
        return
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
    if type(value) is float and TEMPERATURE_RANGE[0] <= value <= TEMPERATURE_RANGE[1]:
        return value  # the common case (NaN and inf fail the comparison)
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


def logit_scale(name: str, value: object) -> float:
    """A multiplier of a model's logits (``student_logit_scale``, ...): finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def softcap(name: str, value: object) -> float | None:
    """A soft cap ``c`` of a model's logits (``c · tanh(z / c)``): None (no cap),
    or finite and > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or None, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be finite and > 0 (or None for no cap), got {value}")
    return float(value)


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
    # can zero. Eager only (a host sync); see _weights.masked_row_weights for the rest.
    if value.is_floating_point() and _modes.inspectable(value):
        bad = (value < 0) | ~torch.isfinite(value)
        if bool(bad.any()):
            seen = value[bad][:5].tolist()
            raise ValueError(f"a float mask holds per-token weights >= 0 and finite; got {seen}")
    return value


def dim(value: object, x: torch.Tensor) -> int:
    """An axis of ``x`` (negative counts from the end)."""
    if not isinstance(value, int) or not -x.dim() <= value < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim() - 1}], got {value!r}")
    return value


def _unit_interval(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def alpha(value: object) -> float:
    """The hard-label weight of distillation_loss, in [0, 1]."""
    return _unit_interval("alpha", value)


def beta(value: object) -> float:
    """JSD's mixture weight, in [0, 1] (0 and 1 are the forward and reverse KL)."""
    return _unit_interval("beta", value)


def divergence(value: object) -> str:
    if value not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}; got {value!r}")
    return str(value)


def tail(value: object) -> str:
    if value not in TAILS:
        raise ValueError(f"tail must be one of {', '.join(TAILS)}; got {value!r}")
    return str(value)


def normalize(value: object) -> str:
    if value not in _spans.NORMALIZE:
        raise ValueError(f"normalize must be 'span' or 'token'; got {value!r}")
    return str(value)


def span_weights(value: Mapping[int, float] | None) -> dict[int, float]:
    """``{span id: weight}`` checked (ids in [0, MAX_SPAN_ID], weights finite and
    >= 0), as a new dict; None gives the default weights."""
    if value is None:
        return dict(_spans.DEFAULT_SPAN_WEIGHTS)
    if not isinstance(value, Mapping):
        raise TypeError(f"span_weights must map span id -> weight, got {type(value).__name__}")
    if not value:
        raise ValueError("span_weights is empty: give at least one span id a weight")
    out: dict[int, float] = {}
    top = _spans.MAX_SPAN_ID
    for key, weight in value.items():
        span_id = _span_id_key(key)
        if span_id is None or not 0 <= span_id <= top:
            raise ValueError(f"span_weights keys must be ints in [0, {top}], got {key!r}")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise TypeError(f"span_weights[{key}] must be a float, got {type(weight).__name__}")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"span_weights[{key}] must be finite and >= 0, got {weight}")
        out[span_id] = float(weight)
    return out


def _span_id_key(key: object) -> int | None:
    """``key`` as an int if it is integer-like (int, numpy or 0-d torch integers), else None."""
    if isinstance(key, bool) or isinstance(key, float):
        return None
    if isinstance(key, torch.Tensor) and (key.is_floating_point() or key.dtype == torch.bool):
        return None
    try:
        return operator.index(key)
    except TypeError:
        return None


def span_ids(value: object, lead: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """``spans``: an integer tensor of the logits' leading shape, on their device."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"spans must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"spans must be an integer tensor of span ids, got {value.dtype}")
    if value.shape != lead:
        raise ValueError(
            f"spans must have the logits' leading shape {tuple(lead)}, got {tuple(value.shape)}"
        )
    if value.device != like.device:
        raise ValueError(f"spans is on {value.device} but student_logits is on {like.device}")
    return value


def span_ids_have_weights(spans: torch.Tensor, weights: dict[int, float]) -> None:
    """Every span id in ``spans`` has a weight (a host sync; eager only)."""
    ids = torch.unique(spans).tolist()
    missing = [i for i in ids if i not in weights]
    if missing:
        raise ValueError(
            f"span ids {missing} occur in spans but have no weight in span_weights "
            f"(weights given for {sorted(weights)}); give them a weight (0 to ignore them)"
        )


def spans_beside_labels(
    spans: object,
    weights: Mapping[int, float] | None,
    normalize_: str,
    reduction_: str,
    lead: torch.Size,
    like: torch.Tensor,
) -> tuple[torch.Tensor, dict[int, float]]:
    """Checked ``(spans, weights)`` for a loss that takes span ids next to labels
    (``distillation_loss``, the fused linear loss): reduction must be "mean",
    every span id present needs a weight (eager mode only)."""
    if reduction_ != "mean":
        raise ValueError(
            f"with spans the loss is normalised per span: reduction must be 'mean', "
            f"got {reduction_!r}"
        )
    normalize(normalize_)
    checked = span_weights(weights)
    spans = span_ids(spans, lead, like)
    if _modes.inspectable(spans, like):
        span_ids_have_weights(spans, checked)
    return spans, checked


def labels_in_vocab(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every label is in [0, vocab) or ``ignore_index`` (a host sync: eager only)."""
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        seen = labels[bad][:5].tolist()
        raise ValueError(
            f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; got {seen}"
        )


# Stored log-probabilities a hair above 0 are rounding noise; above this, an error.
_POSITIVE_SLACK = 1e-5


def topk_teacher(ids, logprobs, student, active=None):
    """A sparse teacher (ids, log-probs) of shape (..., k) for ``student`` (..., V):
    shapes, dtypes, devices; then (eager only) ids in [0, V) and log-probs <= 0 in
    the rows where ``active`` (leading shape; rows of weight 0 are never read).
    Returns the log-probs clamped to <= 0."""
    lead = student.shape[:-1]
    if not isinstance(ids, torch.Tensor) or not isinstance(logprobs, torch.Tensor):
        raise TypeError("teacher_ids and teacher_logprobs must be torch.Tensors")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"teacher_ids must be an integer tensor, got {ids.dtype}")
    if not logprobs.dtype.is_floating_point:
        raise TypeError(f"teacher_logprobs must be floating point, got {logprobs.dtype}")
    if ids.shape != logprobs.shape:
        raise ValueError(
            "teacher_ids and teacher_logprobs must have the same shape (..., k), got "
            f"{tuple(ids.shape)} and {tuple(logprobs.shape)}"
        )
    if ids.dim() != student.dim() or ids.shape[:-1] != lead:
        raise ValueError(
            f"teacher_ids must have shape {(*lead, 'k')} to match student_logits "
            f"{tuple(student.shape)}, got {tuple(ids.shape)}"
        )
    if ids.shape[-1] == 0:
        raise ValueError("the sparse teacher needs k >= 1 entries per position, got k = 0")
    for name, x in (("teacher_ids", ids), ("teacher_logprobs", logprobs)):
        same_device(name, x, student)
    if not _modes.inspectable(student, ids, logprobs):
        return logprobs
    vocab = student.shape[-1]
    read = torch.ones_like(ids, dtype=torch.bool) if active is None else active[..., None]
    bad = read & ((ids < 0) | (ids >= vocab))
    if bool(bad.any()):
        raise ValueError(f"teacher_ids must be in [0, {vocab}), got {ids[bad][:5].tolist()}")
    bad = read & ((logprobs > _POSITIVE_SLACK) | torch.isnan(logprobs))
    if bool(bad.any()):
        seen = logprobs[bad][:5].tolist()
        raise ValueError(f"teacher_logprobs must be log-probabilities (<= 0), got {seen}")
    return logprobs.clamp_max(0.0)


def topk_renormalizable(logprobs: torch.Tensor, active: torch.Tensor, tail: str) -> None:
    """tail="renormalize" divides by the top-k mass: a read row needs some (eager only)."""
    if tail != "renormalize":
        return
    empty = active & torch.isneginf(logprobs).all(-1)
    if bool(empty.any()):
        r = int(empty.nonzero()[0, 0])
        raise ValueError(
            f"teacher: row {r}: every top-k log-probability is -inf, so tail='renormalize' "
            "has no mass to renormalise (use tail='bucket', or mask the row)"
        )


def kernel_temperature(value: float) -> float:
    """A temperature handed to a kernel directly (the registered ops' arguments)."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature: must be finite and > 0, got {value}")
    return value


def kernel_distill_args(args: DistillArgs) -> None:
    """What the distill kernels need and cannot check themselves (Triton's)."""
    kernel_temperature(args.temperature)
    if args.divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {args.divergence!r}")
    if args.divergence == "jsd" and not 0.0 < args.beta < 1.0:
        raise ValueError(f"beta: JSD needs 0 < beta < 1 (0 and 1 are the KLs), got {args.beta}")
    if (args.labels is None) != (args.ce_weight is None):
        raise ValueError("labels and ce_weight go together: give both or neither")
    if args.student.shape != args.teacher.shape:
        raise ValueError(
            f"student and teacher shapes differ: {args.student.shape} vs {args.teacher.shape}"
        )


def kernel_sparse_kl_args(args: SparseKLArgs) -> None:
    """What the sparse KL kernels need and cannot check themselves (Triton's)."""
    kernel_temperature(args.temperature)
    kernel_temperature(args.teacher_temperature)
    if args.tail not in TAILS:
        raise ValueError(f"tail must be bucket, renormalize or zero, got {args.tail}")
    ids, rows = args.teacher_ids, args.student.shape[0]
    if ids.dim() != 2 or ids.shape != args.teacher_logprobs.shape:
        raise ValueError("teacher_ids and teacher_logprobs must have the same shape (rows, k)")
    if ids.shape[0] != rows:
        raise ValueError(f"teacher_ids has {ids.shape[0]} rows but student has {rows}")
    if ids.shape[1] == 0:
        raise ValueError("k: the sparse teacher needs k >= 1 entries per row")


def ignore_index(value: object) -> int:
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
    checks = {
        "temperature": temperature,
        "teacher_temperature": temperature,
        "reduction": reduction,
        "alpha": alpha,
        "beta": beta,
        "divergence": divergence,
        "normalize": _choice("normalize", _spans.NORMALIZE),
        "tail": tail,
        "span_weights": span_weights,
        "ignore_index": ignore_index,
    }
    for name, value in options.items():
        check = checks.get(name)
        if check is None:
            continue
        try:
            check(value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{name}: {exc}") from None
