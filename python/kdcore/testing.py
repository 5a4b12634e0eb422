"""kdcore's tolerances, defined once: the test suite and ``benches/gpu_check.py`` use them.

A kernel result is compared with the float64 reference computed on the same
(rounded) inputs:

- loss: within ``1e-5`` relative + ``1e-6`` absolute for float32 inputs,
  ``1e-4`` relative + ``1e-6`` absolute when an input is 16-bit; the NaN and
  infinity patterns must match exactly;
- gradient: for float32, within ``5e-5`` of the largest reference entry; for
  16-bit dtypes, within one ulp of the dtype of the reference rounded to that
  dtype (plus ``1e-6`` of the largest entry: fp32 arithmetic's own floor where
  the exact gradient is a difference of nearly equal probabilities). NaN in a
  gradient never passes.

The ``*_error`` functions return ``None`` or a message (for reports that go
on after a failure); the ``assert_*`` functions raise ``AssertionError``.
The Rust kernel crate states the same rules in its own tests.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

LOSS_RTOL_FP32 = 1e-5
LOSS_RTOL_16BIT = 1e-4
LOSS_ATOL = 1e-6
GRAD_RTOL_FP32 = 5e-5
GRAD_FP32_FLOOR = 1e-6

_MANTISSA = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
_MIN_EXP = {torch.bfloat16: -126, torch.float16: -14, torch.float32: -126}

__all__ = [
    "GRAD_FP32_FLOOR",
    "GRAD_RTOL_FP32",
    "LOSS_ATOL",
    "LOSS_RTOL_16BIT",
    "LOSS_RTOL_FP32",
    "assert_grad_close",
    "assert_loss_close",
    "grad_error",
    "loss_error",
    "ulp",
]


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at each (float64) value of ``x``."""
    a = x.abs().clamp_min(2.0 ** _MIN_EXP[dtype])
    return torch.pow(2.0, torch.floor(torch.log2(a)) - _MANTISSA[dtype])


def loss_error(got: torch.Tensor, ref: torch.Tensor, dtypes: Iterable[torch.dtype]) -> str | None:
    """Why ``got`` is not within the loss tolerance of ``ref``, or ``None``."""
    got64, ref64 = got.detach().double(), ref.detach().double()
    if not torch.equal(torch.isnan(got64), torch.isnan(ref64)):
        return f"NaN pattern differs: got {got64}, reference {ref64}"
    if not torch.equal(torch.isinf(got64), torch.isinf(ref64)):
        return f"infinity pattern differs: got {got64}, reference {ref64}"
    infinite = torch.isinf(ref64)
    if not torch.equal(got64[infinite], ref64[infinite]):
        return f"infinities of the wrong sign: got {got64}, reference {ref64}"
    finite = torch.isfinite(ref64)
    rel = LOSS_RTOL_16BIT if any(d != torch.float32 for d in dtypes) else LOSS_RTOL_FP32
    err = (got64 - ref64)[finite].abs()
    if bool((err > rel * ref64[finite].abs() + LOSS_ATOL).any()):
        return f"loss error {err.max().item():.3e}: got {got64}, reference {ref64}"
    return None


def grad_error(
    got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, ulps: float = 1.0, floor: float = 0.0
) -> str | None:
    """Why ``got`` is not within the gradient tolerance of ``ref``, or ``None``.

    ``ulps`` widens the 16-bit bound (a gradient rounded twice, e.g. scaled by a
    non-unit incoming gradient, is within 2 ulp); ``floor`` is an absolute
    allowance for gradients that are cancellation residues far below their
    natural scale.
    """
    if got.dtype != dtype:
        return f"gradient dtype {got.dtype}, expected {dtype}"
    got64, ref64 = got.detach().double(), ref.detach().double()
    if torch.isnan(got64).any():
        return "NaN in the gradient"
    if not torch.isfinite(ref64).all():
        return "the reference gradient is not finite"
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    if dtype == torch.float32:
        err = (got64 - ref64).abs().max().item() if got64.numel() else 0.0
        if err <= GRAD_RTOL_FP32 * scale + floor + 1e-30:
            return None
        return f"gradient error {err:.3e} against max|grad| {scale:.3e}"
    rounded = ref64.to(dtype).double()
    err = (got64 - rounded).abs()
    bad = err > ulps * ulp(rounded, dtype) + GRAD_FP32_FLOOR * scale + floor
    if not bad.any():
        return None
    return (
        f"{int(bad.sum())} gradient entries off by more than {ulps} ulp: "
        f"got {got64[bad][:5].tolist()}, rounded reference {rounded[bad][:5].tolist()}"
    )


def assert_loss_close(got: torch.Tensor, ref: torch.Tensor, dtypes: Iterable[torch.dtype]) -> None:
    """Raises ``AssertionError`` unless :func:`loss_error` finds nothing."""
    problem = loss_error(got, ref, tuple(dtypes))
    if problem is not None:
        raise AssertionError(problem)


def assert_grad_close(
    got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, ulps: float = 1.0, floor: float = 0.0
) -> None:
    """Raises ``AssertionError`` unless :func:`grad_error` finds nothing."""
    problem = grad_error(got, ref, dtype, ulps, floor)
    if problem is not None:
        raise AssertionError(problem)
