"""kdcore.sparse_kl_loss: a top-k teacher against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kdcore
from conftest import DTYPES, assert_grad_close, assert_loss_close, make_logits
from kdcore import reference
from kdcore.ops.sparse import sparse_kl_op


def _top_k(teacher_logits, k, temperature=1.0):
    logprobs = torch.log_softmax(teacher_logits.double() / temperature, dim=-1)
    top = logprobs.topk(k, dim=-1)
    return top.indices, top.values.float()


@given(
    lead=st.sampled_from([(1,), (5,), (2, 3)]),
    vocab=st.sampled_from([4, 33, 300, 2000]),
    k_frac=st.sampled_from([0.01, 0.1, 0.5, 1.0]),
    dtype=st.sampled_from(DTYPES),
    tail=st.sampled_from(["bucket", "renormalize", "zero"]),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    teacher_temperature=st.sampled_from([1.0, 2.0]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    masking=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_float64_reference(
    backend,
    lead,
    vocab,
    k_frac,
    dtype,
    tail,
    temperature,
    teacher_temperature,
    reduction,
    masking,
    seed,
):
    g = torch.Generator().manual_seed(seed)
    s = make_logits((*lead, vocab), dtype, scale=2.0, generator=g)
    ids, lps = _top_k(
        make_logits((*lead, vocab), torch.float32, scale=3.0, generator=g),
        max(1, int(vocab * k_frac)),
        teacher_temperature,
    )
    labels = None
    if masking:
        labels = torch.randint(0, 5, lead, generator=g)
        labels[torch.rand(lead, generator=g) < 0.3] = -100
    kwargs = dict(
        temperature=temperature,
        teacher_temperature=teacher_temperature,
        tail=tail,
        labels=labels,
        reduction=reduction,
    )
    s_k, s64 = s.clone().requires_grad_(), s.double().requires_grad_()
    loss = kdcore.sparse_kl_loss(s_k, ids, lps, **kwargs)
    ref = reference.sparse_kl_loss(s64, ids, lps.double(), **kwargs)
    assert_loss_close(loss, ref, (dtype,))
    go = torch.rand(loss.shape, generator=g) + 0.5 if reduction == "none" else None
    (grad,) = torch.autograd.grad(loss, s_k, go)
    if ref.requires_grad:
        (ref_grad,) = torch.autograd.grad(ref, s64, None if go is None else go.double())
    else:
        ref_grad = torch.zeros_like(s64)
    floor = 3e-6 * temperature
    assert_grad_close(grad, ref_grad, dtype, 1.0 if go is None else 2.0, floor=floor)


@pytest.mark.parametrize("tail", ["bucket", "renormalize", "zero"])
def test_full_vocabulary_top_k_is_the_dense_kl(backend, tail):
    s = make_logits((4, 40), torch.float32, seed=1)
    t = make_logits((4, 40), torch.float32, seed=2)
    ids, lps = _top_k(t, 40)
    sparse = kdcore.sparse_kl_loss(s, ids, lps, temperature=1.0)
    dense = kdcore.kl_loss(s, t, temperature=1.0)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-5, abs=1e-6)


def test_tail_bucket_counts_missing_mass(backend):
    # Teacher: 0.5 on token 0, 0.5 elsewhere; student uniform over 4 tokens.
    s = torch.zeros(1, 4)
    ids, lps = torch.tensor([[0]]), torch.tensor([[torch.log(torch.tensor(0.5)).item()]])
    got = kdcore.sparse_kl_loss(s, ids, lps, tail="bucket")
    # KL over {0, rest}: 0.5 log(0.5/0.25) + 0.5 log(0.5/0.75)
    expected = 0.5 * torch.log(torch.tensor(2.0)) + 0.5 * torch.log(torch.tensor(2 / 3))
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    renorm = kdcore.sparse_kl_loss(s, ids, lps, tail="renormalize")
    assert renorm.item() == pytest.approx(torch.log(torch.tensor(4.0)).item(), rel=1e-6)
    zero = kdcore.sparse_kl_loss(s, ids, lps, tail="zero")
    assert zero.item() == pytest.approx(0.5 * torch.log(torch.tensor(2.0)).item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # kernel and reference paths
def test_bad_teacher_is_rejected_clearly(dtype):
    s = torch.randn(2, 10, dtype=dtype)
    ids = torch.tensor([[1, 2], [3, 4]])
    lps = torch.log(torch.tensor([[0.5, 0.2], [0.1, 0.1]]))
    with pytest.raises(ValueError, match=r"teacher_ids must be in \[0, 10\), got \[12\]"):
        kdcore.sparse_kl_loss(s, torch.tensor([[1, 12], [3, 4]]), lps)
    with pytest.raises(ValueError, match=r"token id 2 appears twice"):
        kdcore.sparse_kl_loss(s, torch.tensor([[2, 2], [3, 4]]), lps)
    with pytest.raises(ValueError, match=r"must be log-probabilities \(<= 0\), got \[0.5"):
        kdcore.sparse_kl_loss(s, ids, torch.tensor([[0.5, -1.0], [-1.0, -2.0]]))
    with pytest.raises(ValueError, match=r"k >= 1 entries per position, got k = 0"):
        kdcore.sparse_kl_loss(s, ids[:, :0], lps[:, :0])
    with pytest.raises(ValueError, match=r"same shape \(\.\.\., k\)"):
        kdcore.sparse_kl_loss(s, ids, lps[:, :1])
    with pytest.raises(ValueError, match=r"teacher_ids must have shape"):
        kdcore.sparse_kl_loss(s, ids[:1], lps[:1])
    with pytest.raises(ValueError, match=r"top-k probabilities sum to 1.4"):
        kdcore.sparse_kl_loss(s, ids, torch.log(torch.tensor([[0.7, 0.7], [0.1, 0.1]])))
    with pytest.raises(ValueError, match=r"tail must be one of bucket, renormalize, zero"):
        kdcore.sparse_kl_loss(s, ids, lps, tail="drop")
    with pytest.raises(TypeError, match=r"teacher_ids must be an integer tensor"):
        kdcore.sparse_kl_loss(s, ids.float(), lps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_the_loss_does_not_read_are_not_checked(dtype):
    s = torch.randn(2, 10, dtype=dtype)
    ids = torch.tensor([[2, 2], [3, 4]])  # row 0 is invalid, and masked
    lps = torch.log(torch.tensor([[0.5, 0.2], [0.1, 0.1]]))
    got = kdcore.sparse_kl_loss(s, ids, lps, labels=torch.tensor([-100, 1]))
    exp = kdcore.sparse_kl_loss(s[1:], ids[1:], lps[1:])
    assert torch.allclose(got.double(), exp.double(), rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_renormalize_needs_top_k_mass_in_rows_it_reads(dtype):
    s = torch.randn(2, 10, dtype=dtype)
    ids = torch.tensor([[1, 2], [3, 4]])
    lps = torch.tensor([[-float("inf"), -float("inf")], [-0.5, -2.0]])
    with pytest.raises(ValueError, match=r"row 0: every top-k log-probability is -inf"):
        kdcore.sparse_kl_loss(s, ids, lps, tail="renormalize")
    masked = kdcore.sparse_kl_loss(s, ids, lps, tail="renormalize", labels=torch.tensor([-100, 0]))
    assert torch.isfinite(masked)
    assert torch.isfinite(kdcore.sparse_kl_loss(s, ids, lps, tail="bucket"))


def test_tiny_positive_log_probs_are_rounding_noise():
    s = torch.randn(1, 6)
    got = kdcore.sparse_kl_loss(s, torch.tensor([[2]]), torch.tensor([[3e-7]]))
    exp = kdcore.sparse_kl_loss(s, torch.tensor([[2]]), torch.tensor([[0.0]]))
    assert torch.equal(got, exp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    s = make_logits((3, 20), dtype, seed=3)
    ids, lps = _top_k(make_logits((3, 20), torch.float32, seed=4), 5)
    w = torch.rand(3)
    for tail in ("bucket", "renormalize", "zero"):
        torch.library.opcheck(
            sparse_kl_op, (s.clone().requires_grad_(), ids, lps, w, 2.0, 1.0, tail, True)
        )
        torch.library.opcheck(sparse_kl_op, (s, ids, lps, w, 1.0, 1.0, tail, False))


def test_gradcheck_float64():
    s = make_logits((3, 8), torch.float64, seed=5).requires_grad_()
    ids, lps = _top_k(make_logits((3, 8), torch.float64, seed=6), 3)
    for tail in ("bucket", "renormalize", "zero"):
        fn = lambda a, tail=tail: kdcore.sparse_kl_loss(  # noqa: E731
            a, ids, lps.double(), temperature=1.5, teacher_temperature=1.0, tail=tail
        )
        assert torch.autograd.gradcheck(fn, (s,))


def test_compile_fullgraph():
    torch._dynamo.reset()
    s = make_logits((2, 3, 50), torch.float32, seed=7).requires_grad_()
    ids, lps = _top_k(make_logits((2, 3, 50), torch.float32, seed=8), 6)
    fn = lambda a: kdcore.sparse_kl_loss(a, ids, lps, temperature=2.0)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager, got = fn(s), compiled(s)
    assert torch.allclose(got, eager, rtol=1e-6)
    (ga,) = torch.autograd.grad(eager, s)
    (gb,) = torch.autograd.grad(got, s)
    assert torch.allclose(ga, gb, rtol=1e-6, atol=1e-9)


def test_module_matches_functional():
    s = make_logits((3, 30), torch.float32, seed=9)
    ids, lps = _top_k(make_logits((3, 30), torch.float32, seed=10), 4)
    module = kdcore.nn.SparseKLLoss(temperature=2.0, tail="zero")
    assert torch.equal(
        module(s, ids, lps), kdcore.sparse_kl_loss(s, ids, lps, temperature=2.0, tail="zero")
    )
    assert "tail='zero'" in repr(module)
