"""Shared test helpers: tolerances (docs/design.md, Tests) and input generators."""

from __future__ import annotations

import math
import os
import struct
import zlib

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "kdcore",
    deadline=None,
    max_examples=int(os.environ.get("KDCORE_HYPOTHESIS_EXAMPLES", "60")),
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
    derandomize=False,
)
settings.load_profile("kdcore")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MANTISSA = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
_MIN_EXP = {torch.bfloat16: -126, torch.float16: -14, torch.float32: -126}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at each (float64) value of ``x``."""
    a = x.abs().clamp_min(2.0 ** _MIN_EXP[dtype])
    exponent = torch.floor(torch.log2(a))
    return torch.pow(2.0, exponent - _MANTISSA[dtype])


def make_logits(shape, dtype, *, scale=1.0, seed=0, banned=0.0, generator=None):
    """Random logits in ``dtype``; a fraction ``banned`` of entries is -inf."""
    g = generator or torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if banned > 0:
        drop = torch.rand(shape, generator=g, dtype=torch.float64) < banned
        drop[..., 0] = False  # every row keeps a finite entry
        x = x.masked_fill(drop, -math.inf)
    return x.to(dtype)


FP32_EPS = 2.0**-23


def log_prob_floor(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    """Absolute gradient error that fp32 log-probabilities alone can cause.

    Gradients of the form P_j * (log P_j - log Q_j - D) (the teacher side of
    forward KL, the student side of reverse KL, JSD) cancel log-probabilities
    of magnitude |log p|: with logits of +-30 at T = 0.5 these reach hundreds,
    and fp32 holds each only to about FP32_EPS * |log p|.  The bound is that
    resolution weighted by the probability mass that multiplies it, per row,
    divided by T (the chain rule through z / T); the caller scales it by the
    row weights.  For ordinary logits (|log p| of a few units) it is ~1e-6.
    """
    lps = torch.log_softmax(student.detach().double() / temperature, -1)
    lpt = torch.log_softmax(teacher.detach().double() / temperature, -1)
    mass = lps.exp() + lpt.exp()
    size = (lps.abs() + lpt.abs()).nan_to_num(0.0, posinf=0.0)  # -inf entries carry no mass
    weighted = (mass * size).nan_to_num(0.0)
    per_row = weighted.amax(-1) + weighted.sum(-1)  # one entry's term plus the D term
    if per_row.numel() == 0:
        return 0.0
    return FP32_EPS * per_row.max().item() / temperature


def assert_loss_close(got: torch.Tensor, ref: torch.Tensor, dtypes) -> None:
    """Loss tolerance: fp32 inputs 1e-5 rel + 1e-6 abs; 16-bit inputs 1e-4 rel."""
    got64, ref64 = got.detach().double(), ref.detach().double()
    assert not torch.isnan(got64).any() or torch.isnan(ref64).any(), "NaN where reference is finite"
    assert torch.equal(torch.isnan(got64), torch.isnan(ref64)), (got64, ref64)
    assert torch.equal(torch.isinf(got64), torch.isinf(ref64)), (got64, ref64)
    finite = torch.isfinite(ref64)
    rel = 1e-4 if any(d != torch.float32 for d in dtypes) else 1e-5
    err = (got64 - ref64)[finite].abs()
    bound = rel * ref64[finite].abs() + 1e-6
    assert bool((err <= bound).all()), (
        f"loss error {err.max().item():.3e}: got {got64}, ref {ref64}"
    )
    assert torch.equal(got64[~finite], ref64[~finite]) or bool(torch.isnan(ref64).any())


def assert_grad_close(
    got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, ulps=1.0, floor=0.0
) -> None:
    """Gradient tolerance.

    fp32: |err| <= 5e-5 * max|ref|. 16-bit: within ``ulps`` ulp of the
    reference rounded to the dtype, plus the fp32 arithmetic floor
    (1e-6 * max|ref|) where the exact gradient is a difference of nearly
    equal probabilities that fp32 itself cannot resolve.

    ``floor`` is an absolute allowance for gradients whose every entry is a
    cancellation residue far below their natural scale (w / T per row): the
    caller passes about 1e-6 of that scale, fp32's resolution there.
    """
    assert got.dtype == dtype, (got.dtype, dtype)
    got64, ref64 = got.detach().double(), ref.detach().double()
    assert not torch.isnan(got64).any(), "NaN in gradient"
    assert torch.isfinite(ref64).all(), "reference gradient is not finite"
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    if dtype == torch.float32:
        err = (got64 - ref64).abs().max().item() if got64.numel() else 0.0
        assert err <= 5e-5 * scale + floor + 1e-30, f"grad error {err:.3e} vs max|grad| {scale:.3e}"
        return
    rounded = ref64.to(dtype).double()
    err = (got64 - rounded).abs()
    bound = ulps * ulp(rounded, dtype) + 1e-6 * scale + floor
    bad = err > bound
    assert not bad.any(), (
        f"{int(bad.sum())} gradient entries off by more than {ulps} ulp: "
        f"got {got64[bad][:5].tolist()}, rounded ref {rounded[bad][:5].tolist()}"
    )


@pytest.fixture(params=["rust", "torch"])
def backend(request):
    """Runs a test on the Rust kernels and on the reference fallback."""
    from kdcore import _dispatch

    with _dispatch.backend(request.param):
        yield request.param


def png_info(path) -> tuple[tuple[int, int], dict[str, str]]:
    """(width, height) and the tEXt entries of a PNG; checks the signature and every CRC."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, size, text = 8, None, {}
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            text[key.decode("latin-1")] = value.decode("latin-1")
        pos += 12 + length
    assert size is not None and kind == b"IEND"
    return size, text
