"""jsd_loss, tvd_loss and distillation_loss against the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
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
from kdcore import Span, reference


def _masks(kind, lead, g):
    labels = mask = None
    if kind == "labels":
        labels = torch.randint(0, 5, lead, generator=g)
        labels[torch.rand(lead, generator=g) < 0.3] = -100
    elif kind == "float":
        mask = torch.rand(lead, generator=g) * 2
        mask[torch.rand(lead, generator=g) < 0.3] = 0
    return labels, mask


def _floor(temperature, scale_t2):
    # fp32 resolves a row's gradient to ~1e-7 of its natural scale w_r / T.
    return 1e-6 * (temperature**2 if scale_t2 else 1.0) / temperature * 3.0


@given(
    lead=st.sampled_from([(1,), (4,), (2, 3)]),
    vocab=st.one_of(st.sampled_from([1, 2, 33, 1000]), st.integers(1, 200)),
    s_dtype=st.sampled_from(DTYPES),
    t_dtype=st.sampled_from(DTYPES),
    which=st.sampled_from(["jsd", "tvd"]),
    beta=st.one_of(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), st.floats(0.01, 0.99)),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    scale=st.sampled_from([0.1, 1.0, 5.0]),
    masking=st.sampled_from(["none", "labels", "float"]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    teacher_grad=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_jsd_and_tvd_match_reference(
    backend,
    lead,
    vocab,
    s_dtype,
    t_dtype,
    which,
    beta,
    temperature,
    scale,
    masking,
    reduction,
    teacher_grad,
    seed,
):
    g = torch.Generator().manual_seed(seed)
    s = make_logits((*lead, vocab), s_dtype, scale=scale, generator=g)
    t = make_logits((*lead, vocab), t_dtype, scale=scale, generator=g)
    labels, mask = _masks(masking, lead, g)
    kwargs = dict(temperature=temperature, labels=labels, mask=mask, reduction=reduction)
    if which == "jsd":
        fn, ref_fn, kwargs["beta"], scale_t2 = kdcore.jsd_loss, reference.jsd_loss, beta, True
    else:
        fn, ref_fn, scale_t2 = kdcore.tvd_loss, reference.tvd_loss, False
    s_k, t_k = s.clone().requires_grad_(), t.clone().requires_grad_(teacher_grad)
    s64, t64 = s.double().requires_grad_(), t.double().requires_grad_(teacher_grad)
    loss, ref = fn(s_k, t_k, **kwargs), ref_fn(s64, t64, **kwargs)
    assert_loss_close(loss, ref, (s_dtype, t_dtype))
    go = torch.rand(loss.shape, generator=g) + 0.5 if reduction == "none" else None
    wrt_k, wrt_r = ([s_k, t_k], [s64, t64]) if teacher_grad else ([s_k], [s64])
    grads = torch.autograd.grad(loss, wrt_k, go)
    if ref.requires_grad:
        ref_grads = torch.autograd.grad(ref, wrt_r, None if go is None else go.double())
    else:
        ref_grads = [torch.zeros_like(x) for x in wrt_r]
    ulps = 1.0 if go is None else 2.0
    # (TVD's kink at P = Q: random inputs do not tie; sign(0) = 0 on both sides.)
    for got, exp, dtype in zip(grads, ref_grads, (s_dtype, t_dtype), strict=False):
        floor = _floor(temperature, scale_t2)
        floor += (temperature**2 if scale_t2 else 1.0) * 3.0 * log_prob_floor(s, t, temperature)
        assert_grad_close(got, exp, dtype, ulps, floor=floor)


@pytest.mark.parametrize("beta, reverse", [(0.0, False), (1.0, True)])
def test_jsd_endpoints_are_exactly_the_kls(backend, beta, reverse):
    s = make_logits((4, 50), torch.float32, seed=1)
    t = make_logits((4, 50), torch.float32, seed=2)
    jsd = kdcore.jsd_loss(s, t, beta=beta, temperature=2.0)
    kl = kdcore.kl_loss(s, t, reverse=reverse, temperature=2.0)
    assert torch.equal(jsd, kl)


def test_jsd_is_symmetric_at_one_half_and_bounded(backend):
    s = make_logits((8, 64), torch.float32, seed=3, scale=4.0)
    t = make_logits((8, 64), torch.float32, seed=4, scale=4.0)
    a = kdcore.jsd_loss(s, t, beta=0.5, scale_t2=False, reduction="none")
    b = kdcore.jsd_loss(t, s, beta=0.5, scale_t2=False, reduction="none")
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert bool((a >= -1e-7).all()) and bool((a <= math.log(2) + 1e-6).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_jsd_finite_when_log_probs_are_far_below_minus_104(backend, dtype):
    # Spread logits so that most log-probabilities are far below -104 in both
    # distributions (where naive probability-space mixtures give NaN).
    g = torch.Generator().manual_seed(5)
    s = (torch.randn(4, 300, generator=g) * 400).to(dtype)
    t = (torch.randn(4, 300, generator=g) * 400).to(dtype)
    s_k = s.clone().requires_grad_()
    loss = kdcore.jsd_loss(s_k, t, beta=0.3)
    loss.backward()
    ref = reference.jsd_loss(s.double(), t.double(), beta=0.3)
    assert math.isfinite(loss.item()) and torch.isfinite(s_k.grad).all()
    assert_loss_close(loss, ref, (dtype,))


def _divergence_loss(divergence, s, t, **kw):
    if divergence in ("kl", "reverse_kl"):
        return kdcore.kl_loss(s, t, reverse=divergence == "reverse_kl", **kw)
    if divergence == "jsd":
        return kdcore.jsd_loss(s, t, beta=0.3, **kw)
    return kdcore.tvd_loss(s, t, **kw)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("where", ["student", "teacher", "both", "both_inf"])
def test_nan_in_a_row_gives_nan_loss_and_gradients_there(backend, divergence, where):
    # A NaN (or an inf - inf) in a row makes that row's loss and both
    # gradients NaN on every backend; the other rows are untouched.
    s = make_logits((3, 40), torch.float32, seed=30)
    t = make_logits((3, 40), torch.float32, seed=31)
    bad = math.inf if where == "both_inf" else math.nan
    if where != "teacher":
        s[1, 3] = bad
    if where != "student":
        t[1, 7] = bad
    s, t = s.requires_grad_(), t.requires_grad_()
    loss = _divergence_loss(divergence, s, t, temperature=2.0, reduction="none")
    gs, gt = torch.autograd.grad(loss.sum(), (s, t))
    assert math.isnan(loss[1].item()), loss
    assert torch.isfinite(loss[[0, 2]]).all()
    for name, g in (("student", gs), ("teacher", gt)):
        assert torch.isnan(g[1]).all(), (name, g[1])
        assert torch.isfinite(g[[0, 2]]).all(), name


@pytest.mark.parametrize("beta", [1e-5, 1e-7, 1e-8, 1 - 1e-7])
def test_jsd_near_the_kl_endpoints_keeps_its_beta_sized_terms(backend, beta):
    # JSD(β) → 0 like β as β → 0: the β-sized parts of log(1-β) and of
    # ln(1 + e^-|x|) must survive fp32 rounding.
    s = make_logits((16, 64), torch.float32, seed=32, scale=2.0).requires_grad_()
    t = make_logits((16, 64), torch.float32, seed=33, scale=2.0)
    loss = kdcore.jsd_loss(s, t, beta=beta, temperature=1.5)
    (grad,) = torch.autograd.grad(loss, s)
    s64 = s.detach().double().requires_grad_()
    ref = reference.jsd_rows(s64, t.double(), beta, 1.5).mean() * 1.5**2
    (ref_grad,) = torch.autograd.grad(ref, s64)
    assert abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item()), (loss.item(), ref.item())
    assert_grad_close(grad, ref_grad, torch.float32)


def test_tvd_of_equal_distributions_is_zero_and_of_disjoint_is_one(backend):
    x = make_logits((3, 20), torch.float32, seed=6)
    assert kdcore.tvd_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-7)
    a = torch.tensor([[0.0, -math.inf], [-math.inf, 0.0]])
    b = torch.tensor([[-math.inf, 0.0], [0.0, -math.inf]])
    assert kdcore.tvd_loss(a, b).item() == pytest.approx(1.0, abs=1e-7)


@given(
    lead=st.sampled_from([(3,), (2, 4)]),
    vocab=st.sampled_from([2, 17, 64, 500]),
    s_dtype=st.sampled_from(DTYPES),
    t_dtype=st.sampled_from(DTYPES),
    alpha=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    temperature=st.sampled_from([1.0, 2.0, 0.7]),
    divergence=st.sampled_from(["kl", "reverse_kl", "jsd", "tvd"]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    use_spans=st.booleans(),
    normalize=st.sampled_from(["span", "token"]),
    scale_t2=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_distillation_loss_matches_reference(
    backend,
    lead,
    vocab,
    s_dtype,
    t_dtype,
    alpha,
    temperature,
    divergence,
    reduction,
    use_spans,
    normalize,
    scale_t2,
    seed,
):
    g = torch.Generator().manual_seed(seed)
    s = make_logits((*lead, vocab), s_dtype, scale=2.0, generator=g)
    t = make_logits((*lead, vocab), t_dtype, scale=2.0, generator=g)
    labels = torch.randint(0, vocab, lead, generator=g)
    labels[torch.rand(lead, generator=g) < 0.25] = -100
    spans = weights = None
    if use_spans:
        spans = torch.randint(0, 4, lead, generator=g)
        weights = {0: 0.0, 1: 1.0, 2: 2.0, 3: 0.0}
        reduction = "mean"
    kwargs = dict(
        alpha=alpha,
        temperature=temperature,
        divergence=divergence,
        beta=0.4,
        spans=spans,
        span_weights=weights,
        normalize=normalize,
        reduction=reduction,
        scale_t2=scale_t2,
        return_components=True,
    )
    s_k, s64 = s.clone().requires_grad_(), s.double().requires_grad_()
    loss, comps = kdcore.distillation_loss(s_k, t, labels, **kwargs)
    ref, ref_comps = reference.distillation_loss(s64, t.double(), labels, **kwargs)
    assert_loss_close(loss, ref, (s_dtype, t_dtype))
    for key in ("ce", "divergence"):
        if reduction != "none":
            weight = alpha if key == "ce" else 1 - alpha
            if weight == 0:
                assert math.isnan(comps[key].item())
            else:
                assert_loss_close(comps[key], ref_comps[key], (s_dtype, t_dtype))
    go = torch.rand(loss.shape, generator=g) + 0.5 if reduction == "none" else None
    (grad,) = torch.autograd.grad(loss, s_k, go)
    if ref.requires_grad:
        (ref_grad,) = torch.autograd.grad(ref, s64, None if go is None else go.double())
    else:
        ref_grad = torch.zeros_like(s64)
    floor = _floor(temperature, scale_t2) + 3e-6
    assert_grad_close(grad, ref_grad, s_dtype, 1.0 if go is None else 2.0, floor=floor)


def test_distillation_endpoints(backend):
    s = make_logits((6, 40), torch.float32, seed=7)
    t = make_logits((6, 40), torch.float32, seed=8)
    labels = torch.tensor([1, 2, -100, 3, 39, 0])
    ce = kdcore.distillation_loss(s, t, labels, alpha=1.0, temperature=3.0)
    assert ce.item() == pytest.approx(F.cross_entropy(s, labels).item(), rel=1e-6)
    kd = kdcore.distillation_loss(s, t, labels, alpha=0.0, temperature=3.0)
    expected = kdcore.kl_loss(s, t, labels=labels, temperature=3.0)
    assert kd.item() == pytest.approx(expected.item(), rel=1e-6)


def test_distillation_components_reconstruct_the_loss(backend):
    s = make_logits((2, 5, 30), torch.bfloat16, seed=9)
    t = make_logits((2, 5, 30), torch.bfloat16, seed=10)
    labels = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(1))
    spans = torch.tensor([[0, 1, 1, 2, 3], [1, 2, 2, 0, 1]])
    loss, comps = kdcore.distillation_loss(
        s, t, labels, alpha=0.25, temperature=2.0, spans=spans, return_components=True
    )
    rebuilt = 0.25 * comps["ce"] + 0.75 * comps["divergence"]
    assert loss.item() == pytest.approx(rebuilt.item(), rel=1e-5)
    assert Span.REASON in comps and Span.ACT in comps


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_distillation_components_per_row_with_reduction_none(backend, alpha):
    # Per row, like the loss: L_r = alpha ce_r + (1 - alpha) D_r, 0 on masked
    # rows, NaN for a term of weight 0; the same keys on every backend.
    s = make_logits((2, 5, 30), torch.float32, seed=11)
    t = make_logits((2, 5, 30), torch.float32, seed=12)
    labels = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(2))
    labels[0, 1] = -100
    loss, comps = kdcore.distillation_loss(
        s, t, labels, alpha=alpha, temperature=2.0, reduction="none", return_components=True
    )
    assert set(comps) == {"ce", "divergence"}
    ok = labels != -100
    ce = F.cross_entropy(
        s.double().reshape(-1, 30), labels.reshape(-1), reduction="none", ignore_index=-100
    ).reshape(2, 5)
    div = 4.0 * reference.kl_div_rows(s.double(), t.double(), 2.0) * ok
    for key, want, weight in (("ce", ce, alpha), ("divergence", div, 1.0 - alpha)):
        got = comps[key]
        assert got.shape == (2, 5), key
        if weight == 0:
            assert torch.isnan(got).all(), key
        else:
            assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6), key
    assert torch.allclose(loss.double(), alpha * ce + (1 - alpha) * div, rtol=1e-5, atol=1e-6)


def test_distillation_span_components_with_alpha_one(backend):
    s = make_logits((2, 5, 30), torch.float32, seed=13)
    t = make_logits((2, 5, 30), torch.float32, seed=14)
    labels = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(3))
    spans = torch.tensor([[0, 1, 1, 2, 3], [1, 2, 2, 0, 1]])
    _, comps = kdcore.distillation_loss(
        s, t, labels, alpha=1.0, spans=spans, return_components=True
    )
    assert set(comps) == {"ce", "divergence", Span.REASON, Span.ACT}
    assert math.isfinite(comps["ce"].item())
    assert all(math.isnan(comps[k].item()) for k in ("divergence", Span.REASON, Span.ACT))


def test_distillation_bad_arguments():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    y = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        kdcore.distillation_loss(s, t, y, alpha=1.5)
    with pytest.raises(
        ValueError, match=r"labels must be in \[0, 5\) or equal ignore_index=-100; got \[7\]"
    ):
        kdcore.distillation_loss(s, t, torch.tensor([1, 7, 2]))
    with pytest.raises(ValueError, match=r"reduction must be 'mean'"):
        kdcore.distillation_loss(s, t, y, spans=torch.tensor([1, 1, 2]), reduction="sum")
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got -0.1"):
        kdcore.jsd_loss(s, t, beta=-0.1)
    with pytest.raises(TypeError, match=r"labels must be an integer tensor"):
        kdcore.distillation_loss(s, t, torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("name", ["jsd", "tvd", "distillation"])
def test_gradcheck_float64(name):
    s = make_logits((3, 6), torch.float64, seed=11).requires_grad_()
    t = make_logits((3, 6), torch.float64, seed=12).requires_grad_()
    labels = torch.tensor([1, -100, 4])

    def fn(a, b):
        if name == "jsd":
            return kdcore.jsd_loss(a, b, beta=0.3, temperature=1.5, labels=labels)
        if name == "tvd":
            return kdcore.tvd_loss(a, b, temperature=1.5, reduction="sum")
        return kdcore.distillation_loss(a, b, labels, alpha=0.4, temperature=1.5)

    assert torch.autograd.gradcheck(fn, (s, t))


def test_compile_fullgraph():
    torch._dynamo.reset()
    s = make_logits((2, 4, 30), torch.float32, seed=13).requires_grad_()
    t = make_logits((2, 4, 30), torch.float32, seed=14)
    labels = torch.tensor([[1, 2, -100, 3], [4, -100, 5, 6]])
    spans = torch.tensor([[0, 1, 2, 2], [1, 1, 2, 3]])

    def step(a, b):
        return (
            kdcore.distillation_loss(a, b, labels, alpha=0.3, temperature=2.0, spans=spans)
            + kdcore.jsd_loss(a, b, beta=0.2)
            + kdcore.tvd_loss(a, b)
        )

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager, got = step(s, t), compiled(s, t)
    assert torch.allclose(got, eager, rtol=1e-6)
    (ga,) = torch.autograd.grad(eager, s)
    (gb,) = torch.autograd.grad(got, s)
    assert torch.allclose(ga, gb, rtol=1e-5, atol=1e-8)


def test_module_wrappers_match_functional():
    s = make_logits((2, 3, 20), torch.float32, seed=15)
    t = make_logits((2, 3, 20), torch.float32, seed=16)
    labels = torch.tensor([[1, 2, -100], [3, 4, 5]])
    spans = torch.tensor([[1, 2, 0], [1, 1, 2]])
    assert torch.equal(
        kdcore.nn.JSDLoss(beta=0.3, temperature=2.0)(s, t, labels=labels),
        kdcore.jsd_loss(s, t, beta=0.3, temperature=2.0, labels=labels),
    )
    assert torch.equal(kdcore.nn.TVDLoss()(s, t), kdcore.tvd_loss(s, t))
    module = kdcore.nn.DistillationLoss(alpha=0.2, temperature=2.0, divergence="jsd")
    assert torch.equal(
        module(s, t, labels, spans=spans),
        kdcore.distillation_loss(
            s, t, labels, alpha=0.2, temperature=2.0, divergence="jsd", spans=spans
        ),
    )
    assert "alpha=0.2" in repr(module)
