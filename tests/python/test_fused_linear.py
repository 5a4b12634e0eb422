"""fused_linear_distillation_loss against the unfused float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kdcore
from kdcore import reference


def _unfused(h, w, b, z_t, labels, *, alpha, divergence, beta, temperature, reduction, scale_t2):
    z = h @ w.t() + (b if b is not None else 0.0)
    if labels is None:
        rows = reference.divergence_rows(z, z_t, divergence, beta, temperature)
        rows = rows * (temperature**2 if scale_t2 else 1.0)
        return rows.mean() if reduction == "mean" else rows.sum()
    return reference.distillation_loss(
        z, z_t, labels, alpha=alpha, temperature=temperature, divergence=divergence, beta=beta,
        reduction=reduction, scale_t2=scale_t2,
    )  # fmt: skip


def _close(got, ref, dtype, what):
    got, ref = got.double(), ref.double()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    rel = 2.0**-8 if dtype == torch.bfloat16 else 2e-5
    bound = rel * ref.abs() + 1e-5 * scale + 1e-9
    err = (got - ref).abs()
    assert bool((err <= bound).all()), f"{what}: max err {err.max().item():.3e}, scale {scale:.3e}"


@given(
    rows=st.sampled_from([1, 5, 17]),
    hidden=st.sampled_from([3, 16]),
    vocab=st.sampled_from([7, 64, 300]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    teacher_as=st.sampled_from(["logits", "linear"]),
    divergence=st.sampled_from(["kl", "reverse_kl", "jsd", "tvd"]),
    alpha=st.sampled_from([0.0, 0.4]),
    use_bias=st.booleans(),
    reduction=st.sampled_from(["mean", "sum"]),
    chunk=st.sampled_from([None, 1, 4]),
    temperature=st.sampled_from([1.0, 2.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_unfused_reference(
    rows, hidden, vocab, dtype, teacher_as, divergence, alpha, use_bias, reduction, chunk,
    temperature, seed,
):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) / math.sqrt(hidden)).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype) if use_bias else None
    th = torch.randn(rows, 8, generator=g)
    tw = torch.randn(vocab, 8, generator=g) / math.sqrt(8)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[torch.rand(rows, generator=g) < 0.3] = -100
    teacher = (
        {"teacher_logits": th @ tw.t()}
        if teacher_as == "logits"
        else {"teacher_hidden": th, "teacher_weight": tw}
    )
    hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
    bk = b.clone().requires_grad_() if b is not None else None
    kw = dict(alpha=alpha, divergence=divergence, beta=0.3, temperature=temperature,
              reduction=reduction, scale_t2=True)  # fmt: skip
    loss = kdcore.fused_linear_distillation_loss(
        hk, wk, labels=labels, student_bias=bk, chunk_size=chunk, **teacher, **kw
    )
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    b64 = b.double().requires_grad_() if b is not None else None
    ref = _unfused(h64, w64, b64, (th @ tw.t()).double(), labels, **kw)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item()) + 1e-5
    wrt = [hk, wk] + ([bk] if bk is not None else [])
    wrt64 = [h64, w64] + ([b64] if b64 is not None else [])
    grads = torch.autograd.grad(loss, wrt)
    ref_grads = torch.autograd.grad(ref, wrt64, allow_unused=True)
    for name, got, exp in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=False):
        assert got.dtype == dtype
        exp = torch.zeros_like(got, dtype=torch.float64) if exp is None else exp
        _close(got, exp, dtype, name)


def test_vocab_mismatch_is_an_error_unless_padded():
    h, w = torch.randn(4, 6), torch.randn(10, 6)
    t_logits = torch.randn(4, 8)
    with pytest.raises(
        ValueError, match=r"student vocabulary 10 != teacher vocabulary 8; pass pad_vocab=True"
    ):
        kdcore.fused_linear_distillation_loss(h, w, teacher_logits=t_logits)
    got = kdcore.fused_linear_distillation_loss(h, w, teacher_logits=t_logits, pad_vocab=True)
    padded = torch.cat([t_logits, torch.full((4, 2), -math.inf)], dim=-1)
    exp = kdcore.kl_loss(h @ w.t(), padded)
    assert got.item() == pytest.approx(exp.item(), rel=1e-5)


def test_bad_arguments():
    h, w, t = torch.randn(4, 6), torch.randn(10, 6), torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"reduction='none' is not offered"):
        kdcore.fused_linear_distillation_loss(h, w, teacher_logits=t, reduction="none")
    with pytest.raises(ValueError, match=r"alpha=0.5 weights a hard-label term: pass labels"):
        kdcore.fused_linear_distillation_loss(h, w, teacher_logits=t, alpha=0.5)
    with pytest.raises(ValueError, match=r"give the teacher as teacher_logits, or as"):
        kdcore.fused_linear_distillation_loss(h, w)
    with pytest.raises(ValueError, match=r"student_weight must have shape \(V, 6\)"):
        kdcore.fused_linear_distillation_loss(h, torch.randn(10, 5), teacher_logits=t)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int"):
        kdcore.fused_linear_distillation_loss(h, w, teacher_logits=t, chunk_size=-1)


def test_gradcheck_float64_reference_path():
    h = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64)
    labels = torch.tensor([1, -100, 4])
    fn = lambda a, b: kdcore.fused_linear_distillation_loss(  # noqa: E731
        a, b, teacher_logits=t, labels=labels, alpha=0.3, temperature=1.5
    )
    assert torch.autograd.gradcheck(fn, (h, w))
