"""kdcore.kl_loss against the float64 reference, on both backends."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kdcore
from conftest import (
    DTYPES,
    assert_grad_close,
    assert_loss_close,
    log_prob_floor,
    make_logits,
)
from kdcore import reference


def run_both(s, t, *, teacher_grad=False, grad_out=None, **kwargs):
    """(loss, grad_s, grad_t) from kdcore and from the float64 reference."""
    s_k = s.clone().requires_grad_()
    t_k = t.clone().requires_grad_(teacher_grad)
    loss = kdcore.kl_loss(s_k, t_k, **kwargs)
    s64 = s.double().requires_grad_()
    t64 = t.double().requires_grad_(teacher_grad)
    ref = reference.kl_loss(s64, t64, **kwargs)
    wrt_k = [s_k, t_k] if teacher_grad else [s_k]
    wrt_r = [s64, t64] if teacher_grad else [s64]
    go_k = None if grad_out is None else grad_out.float()
    go_r = None if grad_out is None else grad_out.double()
    grads = torch.autograd.grad(loss, wrt_k, grad_outputs=go_k)
    ref_grads = torch.autograd.grad(ref, wrt_r, grad_outputs=go_r)
    return (loss, *grads), (ref, *ref_grads)


def make_masks(kind, lead, g):
    labels = mask = None
    if kind == "labels":
        labels = torch.randint(0, 50, lead, generator=g)
        labels[torch.rand(lead, generator=g) < 0.3] = -100
    elif kind == "bool":
        mask = torch.rand(lead, generator=g) < 0.7
    elif kind == "float":
        mask = torch.rand(lead, generator=g) * 2
        mask[torch.rand(lead, generator=g) < 0.3] = 0
    return labels, mask


@given(
    lead=st.sampled_from([(1,), (3,), (7,), (2, 3), (1, 1, 4)]),
    vocab=st.one_of(st.sampled_from([1, 2, 31, 32, 33, 64, 1000]), st.integers(1, 300)),
    s_dtype=st.sampled_from(DTYPES),
    t_dtype=st.sampled_from(DTYPES),
    temperature=st.one_of(st.sampled_from([0.5, 1.0, 2.0, 4.0]), st.floats(0.25, 8.0)),
    reverse=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none", "batchmean"]),
    scale=st.sampled_from([0.1, 1.0, 4.0, 30.0]),
    banned=st.sampled_from([0.0, 0.0, 0.3]),
    masking=st.sampled_from(["none", "labels", "bool", "float"]),
    teacher_grad=st.booleans(),
    scale_t2=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_kl_matches_float64_reference(
    backend,
    lead,
    vocab,
    s_dtype,
    t_dtype,
    temperature,
    reverse,
    reduction,
    scale,
    banned,
    masking,
    teacher_grad,
    scale_t2,
    seed,
):
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, vocab)
    s = make_logits(shape, s_dtype, scale=scale, generator=g)
    t = make_logits(shape, t_dtype, scale=scale, generator=g)
    if banned:
        # Tokens banned for the second distribution of the KL only where the
        # first also has no mass keep the loss finite (infinite cases below).
        both = torch.rand(shape, generator=g) < banned
        both[..., 0] = False
        first_only = (torch.rand(shape, generator=g) < banned) & ~both
        first_only[..., 0] = False
        s, t = s.masked_fill(both, -math.inf), t.masked_fill(both, -math.inf)
        # KL(P ‖ Q) is finite when Q = 0 only where P = 0: ban extra tokens in
        # the distribution that is P (the teacher for forward KL).
        if reverse:
            s = s.masked_fill(first_only, -math.inf)
        else:
            t = t.masked_fill(first_only, -math.inf)
    labels, mask = make_masks(masking, lead, g)
    grad_out = torch.rand(lead, generator=g) + 0.5 if reduction == "none" else None
    got, ref = run_both(
        s,
        t,
        teacher_grad=teacher_grad,
        grad_out=grad_out,
        temperature=temperature,
        reverse=reverse,
        labels=labels,
        mask=mask,
        reduction=reduction,
        scale_t2=scale_t2,
    )
    assert got[0].dtype == torch.float32
    assert got[0].shape == ref[0].shape
    assert_loss_close(got[0], ref[0], (s_dtype, t_dtype))
    ulps = 1.0 if grad_out is None else 2.0  # a non-unit grad_output rounds twice
    # fp32 resolves a row's gradient to ~1e-7 of its natural scale w_r / T,
    # and the log-ratio terms to FP32_EPS * |log p| (log_prob_floor).
    weight = (temperature**2 if scale_t2 else 1.0) * 2.0 * 1.5  # T² x mask x grad_out
    floor = weight * (1e-6 / temperature + log_prob_floor(s, t, temperature))
    assert_grad_close(got[1], ref[1], s_dtype, ulps, floor)
    if teacher_grad:
        assert_grad_close(got[2], ref[2], t_dtype, ulps, floor)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reverse", [False, True])
def test_large_logits(backend, dtype, reverse):
    s = make_logits((4, 300), dtype, scale=3e4, seed=1).clamp(-3e4, 3e4)
    t = make_logits((4, 300), dtype, scale=3e4, seed=2).clamp(-3e4, 3e4)
    got, ref = run_both(s, t, teacher_grad=True, temperature=2.0, reverse=reverse)
    assert_loss_close(got[0], ref[0], (dtype,))
    assert_grad_close(got[1], ref[1], dtype)
    assert_grad_close(got[2], ref[2], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_banned_tokens_in_teacher_only_are_finite(backend, dtype):
    s = make_logits((5, 100), dtype, seed=3)
    t = make_logits((5, 100), dtype, seed=4, banned=0.5)
    got, ref = run_both(s, t, temperature=1.5, reduction="none", grad_out=torch.ones(5))
    assert torch.isfinite(got[0]).all()
    assert_loss_close(got[0], ref[0], (dtype,))
    assert_grad_close(got[1], ref[1], dtype)


def test_student_banned_where_teacher_has_mass_is_infinite(backend):
    s = make_logits((3, 50), torch.float32, seed=5)
    t = make_logits((3, 50), torch.float32, seed=6)
    s[1, 7] = -math.inf
    s_k = s.clone().requires_grad_()
    loss = kdcore.kl_loss(s_k, t, reduction="none")
    ref = reference.kl_loss(s.double(), t.double(), reduction="none")
    assert math.isinf(loss[1].item()) and loss[1].item() > 0
    assert torch.isfinite(loss[[0, 2]]).all()
    assert_loss_close(loss, ref, (torch.float32,))
    loss[[0, 2]].sum().backward()
    assert torch.isfinite(s_k.grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_vocab_of_one_gives_zero(backend, dtype):
    s = make_logits((4, 1), dtype, seed=7).requires_grad_()
    t = make_logits((4, 1), dtype, seed=8)
    loss = kdcore.kl_loss(s, t, temperature=3.0)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_very_large_vocab(backend):
    s = make_logits((2, 262144), torch.bfloat16, scale=3.0, seed=9)
    t = make_logits((2, 262144), torch.bfloat16, scale=3.0, seed=10)
    got, ref = run_both(s, t, temperature=2.0)
    assert_loss_close(got[0], ref[0], (torch.bfloat16,))
    assert_grad_close(got[1], ref[1], torch.bfloat16)


def test_parallel_path_many_rows(backend):
    s = make_logits((300, 2000), torch.float32, seed=11)
    t = make_logits((300, 2000), torch.float32, seed=12)
    got, ref = run_both(s, t, teacher_grad=True, temperature=2.0)
    assert_loss_close(got[0], ref[0], (torch.float32,))
    assert_grad_close(got[1], ref[1], torch.float32)
    assert_grad_close(got[2], ref[2], torch.float32)


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded", "sliced_vocab"])
def test_non_contiguous_inputs_match_contiguous(backend, layout):
    g = torch.Generator().manual_seed(13)
    if layout == "transposed":
        s = torch.randn(40, 6, generator=g).t()
        t = torch.randn(40, 6, generator=g).t()
    elif layout == "strided":
        s = torch.randn(12, 40, generator=g)[::2]
        t = torch.randn(12, 40, generator=g)[::2]
    elif layout == "expanded":
        s = torch.randn(6, 40, generator=g)
        t = torch.randn(1, 40, generator=g).expand(6, 40)
    else:
        s = torch.randn(6, 80, generator=g)[:, ::2]
        t = torch.randn(6, 80, generator=g)[:, 1::2]
    assert not (s.is_contiguous() and t.is_contiguous())
    a = s.clone().requires_grad_()
    b = s.contiguous().clone().requires_grad_()
    la = kdcore.kl_loss(a, t, temperature=2.0)
    lb = kdcore.kl_loss(b, t.contiguous(), temperature=2.0)
    la.backward()
    lb.backward()
    assert torch.equal(la, lb)
    assert torch.equal(a.grad, b.grad)


def test_non_contiguous_parameter_gets_gradient_of_its_own_layout(backend):
    base = torch.randn(40, 6, requires_grad=True)
    loss = kdcore.kl_loss(base.t(), torch.randn(6, 40))
    loss.backward()
    assert base.grad.shape == (40, 6)
    assert torch.isfinite(base.grad).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nan_in_valid_row_propagates(backend, reduction):
    s = make_logits((3, 20), torch.float32, seed=14)
    t = make_logits((3, 20), torch.float32, seed=15)
    s[1, 3] = math.nan
    loss = kdcore.kl_loss(s, t, reduction=reduction)
    if reduction == "none":
        assert math.isnan(loss[1].item())
        assert torch.isfinite(loss[[0, 2]]).all()
    else:
        assert math.isnan(loss.item())


def test_masked_rows_are_never_read(backend):
    s = make_logits((3, 20), torch.float32, seed=16)
    t = make_logits((3, 20), torch.float32, seed=17)
    s[1] = math.nan
    t[1, :] = -math.inf
    s = s.requires_grad_()
    labels = torch.tensor([4, -100, 2])
    loss = kdcore.kl_loss(s, t, labels=labels)
    loss.backward()
    assert math.isfinite(loss.item())
    assert torch.equal(s.grad[1], torch.zeros(20))
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "batchmean"])
@pytest.mark.parametrize("how", ["labels", "mask", "float_mask"])
def test_all_rows_masked_gives_zero_not_nan(backend, reduction, how):
    s = make_logits((2, 3, 10), torch.bfloat16, seed=18).requires_grad_()
    t = make_logits((2, 3, 10), torch.float32, seed=19).requires_grad_()
    kwargs = {
        "labels": {"labels": torch.full((2, 3), -100)},
        "mask": {"mask": torch.zeros(2, 3, dtype=torch.bool)},
        "float_mask": {"mask": torch.zeros(2, 3)},
    }[how]
    loss = kdcore.kl_loss(s, t, reduction=reduction, **kwargs)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(s.grad, torch.zeros_like(s))
    assert torch.equal(t.grad, torch.zeros_like(t))


def test_three_dimensional_input_and_none_shape(backend):
    s = make_logits((2, 5, 33), torch.float32, seed=20)
    t = make_logits((2, 5, 33), torch.float32, seed=21)
    got, ref = run_both(s, t, reduction="none", grad_out=torch.rand(2, 5) + 0.5)
    assert got[0].shape == (2, 5)
    assert_loss_close(got[0], ref[0], (torch.float32,))
    assert_grad_close(got[1], ref[1], torch.float32)


def test_forward_kl_is_the_true_kl_not_cross_entropy(backend):
    # KL(P ‖ P) = 0, whereas cross-entropy would give the entropy of P.
    x = make_logits((4, 50), torch.float32, seed=22)
    assert kdcore.kl_loss(x, x.clone()).abs().item() < 1e-6
    # Hand computation on a 3-token vocabulary, T = 1, no T² factor.
    s = torch.tensor([[0.0, 1.0, 2.0]])
    t = torch.tensor([[2.0, 0.0, -1.0]])
    ps = [math.exp(v) for v in (0.0, 1.0, 2.0)]
    pt = [math.exp(v) for v in (2.0, 0.0, -1.0)]
    ps = [v / sum(ps) for v in ps]
    pt = [v / sum(pt) for v in pt]
    forward = sum(a * math.log(a / b) for a, b in zip(pt, ps, strict=False))
    backward = sum(b * math.log(b / a) for a, b in zip(pt, ps, strict=False))
    assert kdcore.kl_loss(s, t).item() == pytest.approx(forward, rel=1e-6)
    assert kdcore.kl_loss(s, t, reverse=True).item() == pytest.approx(backward, rel=1e-6)


def test_t_squared_scaling_is_explicit(backend):
    s = make_logits((4, 40), torch.float32, seed=23)
    t = make_logits((4, 40), torch.float32, seed=24)
    plain = kdcore.kl_loss(s, t, temperature=3.0, scale_t2=False)
    scaled = kdcore.kl_loss(s, t, temperature=3.0, scale_t2=True)
    assert scaled.item() == pytest.approx(9.0 * plain.item(), rel=1e-6)


def test_float_mask_mean_is_weighted_mean(backend):
    s = make_logits((3, 40), torch.float32, seed=25)
    t = make_logits((3, 40), torch.float32, seed=26)
    w = torch.tensor([0.5, 0.0, 2.0])
    rows = kdcore.kl_loss(s, t, reduction="none", scale_t2=False)
    expected = (0.5 * rows[0] + 2.0 * rows[2]) / 2.5
    got = kdcore.kl_loss(s, t, mask=w, scale_t2=False)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_no_grad_gives_the_same_loss(backend):
    s = make_logits((8, 100), torch.bfloat16, seed=27)
    t = make_logits((8, 100), torch.bfloat16, seed=28)
    with torch.no_grad():
        a = kdcore.kl_loss(s.requires_grad_(), t, temperature=2.0)
    b = kdcore.kl_loss(s, t, temperature=2.0)
    assert torch.equal(a, b)
    assert not a.requires_grad


def test_teacher_only_requires_grad(backend):
    s = make_logits((4, 30), torch.float32, seed=29)
    t = make_logits((4, 30), torch.float32, seed=30)
    t_k = t.clone().requires_grad_()
    kdcore.kl_loss(s, t_k, temperature=2.0).backward()
    t64 = t.double().requires_grad_()
    reference.kl_loss(s.double(), t64, temperature=2.0).backward()
    assert_grad_close(t_k.grad, t64.grad, torch.float32)


def test_two_threads_at_once_give_the_sequential_results(backend):
    inputs = [
        (
            make_logits((64, 3000), torch.float32, seed=40 + i),
            make_logits((64, 3000), torch.float32, seed=50 + i),
        )
        for i in range(2)
    ]

    def compute(s, t):
        s = s.clone().requires_grad_()
        loss = kdcore.kl_loss(s, t, temperature=2.0)
        loss.backward()
        return loss.detach(), s.grad

    expected = [compute(*x) for x in inputs]
    results = [None, None]

    def worker(i):
        for _ in range(5):
            results[i] = compute(*inputs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
        assert not th.is_alive(), "a kdcore call hung"
    for got, exp in zip(results, expected, strict=False):
        assert torch.equal(got[0], exp[0])
        assert torch.equal(got[1], exp[1])


def test_module_wrapper_matches_functional(backend):
    s = make_logits((2, 3, 17), torch.float32, seed=31)
    t = make_logits((2, 3, 17), torch.float32, seed=32)
    labels = torch.tensor([[1, -1, 2], [-1, 3, 4]])
    module = kdcore.nn.KLLoss(temperature=2.0, reverse=True, ignore_index=-1)
    got = module(s, t, labels=labels)
    exp = kdcore.kl_loss(s, t, temperature=2.0, reverse=True, labels=labels, ignore_index=-1)
    assert torch.equal(got, exp)
    assert "temperature=2.0" in repr(module)
