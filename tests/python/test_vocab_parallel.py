"""The fused linear loss with a vocabulary-parallel head (kdcore.VocabParallel)
against the float64 full-vocabulary reference: the sharded arithmetic on one
process, then 2 gloo processes with an uneven split (the same loss and the
full hidden-state gradient on every rank, each rank's slice of the weight and
bias gradients), and shard layouts that fail on every rank with one error."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kdcore
from conftest import assert_grad_close
from dist_harness import run, values
from kdcore import VocabParallel, reference
from kdcore.ops import vocab_parallel as vp_module

SPAN_WEIGHTS = {0: 0.0, 1: 1.0, 2: 0.5, 3: 0.0}


def make_case(
    seed,
    *,
    rows=11,
    hidden=6,
    vocab=37,
    t_hidden=5,
    dtype=torch.float32,
    bias=True,
    teacher_bias=False,
):
    g = torch.Generator().manual_seed(seed)
    case = {
        "h": torch.randn(rows, hidden, generator=g).to(dtype),
        "w": (torch.randn(vocab, hidden, generator=g) / math.sqrt(hidden)).to(dtype),
        "b": torch.randn(vocab, generator=g).to(dtype) if bias else None,
        "th": torch.randn(rows, t_hidden, generator=g),
        "tw": torch.randn(vocab, t_hidden, generator=g) / math.sqrt(t_hidden),
        "tb": torch.randn(vocab, generator=g) if teacher_bias else None,
        "labels": torch.randint(0, vocab, (rows,), generator=g),
        "spans": torch.randint(0, 4, (rows,), generator=g),
    }
    if dtype == torch.float64:  # a float64 teacher too: the comparison is exact to 1e-10
        case.update({k: case[k].double() for k in ("th", "tw", "tb") if case[k] is not None})
    case["labels"][torch.rand(rows, generator=g) < 0.3] = -100
    case["labels"][0] = 3  # some row is labelled
    case["spans"][0] = 1
    return case


def reference_loss(case, opts):
    """Loss and gradients (h, W, b) in float64 on the full vocabulary."""
    h = case["h"].double().requires_grad_()
    w = case["w"].double().requires_grad_()
    b = None if case["b"] is None else case["b"].double().requires_grad_()
    z = h @ w.t() + (b if b is not None else 0.0)
    z_t = case["th"].double() @ case["tw"].double().t()
    if case["tb"] is not None:
        z_t = z_t + case["tb"].double()
    spans = case["spans"] if opts["spans"] else None
    loss = reference.distillation_loss(
        z,
        z_t,
        case["labels"],
        alpha=opts["alpha"],
        temperature=opts["temperature"],
        divergence=opts["divergence"],
        beta=opts["beta"],
        spans=spans,
        span_weights=SPAN_WEIGHTS if spans is not None else None,
        reduction="mean",
    )
    wrt = [h, w] + ([b] if b is not None else [])
    return loss.detach(), torch.autograd.grad(loss, wrt)


def shard_loss(case, opts, start, stop, group=None, *, w=None, h=None):
    """This rank's call: rows [start, stop) of the weights and biases."""
    hk = (case["h"] if h is None else h).clone().requires_grad_()
    wk = (case["w"][start:stop] if w is None else w).clone().requires_grad_()
    bk = None if case["b"] is None else case["b"][start:stop].clone().requires_grad_()
    if opts["teacher_as"] == "logits":
        z_t = case["th"] @ case["tw"].t() + (case["tb"] if case["tb"] is not None else 0.0)
        teacher = {"teacher_logits": z_t[:, start:stop]}
    else:
        teacher = {"teacher_hidden": case["th"], "teacher_weight": case["tw"][start:stop]}
        if case["tb"] is not None:
            teacher["teacher_bias"] = case["tb"][start:stop]
    loss = kdcore.fused_linear_distillation_loss(
        hk,
        wk,
        student_bias=bk,
        labels=case["labels"],
        alpha=opts["alpha"],
        temperature=opts["temperature"],
        divergence=opts["divergence"],
        beta=opts["beta"],
        spans=case["spans"] if opts["spans"] else None,
        span_weights=SPAN_WEIGHTS if opts["spans"] else None,
        chunk_size=opts.get("chunk"),
        vocab_parallel=VocabParallel(start, stop, group),
        **teacher,
    )
    wrt = [hk, wk] + ([bk] if bk is not None else [])
    return loss.detach(), torch.autograd.grad(loss, wrt)


def check_against_reference(got, ref, dtype, start=None, stop=None):
    loss, grads = got
    ref_loss, ref_grads = ref
    tol = 1e-4 if dtype == torch.bfloat16 else 1e-5
    assert loss.double().item() == pytest.approx(ref_loss.item(), rel=tol, abs=1e-6)
    names = ("hidden", "weight", "bias")
    for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True)):
        if i > 0 and start is not None:
            r = r[start:stop]  # this rank's slice of the weight / bias gradient
        if dtype == torch.float64:
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=names[i])
        else:
            assert_grad_close(g, r, dtype, ulps=2.0, floor=1e-6)


# --- the sharded arithmetic on one process ------------------------------------------


@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    teacher_as=st.sampled_from(["logits", "linear"]),
    divergence=st.sampled_from(["kl", "reverse_kl", "jsd"]),
    beta=st.sampled_from([0.0, 0.3, 1.0]),
    alpha=st.sampled_from([0.0, 0.4]),
    spans=st.booleans(),
    bias=st.booleans(),
    teacher_bias=st.booleans(),
    chunk=st.sampled_from([None, 1, 4]),
    temperature=st.sampled_from([1.0, 2.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_sharded_arithmetic_on_one_rank_matches_float64(
    dtype,
    teacher_as,
    divergence,
    beta,
    alpha,
    spans,
    bias,
    teacher_bias,
    chunk,
    temperature,
    seed,
):
    case = make_case(seed, dtype=dtype, bias=bias, teacher_bias=teacher_bias)
    opts = dict(
        teacher_as=teacher_as,
        divergence=divergence,
        beta=beta,
        alpha=alpha,
        spans=spans,
        chunk=chunk,
        temperature=temperature,
    )
    vp_module.PLAIN_PATH_AT_SIZE_ONE = False
    try:
        got = shard_loss(case, opts, 0, case["w"].shape[0])
    finally:
        vp_module.PLAIN_PATH_AT_SIZE_ONE = True
    check_against_reference(got, reference_loss(case, opts), dtype)


def test_a_group_of_one_rank_is_the_plain_loss():
    case = make_case(1)
    opts = dict(
        teacher_as="linear", divergence="kl", beta=0.5, alpha=0.3, spans=True, temperature=2.0
    )
    loss, grads = shard_loss(case, opts, 0, 37)
    h, w, b = (case[k].clone().requires_grad_() for k in ("h", "w", "b"))
    plain = kdcore.fused_linear_distillation_loss(
        h,
        w,
        student_bias=b,
        teacher_hidden=case["th"],
        teacher_weight=case["tw"],
        labels=case["labels"],
        alpha=0.3,
        temperature=2.0,
        spans=case["spans"],
        span_weights=SPAN_WEIGHTS,
    )
    assert torch.equal(loss, plain.detach())
    for g, p in zip(grads, torch.autograd.grad(plain, (h, w, b)), strict=True):
        assert torch.equal(g, p)


def test_sharded_path_refuses_double_backward(monkeypatch):
    # Its gradients are computed in forward (constants to autograd): a
    # create_graph backward would give a silently zero second derivative.
    monkeypatch.setattr(vp_module, "PLAIN_PATH_AT_SIZE_ONE", False)
    case = make_case(2)
    h = case["h"].clone().requires_grad_()
    loss = kdcore.fused_linear_distillation_loss(
        h,
        case["w"],
        teacher_hidden=case["th"],
        teacher_weight=case["tw"],
        vocab_parallel=VocabParallel(0, 37),
    )
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(loss, h, create_graph=True)
    (first,) = torch.autograd.grad(loss, h)  # a plain backward still works
    assert torch.isfinite(first).all()


def test_bad_arguments_are_clear_errors():
    case = make_case(0, bias=False)
    opts = dict(
        teacher_as="linear", divergence="kl", beta=0.5, alpha=0.0, spans=False, temperature=1.0
    )
    with pytest.raises(ValueError, match="start must be 0"):
        shard_loss(case, opts, 1, 38, w=case["w"])
    with pytest.raises(ValueError, match="student_weight has 37 rows but VocabParallel"):
        shard_loss(case, opts, 0, 30, w=case["w"])
    with pytest.raises(ValueError, match="start < stop"):
        VocabParallel(5, 5)
    with pytest.raises(TypeError, match="must be an int"):
        VocabParallel(0.0, 5)
    with pytest.raises(ValueError, match="weight shard has 7 columns"):
        shard_loss(case, opts, 0, 37, w=torch.randn(37, 7))
    h, w = case["h"], case["w"]
    vp = VocabParallel(0, 37)
    with pytest.raises(ValueError, match="supports divergence"):
        kdcore.fused_linear_distillation_loss(
            h, w, teacher_logits=h @ w.t(), divergence="tvd", vocab_parallel=vp
        )
    with pytest.raises(ValueError, match="dense teacher"):
        ids = torch.zeros(11, 2, dtype=torch.long)
        kdcore.fused_linear_distillation_loss(
            h, w, teacher_topk=(ids, torch.full((11, 2), -1.0)), vocab_parallel=vp
        )
    with pytest.raises(ValueError, match="chunks over rows"):
        kdcore.fused_linear_distillation_loss(
            h, w, teacher_logits=h @ w.t(), chunk_over="vocab", vocab_parallel=vp
        )
    with pytest.raises(TypeError, match="kdcore.VocabParallel"):
        kdcore.fused_linear_distillation_loss(
            h, w, teacher_logits=h @ w.t(), vocab_parallel=(0, 37)
        )
    bad = case["labels"].clone()
    bad[1] = 37
    with pytest.raises(ValueError, match=r"labels must be in \[0, 37\)"):
        kdcore.fused_linear_distillation_loss(
            h, w, teacher_logits=h @ w.t(), labels=bad, vocab_parallel=vp
        )


# --- two processes ------------------------------------------------------------------------

SPLIT = [(0, 15), (15, 37)]  # uneven
CASES = [
    dict(teacher_as="linear", divergence="kl", beta=0.5, alpha=0.3, spans=True, temperature=2.0),
    dict(
        teacher_as="logits",
        divergence="reverse_kl",
        beta=0.5,
        alpha=0.0,
        spans=False,
        temperature=1.0,
        chunk=4,
    ),
    dict(teacher_as="linear", divergence="jsd", beta=0.3, alpha=0.4, spans=False, temperature=2.0),
    dict(
        teacher_as="logits",
        divergence="jsd",
        beta=0.7,
        alpha=0.0,
        spans=True,
        temperature=1.0,
        chunk=3,
    ),
]


def _expect_error(fn) -> str | None:
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return None


def _sharded_on_ranks(rank, world):
    start, stop = SPLIT[rank]
    results = []
    for i, opts in enumerate(CASES):
        case = make_case(10 + i, teacher_bias=i % 2 == 0)
        results.append(shard_loss(case, opts, start, stop))
    case, opts = make_case(0), CASES[0]
    overlap = [(0, 20), (15, 37)][rank]
    gap = [(0, 15), (16, 37)][rank]
    h_other = torch.randn(11, 7)  # rank 1's hidden states and weights are 7 wide
    errors = {
        "overlap": _expect_error(lambda: shard_loss(case, opts, *overlap)),
        "gap": _expect_error(lambda: shard_loss(case, opts, *gap)),
        "weight_hidden": _expect_error(
            lambda: shard_loss(case, opts, start, stop, w=torch.randn(stop - start, 6 + rank))
        ),
        "hidden_across_ranks": _expect_error(
            lambda: shard_loss(
                case,
                opts,
                start,
                stop,
                h=h_other if rank else None,
                w=torch.randn(stop - start, 7) if rank else None,
            )
        ),
    }
    other_labels = dict(case, labels=torch.roll(case["labels"], rank))  # rank 1's differ
    errors["labels_across_ranks"] = _expect_error(
        lambda: shard_loss(other_labels, opts, start, stop)
    )
    after = shard_loss(case, opts, start, stop)  # the group still works
    return {"results": results, "errors": errors, "after": after}


def test_two_ranks_match_the_full_vocabulary_loss(tmp_path):
    outs = values(run(_sharded_on_ranks, 2, tmp_path, timeout_s=180))
    for i, opts in enumerate(CASES):
        case = make_case(10 + i, teacher_bias=i % 2 == 0)
        ref = reference_loss(case, opts)
        for rank, out in enumerate(outs):
            check_against_reference(out["results"][i], ref, torch.float32, *SPLIT[rank])
        # Every rank the same loss and hidden-state gradient.
        assert torch.equal(outs[0]["results"][i][0], outs[1]["results"][i][0])
        assert torch.equal(outs[0]["results"][i][1][0], outs[1]["results"][i][1][0])
    ref = reference_loss(make_case(0), CASES[0])
    for rank, out in enumerate(outs):
        check_against_reference(out["after"], ref, torch.float32, *SPLIT[rank])
        errors = out["errors"]
        assert "overlap another rank's" in errors["overlap"], errors
        assert "no rank holds vocabulary rows [15, 16)" in errors["gap"], errors
        assert "weight shard has 7 columns" in errors["weight_hidden"] or rank == 0, errors
        assert "rank 1 does not fit its own shard" in errors["weight_hidden"], errors
        assert "row weights" in errors["labels_across_ranks"], errors
        assert (
            "student weight hidden sizes differ across ranks: [6, 7]"
            in (errors["hidden_across_ranks"])
        ), errors
