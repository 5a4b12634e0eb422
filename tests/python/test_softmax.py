"""kdcore.softmax / log_softmax against the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kdcore
from conftest import DTYPES, assert_grad_close, make_logits, ulp
from kdcore import reference


def assert_values_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, log: bool):
    """fp32: 1e-5 relative + 1e-6 absolute; 16-bit: one ulp of the rounded reference."""
    got64, ref64 = got.detach().double(), ref.detach().double()
    assert torch.equal(torch.isinf(got64), torch.isinf(ref64))
    assert not torch.isnan(got64).any()
    finite = torch.isfinite(ref64)
    g, r = got64[finite], ref64[finite]
    if dtype == torch.float32:
        bound = 1e-5 * r.abs() + 1e-6
    else:
        rounded = r.to(dtype).double()
        g, r = g, rounded
        # log p = (x - m)/T - log Z with log Z in fp32: near log p = 0 (a dominant
        # token) fp32 resolves log Z to ~1e-7 absolute (torch's fp32 log_softmax
        # gives 0 where the exact value is -3.8e-11), hence the absolute floor.
        bound = ulp(rounded, dtype) + 1e-6 * (1.0 if not log else rounded.abs().clamp_min(1.0))
    err = (g - r).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3e}"


@given(
    shape=st.sampled_from([(1, 1), (3, 7), (2, 33), (2, 3, 40), (5, 1000), (4, 2, 65)]),
    dim=st.sampled_from([-1, 0, 1]),
    dtype=st.sampled_from(DTYPES),
    temperature=st.one_of(st.sampled_from([0.5, 1.0, 2.0]), st.floats(0.1, 10.0)),
    scale=st.sampled_from([0.1, 1.0, 10.0, 100.0]),
    banned=st.sampled_from([0.0, 0.2]),
    log=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_forward_and_backward_match_reference(
    backend, shape, dim, dtype, temperature, scale, banned, log, seed
):
    g = torch.Generator().manual_seed(seed)
    x = make_logits(shape, dtype, scale=scale, generator=g)
    if banned:
        drop = torch.rand(shape, generator=g) < banned
        drop.select(dim, 0).fill_(False)
        x = x.masked_fill(drop, -math.inf)
    fn = kdcore.log_softmax if log else kdcore.softmax
    ref_fn = reference.log_softmax if log else reference.softmax
    xk = x.clone().requires_grad_()
    y = fn(xk, temperature=temperature, dim=dim)
    assert y.dtype == dtype and y.shape == x.shape
    x64 = x.double().requires_grad_()
    y64 = ref_fn(x64, temperature, dim)
    assert_values_close(y, y64, dtype, log)

    grad_y = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    (dx,) = torch.autograd.grad(y, xk, grad_y)
    if dtype == torch.float32 or backend == "torch":
        # The reference fallback differentiates from x itself.
        (dx64,) = torch.autograd.grad(y64, x64, grad_y.double())
        assert_grad_close(dx, dx64, dtype, floor=1e-6 / temperature)
    else:
        # The kernels' backward uses the (rounded) output, as torch's does:
        # compare with the exact derivative evaluated at that output.
        yr, gy = y.detach().double(), grad_y.double()
        if log:
            exact = gy - yr.exp() * gy.sum(dim, keepdim=True)
        else:
            exact = yr * (gy - (gy * yr).sum(dim, keepdim=True))
        assert_grad_close(dx, exact / temperature, dtype, floor=1e-6 / temperature)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True])
def test_edge_values(backend, dtype, log):
    x = torch.tensor(
        [
            [3e4, -3e4, 0.0, 1.0],
            [-math.inf, 2.0, -math.inf, 1.0],
            [5.0, 5.0, 5.0, 5.0],
        ],
        dtype=dtype,
    )
    fn = kdcore.log_softmax if log else kdcore.softmax
    ref_fn = reference.log_softmax if log else reference.softmax
    y = fn(x, temperature=2.0)
    assert_values_close(y, ref_fn(x.double(), 2.0), dtype, log)


def test_all_minus_inf_row_is_nan_like_torch(backend):
    x = torch.full((1, 4), -math.inf)
    assert torch.isnan(kdcore.softmax(x)).all()
    assert torch.isnan(torch.softmax(x, -1)).all()


def test_nan_propagates(backend):
    x = torch.randn(2, 5)
    x[0, 2] = math.nan
    y = kdcore.softmax(x)
    assert torch.isnan(y[0]).all()
    assert torch.isfinite(y[1]).all()


def test_very_large_vocab(backend):
    x = make_logits((2, 262144), torch.float32, scale=5.0, seed=3)
    assert_values_close(
        kdcore.log_softmax(x, 2.0), reference.log_softmax(x.double(), 2.0), torch.float32, True
    )


def test_rows_sum_to_one(backend):
    x = make_logits((16, 5000), torch.float32, scale=3.0, seed=4)
    s = kdcore.softmax(x, temperature=0.7).double().sum(-1)
    assert torch.allclose(s, torch.ones_like(s), atol=1e-5)
