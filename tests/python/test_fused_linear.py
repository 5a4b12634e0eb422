"""fused_linear_distillation_loss against the unfused float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kdcore
from conftest import assert_grad_close
from kdcore import _dispatch, reference
from kdcore._backend import DistillArgs
from kdcore.ops import _linear


def _unfused(h, w, b, z_t, labels, *, alpha, divergence, beta, temperature, reduction, scale_t2):
    z = h @ w.t() + (b if b is not None else 0.0)
    if labels is None:
        rows = reference.divergence_rows(z, z_t, divergence, beta, temperature)
        rows = rows * (temperature**2 if scale_t2 else 1.0)
        return rows.mean() if reduction == "mean" else rows.sum()
    return reference.distillation_loss(
        z,
        z_t,
        labels,
        alpha=alpha,
        temperature=temperature,
        divergence=divergence,
        beta=beta,
        reduction=reduction,
        scale_t2=scale_t2,
    )


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
    rows,
    hidden,
    vocab,
    dtype,
    teacher_as,
    divergence,
    alpha,
    use_bias,
    reduction,
    chunk,
    temperature,
    seed,
):
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
    kw = dict(
        alpha=alpha,
        divergence=divergence,
        beta=0.3,
        temperature=temperature,
        reduction=reduction,
        scale_t2=True,
    )
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
    with pytest.raises(
        ValueError, match=r"give the teacher once: as teacher_logits, as teacher_hidden"
    ):
        kdcore.fused_linear_distillation_loss(h, w)
    with pytest.raises(ValueError, match=r"student_weight must have shape \(V, 6\)"):
        kdcore.fused_linear_distillation_loss(h, torch.randn(10, 5), teacher_logits=t)
    for bad in (-1, 0, 2.5, True):
        with pytest.raises(ValueError, match=r"chunk_size must be a positive int"):
            kdcore.fused_linear_distillation_loss(h, w, teacher_logits=t, chunk_size=bad)
    for over in ("rows", "vocab"):  # the vocabulary path would slice a wrong bias silently
        with pytest.raises(ValueError, match=r"student_bias must have shape \(10,\)"):
            kdcore.fused_linear_distillation_loss(
                h, w, student_bias=torch.zeros(12), teacher_logits=t, chunk_over=over
            )
    with pytest.raises(ValueError, match=r"student_bias must have 1 dimensions"):
        kdcore.fused_linear_distillation_loss(
            h, w, student_bias=torch.zeros(1, 10), teacher_logits=t
        )
    th, tw = torch.randn(4, 3), torch.randn(10, 3)
    with pytest.raises(ValueError, match=r"teacher_bias must have shape \(10,\)"):
        kdcore.fused_linear_distillation_loss(
            h, w, teacher_hidden=th, teacher_weight=tw, teacher_bias=torch.zeros(9)
        )
    with pytest.raises(ValueError, match=r"teacher_bias goes with teacher_hidden"):
        kdcore.fused_linear_distillation_loss(h, w, teacher_logits=t, teacher_bias=torch.zeros(10))


def test_an_empty_vocabulary_is_a_clear_error():
    # It used to end in a ZeroDivisionError (the default chunk size divides by V).
    h = torch.randn(4, 8)
    with pytest.raises(ValueError, match="student_weight has no rows"):
        kdcore.fused_linear_distillation_loss(
            h, torch.randn(0, 8), teacher_logits=torch.randn(4, 3), pad_vocab=True
        )
    with pytest.raises(ValueError, match="teacher_weight has no rows"):
        kdcore.fused_linear_distillation_loss(
            h, torch.randn(5, 8), teacher_hidden=torch.randn(4, 3), teacher_weight=torch.randn(0, 3)
        )


def test_gradcheck_float64_reference_path():
    h = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64)
    labels = torch.tensor([1, -100, 4])
    fn = lambda a, b: kdcore.fused_linear_distillation_loss(  # noqa: E731
        a, b, teacher_logits=t, labels=labels, alpha=0.3, temperature=1.5
    )
    assert torch.autograd.gradcheck(fn, (h, w))


def _grads_close(loss, ref, wrt, wrt64, dtype):
    grads = torch.autograd.grad(loss, wrt)
    ref_grads = torch.autograd.grad(ref, wrt64, allow_unused=True)
    for name, got, exp in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=False):
        assert got.dtype == dtype
        exp = torch.zeros_like(got, dtype=torch.float64) if exp is None else exp
        _close(got, exp, dtype, name)


def _loss_and_grads_close(loss, ref, ours, refs, dtype):
    """Loss within 1e-4 relative of the float64 reference, and the gradients
    w.r.t. every given input (None entries skipped) as ``_grads_close``."""
    assert abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item()) + 1e-5
    given_ = [i for i, x in enumerate(ours) if x is not None]
    _grads_close(loss, ref, [ours[i] for i in given_], [refs[i] for i in given_], dtype)


@given(
    lead=st.sampled_from([(9,), (2, 7)]),
    vocab=st.sampled_from([11, 100]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    divergence=st.sampled_from(["kl", "jsd", "reverse_kl"]),
    alpha=st.sampled_from([0.0, 0.5]),
    normalize=st.sampled_from(["span", "token"]),
    chunk=st.sampled_from([None, 2, 5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_span_weights_match_the_unfused_reference(
    lead, vocab, dtype, divergence, alpha, normalize, chunk, seed
):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, 6, generator=g).to(dtype)
    w = (torch.randn(vocab, 6, generator=g) / math.sqrt(6)).to(dtype)
    z_t = torch.randn(*lead, vocab, generator=g) * 2
    labels = torch.randint(0, vocab, lead, generator=g)
    labels[torch.rand(lead, generator=g) < 0.2] = -100
    spans = torch.randint(0, 4, lead, generator=g)
    weights = {0: 0.0, 1: 1.0, 2: 2.5, 3: 0.0}
    kw = dict(alpha=alpha, divergence=divergence, beta=0.5, temperature=2.0)
    hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = kdcore.fused_linear_distillation_loss(
        hk,
        wk,
        teacher_logits=z_t,
        labels=labels,
        spans=spans,
        span_weights=weights,
        normalize=normalize,
        chunk_size=chunk,
        **kw,
    )
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref = reference.distillation_loss(
        h64 @ w64.t(),
        z_t.double(),
        labels,
        spans=spans,
        span_weights=weights,
        normalize=normalize,
        **kw,
    )
    assert abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item()) + 1e-5
    _grads_close(loss, ref, [hk, wk], [h64, w64], dtype)


@given(
    rows=st.sampled_from([1, 6, 13]),
    vocab=st.sampled_from([9, 80]),
    k=st.sampled_from([1, 4, 9]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    tail=st.sampled_from(["bucket", "renormalize", "zero"]),
    alpha=st.sampled_from([0.0, 0.3]),
    temperature=st.sampled_from([1.0, 2.0]),
    teacher_temperature=st.sampled_from([1.0, 1.5]),
    use_bias=st.booleans(),
    chunk=st.sampled_from([None, 1, 4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_topk_teacher_matches_the_unfused_reference(
    rows, vocab, k, dtype, tail, alpha, temperature, teacher_temperature, use_bias, chunk, seed
):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, 5, generator=g).to(dtype)
    w = (torch.randn(vocab, 5, generator=g) / math.sqrt(5)).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype) if use_bias else None
    teacher = torch.log_softmax(torch.randn(rows, vocab, generator=g, dtype=torch.float64), -1)
    lps, ids = teacher.topk(min(k, vocab), dim=-1)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[torch.rand(rows, generator=g) < 0.3] = -100
    hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
    bk = b.clone().requires_grad_() if b is not None else None
    loss = kdcore.fused_linear_distillation_loss(
        hk,
        wk,
        student_bias=bk,
        teacher_topk=(ids, lps.float()),
        labels=labels,
        alpha=alpha,
        temperature=temperature,
        teacher_temperature=teacher_temperature,
        tail=tail,
        chunk_size=chunk,
    )
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    b64 = b.double().requires_grad_() if b is not None else None
    z = h64 @ w64.t() + (b64 if b64 is not None else 0.0)
    # Independent composition: (1 - alpha) * sparse KL + alpha * CE, both means over valid rows.
    ref = (1 - alpha) * reference.sparse_kl_loss(
        z,
        ids,
        lps,
        temperature=temperature,
        teacher_temperature=teacher_temperature,
        tail=tail,
        labels=labels,
    )
    if alpha > 0 and bool((labels != -100).any()):
        ref = ref + alpha * torch.nn.functional.cross_entropy(z, labels, ignore_index=-100)
    _loss_and_grads_close(loss, ref, (hk, wk, bk), (h64, w64, b64), dtype)


def test_topk_teacher_errors():
    h, w = torch.randn(4, 6), torch.randn(10, 6)
    ids, lps = torch.randint(0, 10, (4, 3)), -torch.rand(4, 3)
    with pytest.raises(ValueError, match=r"top-k teacher trains with divergence='kl'"):
        kdcore.fused_linear_distillation_loss(h, w, teacher_topk=(ids, lps), divergence="jsd")
    with pytest.raises(ValueError, match=r"teacher_ids must be in \[0, 10\)"):
        kdcore.fused_linear_distillation_loss(h, w, teacher_topk=(ids + 10, lps))
    with pytest.raises(ValueError, match=r"give the teacher once"):
        kdcore.fused_linear_distillation_loss(
            h, w, teacher_topk=(ids, lps), teacher_logits=torch.randn(4, 10)
        )
    with pytest.raises(TypeError, match=r"teacher_topk must be a pair"):
        kdcore.fused_linear_distillation_loss(h, w, teacher_topk=ids)
    with pytest.raises(ValueError, match=r"tail must be one of"):
        kdcore.fused_linear_distillation_loss(h, w, teacher_topk=(ids, lps), tail="drop")
    with pytest.raises(ValueError, match=r"reduction must be 'mean'"):
        kdcore.fused_linear_distillation_loss(
            h,
            w,
            teacher_logits=torch.randn(4, 10),
            spans=torch.ones(4, dtype=torch.long),
            reduction="sum",
        )


def _compile_case(teacher_as: str):
    g = torch.Generator().manual_seed(11)
    h = torch.randn(2, 5, 8, generator=g)
    w = torch.randn(40, 8, generator=g) / math.sqrt(8)
    b = torch.randn(40, generator=g)
    labels = torch.randint(0, 40, (2, 5), generator=g)
    labels[0, 1] = -100
    spans = torch.randint(0, 3, (2, 5), generator=g)
    if teacher_as == "topk":
        lps, ids = torch.log_softmax(torch.randn(2, 5, 40, generator=g), -1).topk(6, dim=-1)
        teacher = {"teacher_topk": (ids, lps)}
    elif teacher_as == "linear":
        teacher = {
            "teacher_hidden": torch.randn(2, 5, 6, generator=g),
            "teacher_weight": torch.randn(40, 6, generator=g),
        }
    else:
        teacher = {"teacher_logits": torch.randn(2, 5, 40, generator=g) * 2}
    return h, w, b, labels, spans, teacher


@pytest.mark.parametrize(
    ("teacher_as", "chunk_over"),
    [
        ("logits", "rows"),
        ("linear", "rows"),
        ("topk", "rows"),
        ("logits", "vocab"),
        ("linear", "vocab"),
    ],
)
def test_compile_fullgraph_one_op_matches_eager(teacher_as, chunk_over):
    """torch.compile(fullgraph=True) traces the fused linear loss as one op
    (kdcore::fused_linear_distill) and gives eager's loss and gradients."""
    torch._dynamo.reset()
    h, w, b, labels, spans, teacher = _compile_case(teacher_as)

    def step(h, w, b):
        loss = kdcore.fused_linear_distillation_loss(
            h,
            w,
            student_bias=b,
            labels=labels,
            alpha=0.3,
            temperature=2.0,
            spans=spans,
            span_weights={0: 0.5, 1: 1.0, 2: 2.0},
            chunk_size=3,
            chunk_over=chunk_over,
            **teacher,
        )
        return 2.0 * loss  # a non-unit upstream gradient

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_in = [x.clone().requires_grad_() for x in (h, w, b)]
    compiled_in = [x.clone().requires_grad_() for x in (h, w, b)]
    eager = step(*eager_in)
    got = compiled(*compiled_in)
    eager.backward()
    got.backward()
    assert torch.allclose(got, eager, rtol=1e-6, atol=1e-7)
    for name, a, c in zip(("hidden", "weight", "bias"), eager_in, compiled_in, strict=True):
        assert torch.allclose(c.grad, a.grad, rtol=1e-5, atol=1e-7), name
    # ... and the eager gradients are the float64 reference's (the op is not just self-consistent).
    h64, w64, b64 = (x.double().requires_grad_() for x in (h, w, b))
    kw = dict(
        student_bias=b64,
        labels=labels,
        alpha=0.3,
        temperature=2.0,
        spans=spans,
        span_weights={0: 0.5, 1: 1.0, 2: 2.0},
    )
    t64 = {
        k: (
            tuple(x.double() if x.is_floating_point() else x for x in v)
            if isinstance(v, tuple)
            else v.double()
        )
        for k, v in teacher.items()
    }
    ref = 2.0 * kdcore.fused_linear_distillation_loss(h64, w64, **kw, **t64)  # float64: reference
    ref.backward()
    for name, a, r in zip(("hidden", "weight", "bias"), eager_in, (h64, w64, b64), strict=True):
        assert torch.allclose(a.grad.double(), r.grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("chunk_over", ["rows", "vocab"])
@pytest.mark.parametrize(
    "transforms", [(1.0, 1.0, None, None), (1.5, 0.5, 4.0, 3.0)], ids=["plain", "transformed"]
)
def test_fused_linear_op_opcheck(chunk_over, transforms):
    h, w, b, labels, _, teacher = _compile_case("logits")
    rows = h.shape[0] * h.shape[1]
    args = (
        h.reshape(rows, -1).requires_grad_(),
        w.clone().requires_grad_(),
        b.clone().requires_grad_(),
        teacher["teacher_logits"].reshape(rows, -1),
        None,
        None,
        None,
        None,
        None,
        torch.where(labels == -100, 0, labels).reshape(-1),
        torch.full((rows,), 0.1),
        torch.full((rows,), 0.05),
        2.0,
        1.0,
        "bucket",
        "kl",
        0.5,
        40,
        4,
        chunk_over,
        *transforms,
        True,
        True,
        True,
    )
    torch.library.opcheck(torch.ops.kdcore.fused_linear_distill.default, args)


@given(
    rows=st.sampled_from([1, 7, 16]),
    vocab_s=st.sampled_from([5, 64, 130]),
    pad=st.sampled_from([0, 3, -2]),  # teacher vocabulary = student's + pad
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    teacher_as=st.sampled_from(["logits", "linear"]),
    divergence=st.sampled_from(["kl", "reverse_kl"]),
    alpha=st.sampled_from([0.0, 0.4]),
    use_bias=st.booleans(),
    use_spans=st.booleans(),
    width=st.sampled_from([None, 1, 7, 64]),
    temperature=st.sampled_from([1.0, 2.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_vocab_chunks_match_the_unfused_reference(
    rows,
    vocab_s,
    pad,
    dtype,
    teacher_as,
    divergence,
    alpha,
    use_bias,
    use_spans,
    width,
    temperature,
    seed,
):
    """chunk_over="vocab": two passes over vocabulary slices of ``width``
    columns give the float64 reference's loss and gradients, also with padded
    vocabularies (teacher larger or smaller), spans and a masked NaN row."""
    vocab_t = max(1, vocab_s + pad)
    if divergence == "reverse_kl" and vocab_t < vocab_s:
        vocab_t = vocab_s  # student mass where the teacher has none: reverse KL = inf
    if divergence == "kl" and vocab_t > vocab_s:
        vocab_t = vocab_s  # teacher mass where the student has none: KL = inf
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, 6, generator=g).to(dtype)
    w = (torch.randn(vocab_s, 6, generator=g) / math.sqrt(6)).to(dtype)
    b = torch.randn(vocab_s, generator=g).to(dtype) if use_bias else None
    labels = torch.randint(0, vocab_s, (rows,), generator=g)
    labels[torch.rand(rows, generator=g) < 0.25] = -100
    if teacher_as == "logits":
        z_t = torch.randn(rows, vocab_t, generator=g) * 2
        z_t[labels == -100] = float("nan")  # masked rows are never read
        teacher = {"teacher_logits": z_t}
        teacher64 = {"teacher_logits": z_t.double()}
    else:
        th, tw = torch.randn(rows, 4, generator=g), torch.randn(vocab_t, 4, generator=g)
        teacher = {"teacher_hidden": th, "teacher_weight": tw}
        teacher64 = {"teacher_hidden": th.double(), "teacher_weight": tw.double()}
    kw = dict(
        labels=labels,
        alpha=alpha,
        divergence=divergence,
        temperature=temperature,
        pad_vocab=vocab_t != vocab_s,
    )
    if use_spans:
        kw.update(
            spans=torch.randint(0, 3, (rows,), generator=g), span_weights={0: 0.5, 1: 1.0, 2: 2.0}
        )
    hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
    bk = b.clone().requires_grad_() if b is not None else None
    loss = kdcore.fused_linear_distillation_loss(
        hk, wk, student_bias=bk, chunk_over="vocab", chunk_size=width, **teacher, **kw
    )
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    b64 = b.double().requires_grad_() if b is not None else None
    ref = kdcore.fused_linear_distillation_loss(h64, w64, student_bias=b64, **teacher64, **kw)
    assert torch.isfinite(loss) == torch.isfinite(ref)
    if not bool(torch.isfinite(ref)):
        return
    _loss_and_grads_close(loss, ref, (hk, wk, bk), (h64, w64, b64), dtype)


def test_vocab_chunks_need_a_dense_kl_teacher():
    h, w = torch.randn(3, 4), torch.randn(10, 4)
    z_t = torch.randn(3, 10)
    for div in ("jsd", "tvd"):
        with pytest.raises(ValueError, match="chunk_over='vocab'"):
            kdcore.fused_linear_distillation_loss(
                h, w, teacher_logits=z_t, divergence=div, chunk_over="vocab"
            )
    lps, ids = torch.log_softmax(z_t, -1).topk(3, dim=-1)
    with pytest.raises(ValueError, match="top-k"):
        kdcore.fused_linear_distillation_loss(h, w, teacher_topk=(ids, lps), chunk_over="vocab")
    with pytest.raises(ValueError, match="chunk_over"):
        kdcore.fused_linear_distillation_loss(h, w, teacher_logits=z_t, chunk_over="columns")


@given(
    vocab=st.sampled_from([7, 300]),
    divergence=st.sampled_from(["kl", "reverse_kl", "jsd", "tvd"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_kernel_stores_the_gradient_in_the_requested_dtype(vocab, divergence, seed):
    # The CUDA row chunks ask the loss kernel for a bf16 logit gradient (the
    # GEMM operand): fp32 logits in, the gradient rounded once, within an ulp
    # of the float64 gradient.
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(6, vocab, generator=g) * 3, torch.randn(6, vocab, generator=g) * 3
    w = torch.rand(6, generator=g)
    kernels = _dispatch.kernels_for("distill", s)  # Rust here, Triton in the interpreter shard
    args = DistillArgs(s, t, w, 2.0, divergence, 0.3, grad_student=True, grad_dtype=torch.bfloat16)
    loss, _, grad, _ = kernels.distill(args)
    s64 = s.double().requires_grad_()
    rows = reference.divergence_rows(s64, t.double(), divergence, 0.3, 2.0) * w.double()
    (ref_grad,) = torch.autograd.grad(rows.sum(), s64)
    assert torch.allclose(loss.double(), rows.detach(), rtol=1e-5, atol=1e-7)
    assert_grad_close(grad, ref_grad, torch.bfloat16)


def test_weight_gradient_accumulates_on_tensor_cores(monkeypatch):
    # On CUDA, acc += a @ b with 16-bit operands is one cuBLAS call with an fp32
    # output (aten::addmm.dtype_out, in place): checked on meta tensors, which
    # run the same dispatch as CUDA ones without a GPU.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(_linear, "tensor_cores", lambda a, b: True)
    acc = torch.empty(9, 4, device="meta")
    a = torch.empty(9, 5, device="meta", dtype=torch.bfloat16)
    b = torch.empty(5, 4, device="meta", dtype=torch.bfloat16)
    with Calls() as calls:
        out = _linear.addmm32_(acc, a, b)
    assert calls.seen == ["aten.addmm.dtype_out"], calls.seen
    assert out.dtype == torch.float32 and out.shape == acc.shape


def test_weight_gradient_accumulator_elsewhere_widens_the_operands():
    g = torch.Generator().manual_seed(0)
    acc = torch.randn(9, 4, generator=g)
    a = torch.randn(9, 5, generator=g).to(torch.bfloat16)
    b = torch.randn(5, 4, generator=g).to(torch.bfloat16)
    expected = acc.double() + a.double() @ b.double()
    out = _linear.addmm32_(acc, a, b)
    assert out is acc and acc.dtype == torch.float32
    assert torch.allclose(acc.double(), expected, rtol=1e-6, atol=1e-6)


@given(
    teacher_as=st.sampled_from(["logits", "linear"]),
    pad=st.sampled_from([0, -3]),  # teacher vocabulary = student's + pad (finite KL)
    alpha=st.sampled_from([0.0, 0.4]),
    chunk=st.sampled_from([None, 4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_row_chunks_with_16bit_gemm_operands(monkeypatch, teacher_as, pad, alpha, chunk, seed):
    # The CUDA row path (W kept in bf16, the logit gradient stored in bf16 by
    # the kernel, weight gradient accumulated in fp32), run on the CPU: only
    # the cuBLAS calls differ (they widen here). Gradients within bf16 GEMM
    # accuracy of float64: 2^-7 of their largest entry.
    from kdcore.ops import _fused_linear_rows

    monkeypatch.setattr(_fused_linear_rows, "tensor_cores", lambda a, b: a.dtype in _linear.HALF)
    g = torch.Generator().manual_seed(seed)
    rows, hidden, vocab = 9, 16, 50
    h = torch.randn(rows, hidden, generator=g).to(torch.bfloat16)
    w = (torch.randn(vocab, hidden, generator=g) / 4).to(torch.bfloat16)
    b = torch.randn(vocab, generator=g).to(torch.bfloat16)
    th, tw = torch.randn(rows, 8, generator=g), torch.randn(vocab + pad, 8, generator=g) / 3
    teacher = (
        {"teacher_logits": th @ tw.t()}
        if teacher_as == "logits"
        else {"teacher_hidden": th, "teacher_weight": tw}
    )
    labels = torch.randint(0, vocab, (rows,), generator=g)
    kw = dict(labels=labels, alpha=alpha, temperature=2.0, pad_vocab=True, **teacher)
    ours = [x.clone().requires_grad_() for x in (h, w, b)]
    loss = kdcore.fused_linear_distillation_loss(
        ours[0], ours[1], student_bias=ours[2], chunk_size=chunk, **kw
    )
    refs = [x.double().requires_grad_() for x in (h, w, b)]
    ref = kdcore.fused_linear_distillation_loss(refs[0], refs[1], student_bias=refs[2], **kw)
    assert abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item()) + 1e-5
    grads, ref_grads = torch.autograd.grad(loss, ours), torch.autograd.grad(ref, refs)
    for name, got, exp in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        assert got.dtype == torch.bfloat16, name
        err = (got.double() - exp).abs().max().item()
        assert err <= 2**-7 * exp.abs().max().item(), f"{name}: {err:.3e}"


@pytest.mark.parametrize("chunk_over", ["rows", "vocab"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_no_term_reads_may_hold_nan(chunk_over, dtype):
    # A masked row's hidden state is never read: NaN there reaches neither the
    # loss nor any gradient (the weight gradient sums over rows).
    g = torch.Generator().manual_seed(5)
    h = torch.randn(6, 8, generator=g, dtype=dtype)
    w = torch.randn(20, 8, generator=g, dtype=dtype) / 3
    t = torch.randn(6, 20, generator=g, dtype=dtype)
    labels = torch.randint(0, 20, (6,), generator=g)
    labels[2] = -100
    kw = dict(
        teacher_logits=t,
        labels=labels,
        alpha=0.3,
        chunk_size=4 if chunk_over == "rows" else 8,
        chunk_over=chunk_over,
    )
    clean = h.clone()
    h[2] = math.nan
    outs = []
    for x in (h, clean):
        hk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = kdcore.fused_linear_distillation_loss(hk, wk, **kw)
        outs.append((loss, *torch.autograd.grad(loss, (hk, wk))))
    for got, want in zip(outs[0], outs[1], strict=True):
        assert torch.isfinite(got).all()
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


def test_float64_reference_path_keeps_float64():
    # Row weights and teacher logits stay float64 (1/3 is not a float32 number).
    g = torch.Generator().manual_seed(6)
    h, w = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g)
    w = w.double()
    t = torch.randn(3, 5, generator=g, dtype=torch.float64) * 3
    got = kdcore.fused_linear_distillation_loss(h, w, teacher_logits=t, temperature=1.5)
    want = 1.5**2 * reference.kl_div_rows(h @ w.t(), t, 1.5).mean()
    assert got.dtype == torch.float64
    assert abs(got.item() - want.item()) <= 1e-13 * abs(want.item())
