"""kdcore.span_loss: span-weighted agent distillation against the float64 reference
and a hand computation of per-span means."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kdcore
from conftest import DTYPES, assert_grad_close, assert_loss_close, make_logits
from kdcore import Span, reference


def _kl(p_logits, q_logits, temperature):
    """KL(softmax(p/T) ‖ softmax(q/T)) with Python floats."""
    p = [math.exp(v / temperature) for v in p_logits]
    q = [math.exp(v / temperature) for v in q_logits]
    p = [v / sum(p) for v in p]
    q = [v / sum(q) for v in q]
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


STUDENT = [
    [0.1, 2.0, -1.0],
    [1.0, 0.0, 0.5],
    [3.0, -2.0, 0.0],
    [0.0, 0.0, 1.0],
    [2.0, 2.0, -3.0],
    [-1.0, 0.5, 0.2],
]
TEACHER = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 2.0],
    [2.0, -1.0, 1.0],
    [1.5, -0.5, 0.0],
    [0.0, 3.0, 0.0],
    [0.3, 0.2, -2.0],
]
SPANS = [Span.PROMPT, Span.REASON, Span.REASON, Span.ACT, Span.OBSERVATION, Span.ACT]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_span_normalization_matches_hand_computed_span_means(backend, temperature):
    weights = {Span.PROMPT: 0.0, Span.REASON: 0.5, Span.ACT: 2.0, Span.OBSERVATION: 0.0}
    d = [temperature**2 * _kl(t, s, temperature) for s, t in zip(STUDENT, TEACHER, strict=True)]
    reason = (d[1] + d[2]) / 2
    act = (d[3] + d[5]) / 2
    expected = 0.5 * reason + 2.0 * act
    loss, comps = kdcore.span_loss(
        torch.tensor(STUDENT),
        torch.tensor(TEACHER),
        torch.tensor(SPANS),
        span_weights=weights,
        temperature=temperature,
        return_components=True,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert set(comps) == {Span.REASON, Span.ACT}
    assert comps[Span.REASON].item() == pytest.approx(reason, rel=1e-6)
    assert comps[Span.ACT].item() == pytest.approx(act, rel=1e-6)


def test_token_normalization_matches_hand_computation(backend):
    weights = {0: 0.0, 1: 0.5, 2: 2.0, 3: 0.0}
    d = [_kl(t, s, 1.0) for s, t in zip(STUDENT, TEACHER, strict=True)]
    expected = (0.5 * (d[1] + d[2]) + 2.0 * (d[3] + d[5])) / 4
    loss = kdcore.span_loss(
        torch.tensor(STUDENT),
        torch.tensor(TEACHER),
        torch.tensor(SPANS),
        span_weights=weights,
        normalize="token",
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_default_weights_learn_reasoning_and_actions_only(backend):
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    got = kdcore.span_loss(s, t, torch.tensor(SPANS))
    d = [_kl(b, a, 1.0) for a, b in zip(STUDENT, TEACHER, strict=True)]
    assert got.item() == pytest.approx((d[1] + d[2]) / 2 + (d[3] + d[5]) / 2, rel=1e-6)


@given(
    lead=st.sampled_from([(6,), (2, 5), (1, 9)]),
    vocab=st.sampled_from([1, 7, 33, 200]),
    s_dtype=st.sampled_from(DTYPES),
    t_dtype=st.sampled_from(DTYPES),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    divergence=st.sampled_from(["kl", "reverse_kl", "jsd", "tvd"]),
    normalize=st.sampled_from(["span", "token"]),
    weights=st.dictionaries(
        st.sampled_from([0, 1, 2, 3, 7]),
        st.sampled_from([0.0, 0.3, 1.0, 2.5]),
        min_size=5,
        max_size=5,
    ),
    scale_t2=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_float64_reference(
    backend,
    lead,
    vocab,
    s_dtype,
    t_dtype,
    temperature,
    divergence,
    normalize,
    weights,
    scale_t2,
    seed,
):
    g = torch.Generator().manual_seed(seed)
    s = make_logits((*lead, vocab), s_dtype, scale=2.0, generator=g)
    t = make_logits((*lead, vocab), t_dtype, scale=2.0, generator=g)
    ids = torch.tensor([0, 1, 2, 3, 7])[torch.randint(0, 5, lead, generator=g)]
    kwargs = dict(
        span_weights=weights,
        divergence=divergence,
        temperature=temperature,
        normalize=normalize,
        scale_t2=scale_t2,
        return_components=True,
    )
    s_k = s.clone().requires_grad_()
    loss, comps = kdcore.span_loss(s_k, t, ids, **kwargs)
    s64 = s.double().requires_grad_()
    ref, ref_comps = reference.span_loss(s64, t.double(), ids, **kwargs)
    assert loss.dtype == torch.float32
    assert_loss_close(loss, ref, (s_dtype, t_dtype))
    assert set(comps) == set(ref_comps)
    for k, v in comps.items():
        assert_loss_close(v, ref_comps[k], (s_dtype, t_dtype))
    (grad,) = torch.autograd.grad(loss, s_k)
    if ref.requires_grad:
        (ref_grad,) = torch.autograd.grad(ref, s64)
    else:  # no token of positive weight: the reference loss is a constant 0
        ref_grad = torch.zeros_like(s64)
    floor = 1e-6 * (temperature if scale_t2 else 1.0 / temperature) * 3.0
    assert_grad_close(grad, ref_grad, s_dtype, floor=floor)


def test_no_weighted_token_gives_zero_and_nan_components(backend):
    s = make_logits((4, 10), torch.float32, seed=1).requires_grad_()
    t = make_logits((4, 10), torch.float32, seed=2)
    spans = torch.tensor([Span.PROMPT, Span.OBSERVATION, Span.PROMPT, Span.PROMPT])
    loss, comps = kdcore.span_loss(s, t, spans, return_components=True)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))
    assert math.isnan(comps[Span.REASON].item()) and math.isnan(comps[Span.ACT].item())


def test_zero_weight_spans_are_never_read(backend):
    s = make_logits((3, 10), torch.float32, seed=3)
    s[0] = math.nan  # a prompt token
    s = s.requires_grad_()
    t = make_logits((3, 10), torch.float32, seed=4)
    loss = kdcore.span_loss(s, t, torch.tensor([Span.PROMPT, Span.REASON, Span.ACT]))
    loss.backward()
    assert math.isfinite(loss.item())
    assert torch.isfinite(s.grad).all() and torch.equal(s.grad[0], torch.zeros(10))


def test_bad_arguments_are_clear():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"span ids \[5\] occur in spans but have no weight"):
        kdcore.span_loss(s, t, torch.tensor([1, 5, 2]))
    with pytest.raises(TypeError, match=r"spans must be an integer tensor"):
        kdcore.span_loss(s, t, torch.tensor([1.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match=r"spans must have the logits' leading shape \(3,\)"):
        kdcore.span_loss(s, t, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"normalize must be 'span' or 'token'; got 'mean'"):
        kdcore.span_loss(s, t, torch.tensor([1, 2, 1]), normalize="mean")
    with pytest.raises(ValueError, match=r"divergence must be one of kl, reverse_kl, tvd, jsd"):
        kdcore.span_loss(s, t, torch.tensor([1, 2, 1]), divergence="l2")
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got 1.5"):
        kdcore.span_loss(s, t, torch.tensor([1, 2, 1]), divergence="jsd", beta=1.5)
    with pytest.raises(ValueError, match=r"span_weights\[1\] must be finite and >= 0, got -1.0"):
        kdcore.span_loss(s, t, torch.tensor([1, 2, 1]), span_weights={1: -1.0, 2: 1.0})
    with pytest.raises(ValueError, match=r"span_weights keys must be ints in \[0, 1023\]"):
        kdcore.span_loss(s, t, torch.tensor([1, 2, 1]), span_weights={-1: 1.0})


def test_module_and_compile():
    torch._dynamo.reset()
    module = kdcore.nn.SpanLoss(temperature=2.0, span_weights={1: 1.0, 2: 3.0, 0: 0.0})
    s = make_logits((2, 4, 20), torch.float32, seed=5).requires_grad_()
    t = make_logits((2, 4, 20), torch.float32, seed=6)
    spans = torch.tensor([[0, 1, 1, 2], [1, 2, 2, 0]])
    eager = module(s, t, spans)
    compiled = torch.compile(lambda a, b, c: module(a, b, c), fullgraph=True, backend="aot_eager")
    got = compiled(s, t, spans)
    assert torch.allclose(got, eager, rtol=1e-6)
    (ga,) = torch.autograd.grad(eager, s)
    (gb,) = torch.autograd.grad(got, s)
    assert torch.allclose(ga, gb, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("normalize", ["span", "token"])
@pytest.mark.parametrize("divergence", ["kl", "jsd", "tvd"])
def test_gradcheck_float64(normalize, divergence):
    s = make_logits((5, 6), torch.float64, seed=11).requires_grad_()
    t = make_logits((5, 6), torch.float64, seed=12).requires_grad_()
    spans = torch.tensor([0, 1, 1, 2, 3])

    def fn(a, b):
        return kdcore.span_loss(
            a, b, spans, divergence=divergence, beta=0.3, temperature=1.5, normalize=normalize
        )

    assert torch.autograd.gradcheck(fn, (s, t))


def test_span_module_passes_beta():
    s = make_logits((6, 12), torch.float32, seed=21)
    t = make_logits((6, 12), torch.float32, seed=22)
    spans = torch.tensor([0, 1, 1, 2, 2, 3])
    module = kdcore.nn.SpanLoss(divergence="jsd", beta=0.1, temperature=2.0)
    got = module(s, t, spans)
    expected = kdcore.span_loss(s, t, spans, divergence="jsd", beta=0.1, temperature=2.0)
    assert torch.equal(got, expected)
    ref = reference.span_loss(
        s.double(),
        t.double(),
        spans,
        divergence="jsd",
        beta=0.1,
        temperature=2.0,
        span_weights=kdcore.DEFAULT_SPAN_WEIGHTS,
    )
    assert_loss_close(got, ref, (torch.float32, torch.float32))
    # beta really reaches the kernel: the default beta=0.5 gives another value.
    default = kdcore.span_loss(s, t, spans, divergence="jsd", temperature=2.0)
    assert not torch.allclose(got, default)


# Each kdcore.nn module and the functional loss it wraps.
MODULE_TWINS = [
    ("KLLoss", "kl_loss"),
    ("JSDLoss", "jsd_loss"),
    ("TVDLoss", "tvd_loss"),
    ("SpanLoss", "span_loss"),
    ("DistillationLoss", "distillation_loss"),
    ("SparseKLLoss", "sparse_kl_loss"),
]


@pytest.mark.parametrize(("module_name", "fn_name"), MODULE_TWINS)
def test_module_constructor_matches_functional_keywords(module_name, fn_name):
    """A module takes every keyword option of its function, with the same default;
    tensors that forward() takes (labels, mask, spans) are the only exceptions."""
    module = getattr(kdcore.nn, module_name)
    fn = getattr(kdcore, fn_name)
    forward_args = set(inspect.signature(module.forward).parameters) - {"self"}
    fn_options = {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in forward_args
    }
    ctor_options = {
        name: p.default
        for name, p in inspect.signature(module.__init__).parameters.items()
        if name != "self"
    }
    assert ctor_options == fn_options


def test_every_nn_module_is_checked_against_its_function():
    modules = {
        name
        for name, obj in vars(kdcore.nn).items()
        if isinstance(obj, type)
        and issubclass(obj, torch.nn.Module)
        and obj.__module__ == kdcore.nn.__name__
        and not name.startswith("_")
    }
    assert modules == {m for m, _ in MODULE_TWINS}
