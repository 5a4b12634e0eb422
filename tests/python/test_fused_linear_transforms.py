"""fused_linear_distillation_loss with logit transforms (student_logit_scale,
teacher_logit_scale, student_softcap, teacher_softcap) against an independent
float64 reference written here from torch ops: matmul, tanh, log_softmax and
each divergence's formula."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kdcore
from kdcore import reference
from kdcore.ops import vocab_parallel as vp_module

#: (scale, cap) of one side: identity, scale only, cap only (a strong one that
#: saturates the tanh, and a mild one), both.
TRANSFORMS = [(1.0, None), (0.5, None), (2.5, None), (1.0, 0.75), (1.0, 6.0), (1.7, 2.0)]


def transform64(z, scale, cap):
    return cap * torch.tanh(scale * z / cap) if cap is not None else scale * z


def divergence_rows64(lq, lp, divergence, beta):
    """Per row, in float64, from the log-probabilities of student (lq) and teacher (lp)."""
    p, q = lp.exp(), lq.exp()

    def kl(a, log_a, log_b):  # Σ a (log a − log b), 0 · anything = 0
        return torch.where(a > 0, a * (log_a - log_b), 0.0).sum(-1)

    if divergence == "kl":
        return kl(p, lp, lq)
    if divergence == "reverse_kl":
        return kl(q, lq, lp)
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    m = beta * p + (1.0 - beta) * q
    log_m = torch.log(m)
    return beta * kl(p, lp, log_m) + (1.0 - beta) * kl(q, lq, log_m)


def reference_loss(h, w, b, z_t, labels, opts):
    """The loss in float64 on the full logits (autograd gives its gradients)."""
    t = opts["temperature"]
    z_s = transform64(h @ w.t() + (b if b is not None else 0.0), *opts["student"])
    z_t = transform64(z_t, *opts["teacher"])
    lq = torch.log_softmax(z_s / t, -1)
    lp = torch.log_softmax(z_t / t, -1)
    div = divergence_rows64(lq, lp, opts["divergence"], opts["beta"]) * t * t
    alpha = opts["alpha"]
    valid = torch.ones(h.shape[0], dtype=torch.bool) if labels is None else labels != -100
    rows = (1.0 - alpha) * div
    if alpha > 0:
        safe = torch.where(valid, labels, 0)
        ce = -torch.log_softmax(z_s, -1).gather(1, safe[:, None]).squeeze(1)
        rows = rows + alpha * ce
    rows = torch.where(valid, rows, 0.0)
    total = rows.sum()
    if opts["reduction"] == "mean":
        total = total / valid.sum().clamp(min=1)
    return total


def _close(got, ref, dtype, what):
    got, ref = got.double(), ref.double()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    rel = 2.0**-8 if dtype == torch.bfloat16 else 2e-5
    bound = rel * ref.abs() + 2e-5 * scale + 1e-9
    err = (got - ref).abs()
    assert bool((err <= bound).all()), f"{what}: max err {err.max().item():.3e}, scale {scale:.3e}"


def make_case(seed, rows, hidden, vocab, dtype, *, bias):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(rows, hidden, generator=g) * 2).to(dtype)  # logits of a few units
    w = (torch.randn(vocab, hidden, generator=g) / math.sqrt(hidden)).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype) if bias else None
    th = torch.randn(rows, 8, generator=g)
    tw = torch.randn(vocab, 8, generator=g) * (3 / math.sqrt(8))
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[torch.rand(rows, generator=g) < 0.3] = -100
    return h, w, b, th, tw, labels


def run_and_compare(h, w, b, teacher, z_t64, labels, opts, dtype, **extra):
    hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
    bk = b.clone().requires_grad_() if b is not None else None
    (s_scale, s_cap), (t_scale, t_cap) = opts["student"], opts["teacher"]
    loss = kdcore.fused_linear_distillation_loss(
        hk,
        wk,
        student_bias=bk,
        labels=labels,
        alpha=opts["alpha"],
        divergence=opts["divergence"],
        beta=opts["beta"],
        temperature=opts["temperature"],
        reduction=opts["reduction"],
        student_logit_scale=s_scale,
        student_softcap=s_cap,
        teacher_logit_scale=t_scale,
        teacher_softcap=t_cap,
        **teacher,
        **extra,
    )
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    b64 = b.double().requires_grad_() if b is not None else None
    ref = reference_loss(h64, w64, b64, z_t64, labels, opts)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item()) + 1e-5, (loss, ref)
    wrt = [hk, wk] + ([bk] if bk is not None else [])
    wrt64 = [h64, w64] + ([b64] if b64 is not None else [])
    grads = torch.autograd.grad(loss, wrt)
    ref_grads = torch.autograd.grad(ref, wrt64)
    for name, got, exp in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=False):
        assert got.dtype == dtype
        _close(got, exp, dtype, name)


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
    chunk_over=st.sampled_from(["rows", "vocab"]),
    chunk=st.sampled_from([None, 1, 4]),
    temperature=st.sampled_from([1.0, 2.0]),
    student=st.sampled_from(TRANSFORMS),
    teacher=st.sampled_from(TRANSFORMS),
    seed=st.integers(0, 2**31 - 1),
)
def test_transforms_match_the_float64_reference(
    rows,
    hidden,
    vocab,
    dtype,
    teacher_as,
    divergence,
    alpha,
    use_bias,
    reduction,
    chunk_over,
    chunk,
    temperature,
    student,
    teacher,
    seed,
):
    if chunk_over == "vocab":  # vocabulary slices: forward / reverse KL, slice widths >= 1
        divergence = "kl" if divergence in ("jsd", "tvd") else divergence
    h, w, b, th, tw, labels = make_case(seed, rows, hidden, vocab, dtype, bias=use_bias)
    given_teacher = (
        {"teacher_logits": th @ tw.t()}
        if teacher_as == "logits"
        else {"teacher_hidden": th, "teacher_weight": tw}
    )
    opts = dict(
        divergence=divergence,
        beta=0.3,
        alpha=alpha,
        temperature=temperature,
        reduction=reduction,
        student=student,
        teacher=teacher,
    )
    z_t64 = th.double() @ tw.double().t()
    run_and_compare(
        h, w, b, given_teacher, z_t64, labels, opts, dtype, chunk_size=chunk, chunk_over=chunk_over
    )


@given(
    divergence=st.sampled_from(["kl", "reverse_kl", "jsd"]),
    alpha=st.sampled_from([0.0, 0.4]),
    student=st.sampled_from(TRANSFORMS),
    teacher=st.sampled_from(TRANSFORMS),
    chunk=st.sampled_from([None, 3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_transforms_on_the_float64_reference_path(divergence, alpha, student, teacher, chunk, seed):
    """float64 inputs run the unfused path (ordinary autograd through the tanh)."""
    h, w, b, th, tw, labels = make_case(seed, 6, 5, 23, torch.float64, bias=True)
    opts = dict(
        divergence=divergence,
        beta=0.3,
        alpha=alpha,
        temperature=1.5,
        reduction="mean",
        student=student,
        teacher=teacher,
    )
    z_t = th.double() @ tw.double().t()
    run_and_compare(
        h, w, b, {"teacher_logits": z_t}, z_t, labels, opts, torch.float64, chunk_size=chunk
    )


@given(
    divergence=st.sampled_from(["kl", "reverse_kl", "jsd"]),
    alpha=st.sampled_from([0.0, 0.4]),
    student=st.sampled_from(TRANSFORMS),
    teacher=st.sampled_from(TRANSFORMS),
    teacher_as=st.sampled_from(["logits", "linear"]),
    chunk=st.sampled_from([None, 3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_transforms_on_the_vocab_parallel_arithmetic(
    divergence, alpha, student, teacher, teacher_as, chunk, seed
):
    """The sharded loss (one rank, run through its own arithmetic): the
    transforms are elementwise, so each shard applies them to its own logits."""
    h, w, b, th, tw, labels = make_case(seed, 9, 6, 31, torch.float32, bias=True)
    given_teacher = (
        {"teacher_logits": th @ tw.t()}
        if teacher_as == "logits"
        else {"teacher_hidden": th, "teacher_weight": tw}
    )
    opts = dict(
        divergence=divergence,
        beta=0.3,
        alpha=alpha,
        temperature=2.0,
        reduction="mean",
        student=student,
        teacher=teacher,
    )
    vp_module.PLAIN_PATH_AT_SIZE_ONE = False
    try:
        run_and_compare(
            h,
            w,
            b,
            given_teacher,
            th.double() @ tw.double().t(),
            labels,
            opts,
            torch.float32,
            chunk_size=chunk,
            vocab_parallel=kdcore.VocabParallel(0, w.shape[0]),
        )
    finally:
        vp_module.PLAIN_PATH_AT_SIZE_ONE = True


@pytest.mark.parametrize("student", [(1.0, None), (1.5, None), (0.8, 3.0)])
def test_student_transform_with_a_topk_teacher(student):
    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(7, 5, generator=g) * 2, torch.randn(40, 5, generator=g)
    labels = torch.randint(0, 40, (7,), generator=g)
    teacher = torch.log_softmax(torch.randn(7, 40, generator=g, dtype=torch.float64), -1)
    lps, ids = teacher.topk(6, dim=-1)
    hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = kdcore.fused_linear_distillation_loss(
        hk,
        wk,
        teacher_topk=(ids, lps.float()),
        labels=labels,
        alpha=0.3,
        temperature=2.0,
        chunk_size=3,
        student_logit_scale=student[0],
        student_softcap=student[1],
    )
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    z = transform64(h64 @ w64.t(), *student)
    ref = 0.7 * reference.sparse_kl_loss(z, ids, lps, temperature=2.0, labels=labels)
    ref = ref + 0.3 * torch.nn.functional.cross_entropy(z, labels)
    assert abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item()) + 1e-5
    for name, got, exp in zip(
        ("hidden", "weight"),
        torch.autograd.grad(loss, [hk, wk]),
        torch.autograd.grad(ref, [h64, w64]),
        strict=True,
    ):
        _close(got, exp, torch.float32, name)


@pytest.mark.parametrize("chunk_over", ["rows", "vocab"])
def test_padded_vocabulary_stays_at_zero_probability_under_a_cap(chunk_over):
    """Padding comes after the transform: a padded entry is -inf, not -cap."""
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(6, 4, generator=g), torch.randn(10, 4, generator=g)
    z_t = torch.randn(6, 13, generator=g) * 3
    hk = h.clone().requires_grad_()
    loss = kdcore.fused_linear_distillation_loss(
        hk,
        w,
        teacher_logits=z_t,
        pad_vocab=True,
        chunk_over=chunk_over,
        student_softcap=2.0,
        divergence="reverse_kl",
    )
    h64 = h.double().requires_grad_()
    # The student's padded entries have probability 0: its log-softmax over its
    # own 10 entries, the teacher's over all 13 (then the student's 10 columns).
    lq = torch.log_softmax(transform64(h64 @ w.double().t(), 1.0, 2.0), -1)
    lp = torch.log_softmax(z_t.double(), -1)[:, :10]
    ref = divergence_rows64(lq, lp, "reverse_kl", 0.5).mean()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item()) + 1e-6
    (got,) = torch.autograd.grad(loss, [hk])
    (exp,) = torch.autograd.grad(ref, [h64])
    _close(got, exp, torch.float32, "hidden")


@pytest.mark.parametrize("chunk_over", ["rows", "vocab"])
def test_explicit_defaults_are_bit_identical(chunk_over):
    g = torch.Generator().manual_seed(4)
    h, w = torch.randn(9, 6, generator=g), torch.randn(50, 6, generator=g)
    z_t, labels = torch.randn(9, 50, generator=g), torch.randint(0, 50, (9,), generator=g)
    results = []
    for extra in (
        {},
        dict(student_logit_scale=1.0, teacher_logit_scale=1, student_softcap=None),
    ):
        hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = kdcore.fused_linear_distillation_loss(
            hk, wk, teacher_logits=z_t, labels=labels, alpha=0.2, chunk_over=chunk_over, **extra
        )
        loss.backward()
        results.append((loss, hk.grad, wk.grad))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_compiled_transforms_match_the_reference():
    """torch.compile(fullgraph=True) passes the transforms into the registered op."""
    torch._dynamo.reset()
    h, w, b, th, tw, labels = make_case(3, 8, 6, 40, torch.float32, bias=True)
    z_t = th @ tw.t()
    opts = dict(
        divergence="kl",
        beta=0.5,
        alpha=0.3,
        temperature=2.0,
        reduction="mean",
        student=(1.3, 4.0),
        teacher=(0.7, 2.5),
    )

    def step(h, w, b):
        return 2.0 * kdcore.fused_linear_distillation_loss(
            h,
            w,
            student_bias=b,
            teacher_logits=z_t,
            labels=labels,
            alpha=0.3,
            temperature=2.0,
            chunk_size=3,
            student_logit_scale=1.3,
            student_softcap=4.0,
            teacher_logit_scale=0.7,
            teacher_softcap=2.5,
        )

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    ins = [x.clone().requires_grad_() for x in (h, w, b)]
    got = compiled(*ins)
    got.backward()
    h64, w64, b64 = (x.double().requires_grad_() for x in (h, w, b))
    ref = 2.0 * reference_loss(h64, w64, b64, z_t.double(), labels, opts)
    ref.backward()
    assert abs(got.item() - ref.item()) <= 1e-4 * abs(ref.item())
    for name, a, r in zip(("hidden", "weight", "bias"), ins, (h64, w64, b64), strict=True):
        _close(a.grad, r.grad, torch.float32, name)


@pytest.mark.parametrize(
    ("name", "value", "error", "message"),
    [
        ("student_logit_scale", 0.0, ValueError, "student_logit_scale must be finite and > 0"),
        ("teacher_logit_scale", -2.0, ValueError, "teacher_logit_scale must be finite and > 0"),
        ("student_logit_scale", math.inf, ValueError, "must be finite and > 0"),
        ("student_logit_scale", math.nan, ValueError, "must be finite and > 0"),
        ("student_logit_scale", None, TypeError, "student_logit_scale must be a float"),
        ("teacher_logit_scale", True, TypeError, "teacher_logit_scale must be a float"),
        ("student_softcap", 0.0, ValueError, r"student_softcap must be finite and > 0 \(or None"),
        ("teacher_softcap", -30.0, ValueError, "teacher_softcap must be finite and > 0"),
        ("student_softcap", math.inf, ValueError, "student_softcap must be finite and > 0"),
        ("teacher_softcap", "30", TypeError, "teacher_softcap must be a float or None"),
        ("student_softcap", torch.tensor(3.0), TypeError, "student_softcap must be a float"),
    ],
)
def test_bad_transform_arguments(name, value, error, message):
    h, w, t = torch.randn(4, 6), torch.randn(10, 6), torch.randn(4, 10)
    with pytest.raises(error, match=message):
        kdcore.fused_linear_distillation_loss(h, w, teacher_logits=t, **{name: value})


def test_a_topk_teacher_takes_no_teacher_transform():
    h, w = torch.randn(4, 6), torch.randn(10, 6)
    ids, lps = torch.randint(0, 10, (4, 3)), -torch.rand(4, 3)
    for extra in ({"teacher_softcap": 30.0}, {"teacher_logit_scale": 2.0}):
        with pytest.raises(ValueError, match="a top-k teacher gives log-probabilities"):
            kdcore.fused_linear_distillation_loss(h, w, teacher_topk=(ids, lps), **extra)
