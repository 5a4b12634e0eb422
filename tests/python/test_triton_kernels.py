"""What only the Triton path has, on CPU tensors under the Triton interpreter:
several column blocks per row, the bfloat16 rounding of stores, the float64
log, the backward's in-place scaling, the dispatch itself.

Collected only with ``pytest --backend triton`` (conftest.py), which sets
``TRITON_INTERPRET=1`` before triton is imported and forces the Triton
backend; ``test_triton.py`` runs it that way in a child process, together
with the op suite (the same test files as the default run, on the Triton
kernels).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("KDCORE_BACKEND") != "triton":
    pytest.skip("needs pytest --backend triton (see conftest.py)", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import kdcore  # noqa: E402
from conftest import DTYPES, assert_grad_close, assert_loss_close, make_logits  # noqa: E402
from kdcore import _dispatch, _triton, reference  # noqa: E402
from kdcore.kernels import common  # noqa: E402

# The numpy interpreter warns on the float overflows the kernels rely on
# (e.g. (x + FLT_MAX) * k -> inf, then exp2(-inf) = 0).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture
def block():
    """Restores the column block after a test that forces one."""
    previous = _triton._block_override
    yield _triton.set_block
    _triton.set_block(previous)


# ---------------------------------------------------------------- dispatch


def test_dispatch_selects_triton():
    x = torch.randn(2, 3)
    assert _dispatch.current() == "triton"
    assert _dispatch.select(x, x.bfloat16()) == "triton"
    assert _dispatch.select(x.double()) == "torch"
    assert _dispatch.kernel_backend("kdcore::softmax", x) == "triton"
    assert _dispatch.kernels_for("kdcore::softmax", x) is _triton.BACKEND
    with _dispatch.backend("auto"):
        assert _dispatch.select(x) == "rust"
    with pytest.raises(TypeError, match=r"kdcore::softmax runs on CPU tensors.*float64"):
        torch.ops.kdcore.softmax(x.double(), 1.0, False)


# ----------------------------------------------- several column blocks


def _grads(loss, wrt, grad_out=None):
    return torch.autograd.grad(loss, wrt, grad_outputs=grad_out)


CASES = ["kl", "reverse_kl", "jsd", "jsd0", "jsd1", "tvd", "distill", "span", "sparse"]


def _run_case(case, s, t, temperature, teacher_grad):
    """(loss, grads) of one op on (s, t) as given (kdcore or the reference)."""
    lead = s.shape[:-1]
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, s.shape[-1], lead, generator=g)
    labels[0] = -100
    spans = torch.randint(0, 4, lead, generator=g)
    mod = kdcore if s.dtype != torch.float64 else reference
    wrt = [s, t] if teacher_grad else [s]
    if case in ("kl", "reverse_kl"):
        loss = mod.kl_loss(
            s, t, temperature=temperature, reverse=case == "reverse_kl", labels=labels
        )
    elif case.startswith("jsd"):
        beta = {"jsd": 0.3, "jsd0": 0.0, "jsd1": 1.0}[case]
        loss = mod.jsd_loss(s, t, beta=beta, temperature=temperature, labels=labels)
    elif case == "tvd":
        loss = mod.tvd_loss(s, t, temperature=temperature, labels=labels)
    elif case == "distill":
        loss = mod.distillation_loss(
            s, t, labels, alpha=0.3, temperature=temperature, divergence="jsd", beta=0.6
        )
    elif case == "span":
        weights = {0: 0.0, 1: 1.0, 2: 2.0, 3: 0.5}
        loss = mod.span_loss(
            s, t, spans, span_weights=weights, divergence="reverse_kl", temperature=temperature
        )
    else:
        top = torch.log_softmax(t.detach().double(), -1).topk(5, dim=-1)
        logprobs = top.values.float()
        if s.dtype == torch.float64:
            logprobs = logprobs.double()
        loss = mod.sparse_kl_loss(s, top.indices, logprobs, temperature=temperature, tail="bucket")
        wrt = [s]
    return loss, _grads(loss, wrt)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [16, 64])
def test_rows_spanning_several_blocks(block, case, dtype, size):
    block(size)
    vocab = 3 * size + 5  # several blocks, the last one partial
    s = make_logits((2, 3, vocab), dtype, scale=3.0, seed=1)
    t = make_logits((2, 3, vocab), dtype, scale=3.0, seed=2)
    s[0, 1, 4] = -math.inf  # a banned token in both
    t[0, 1, 4] = -math.inf
    teacher_grad = case not in ("sparse", "distill")
    s_k, t_k = s.clone().requires_grad_(), t.clone().requires_grad_(teacher_grad)
    s64, t64 = s.double().requires_grad_(), t.double().requires_grad_(teacher_grad)
    loss, grads = _run_case(case, s_k, t_k, 2.0, teacher_grad)
    ref, ref_grads = _run_case(case, s64, t64, 2.0, teacher_grad)
    assert_loss_close(loss, ref, (dtype,))
    for got, exp in zip(grads, ref_grads, strict=True):
        assert_grad_close(got, exp, dtype, floor=4e-6)


@pytest.mark.parametrize("case", ["kl", "reverse_kl", "jsd", "tvd", "distill", "span"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_logits_of_3e4(block, case, dtype):
    block(32)
    s = make_logits((2, 2, 100), dtype, scale=3e4, seed=3).clamp(-3e4, 3e4)
    t = make_logits((2, 2, 100), dtype, scale=3e4, seed=4).clamp(-3e4, 3e4)
    s_k, t_k = s.clone().requires_grad_(), t.clone().requires_grad_()
    s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
    loss, grads = _run_case(case, s_k, t_k, 2.0, True)
    ref, ref_grads = _run_case(case, s64, t64, 2.0, True)
    assert torch.isfinite(loss).all()
    assert_loss_close(loss, ref, (dtype,))
    for got, exp in zip(grads, ref_grads, strict=True):
        assert_grad_close(got, exp, dtype, floor=1e-6)


@settings(max_examples=int(os.environ.get("KDCORE_TRITON_EXAMPLES", "12")))
@given(
    vocab=st.integers(1, 200),
    size=st.sampled_from([16, 32, 128]),
    dtype=st.sampled_from(DTYPES),
    log=st.booleans(),
    temperature=st.sampled_from([0.5, 1.0, 3.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_softmax_spanning_several_blocks(vocab, size, dtype, log, temperature, seed):
    previous = _triton._block_override
    _triton.set_block(size)
    try:
        x = make_logits((3, vocab), dtype, scale=4.0, seed=seed % 1000, banned=0.2)
        x_k = x.clone().requires_grad_()
        y = (kdcore.log_softmax if log else kdcore.softmax)(x_k, temperature)
        ref = (reference.log_softmax if log else reference.softmax)(x.double(), temperature)
        finite = torch.isfinite(ref)
        assert torch.equal(torch.isinf(y), torch.isinf(ref))
        err = (y.double() - ref)[finite].abs()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert bool((err <= tol * ref[finite].abs() + tol).all())
        g = torch.randn(3, vocab, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        (dx,) = torch.autograd.grad(y, x_k, g.to(dtype))
        yr, gy = y.detach().double(), g.to(dtype).double()
        if log:
            exact = gy - yr.exp() * gy.sum(-1, keepdim=True)
        else:
            exact = yr * (gy - (gy * yr).sum(-1, keepdim=True))
        assert_grad_close(dx, exact / temperature, dtype, floor=1e-6 / temperature)
    finally:
        _triton.set_block(previous)


# ------------------------------------------------------- device helpers


@triton.jit
def _round_kernel(X, Y, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + i, mask=i < n)
    common.store(Y + i, x, i < n)


def test_bfloat16_stores_round_to_nearest_even():
    g = torch.Generator().manual_seed(0)
    bf = torch.randint(-(2**15), 2**15, (4000,), generator=g, dtype=torch.int32)
    base = bf.to(torch.int16).view(torch.bfloat16).float()
    base = base[torch.isfinite(base)]
    ulp_bits = (base.view(torch.int32) & 0x7F800000).view(torch.float32) * 2.0**-7
    x = torch.cat(
        [
            base + ulp_bits * 0.5,  # ties: to even
            base + ulp_bits * 0.49,
            base - ulp_bits * 0.51,
            torch.randn(2000, generator=g) * 1e3,
            torch.tensor([0.0, -0.0, math.inf, -math.inf, 3.4e38, -3.4e38, 1e-40, -1e-42, 3e4]),
        ]
    )
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    want = x.to(torch.bfloat16)
    assert torch.equal(y.view(torch.int16), want.view(torch.int16))
    nan = torch.full((4,), math.nan)
    out = torch.empty(4, dtype=torch.bfloat16)
    _round_kernel[(1,)](nan, out, 4, BLOCK=16)
    assert torch.isnan(out.float()).all()


@triton.jit
def _log2_kernel(X, Y):
    i = tl.program_id(0)
    tl.store(Y + i, common.log2_f64(tl.load(X + i)))


def test_float64_log2_is_exact_to_1e15():
    g = torch.Generator().manual_seed(1)
    scale = 10.0 ** torch.randint(-30, 30, (200,), generator=g).double()
    x = torch.cat(
        [
            (torch.rand(200, generator=g, dtype=torch.float64) + 0.01) * scale,
            torch.tensor(
                [1.0, 2.0, 2**0.5, 2**0.5 * (1 - 2**-52), 262144.0, 1e-300], dtype=torch.float64
            ),
        ]
    )
    y = torch.empty_like(x)
    _log2_kernel[(x.numel(),)](x, y)
    want = torch.tensor([math.log2(v) for v in x.tolist()], dtype=torch.float64)
    err = (y - want).abs() / want.abs().clamp_min(1.0)
    assert err.max().item() < 1e-15
    special = torch.tensor([0.0, math.inf, -1.0, math.nan], dtype=torch.float64)
    out = torch.empty_like(special)
    _log2_kernel[(4,)](special, out)
    assert out[0].item() == -math.inf and out[1].item() == math.inf
    assert math.isnan(out[2].item()) and math.isnan(out[3].item())


# ---------------------------------------------------- backward scaling


class _Ctx:
    pass


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_scales_in_place_once_then_copies(dtype):
    g = torch.Generator().manual_seed(2)
    grad = torch.randn(5, 37, generator=g).to(dtype)
    saved = grad.clone()
    ctx = _Ctx()
    # grad_output 1: the saved gradient itself, untouched.
    out = _triton.scale_grad(saved, torch.tensor(1.0), ctx, "student")
    assert out is saved and torch.equal(out, grad)
    # Again (retain_graph): a new tensor, scaled from the first factor.
    again = _triton.scale_grad(saved, torch.tensor(0.5), ctx, "student")
    assert again is not saved and torch.equal(saved, grad)
    assert torch.equal(again, (grad.float() * 0.5).to(dtype))
    # Per-row factors, in place on first use; an expanded (stride 0) factor.
    saved2, ctx2 = grad.clone(), _Ctx()
    rows = torch.tensor([1.0, 2.0, 0.25, 1.0, -3.0])
    out2 = _triton.scale_grad(saved2, rows, ctx2, "student")
    assert out2 is saved2
    assert torch.equal(out2, (grad.float() * rows[:, None]).to(dtype))
    saved3, ctx3 = grad.clone(), _Ctx()
    out3 = _triton.scale_grad(saved3, torch.tensor(2.0).expand(5), ctx3, "teacher")
    assert torch.equal(out3, (grad.float() * 2.0).to(dtype))


def test_forced_triton_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1"):
        _triton.softmax(torch.randn(2, 3), 1.0, False)
