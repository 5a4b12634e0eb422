"""kdcore.train.objective: what a Distiller minimises, beyond the dense losses
that test_train_distiller.py steps through: alpha = 1 (hard labels only), a stored
top-k teacher (bucket-tail sparse KL computed independently in float64, per-span
components, the full vocabulary equal to the teacher model) and a span loss
without spans."""

from __future__ import annotations

import copy

import pytest

from kdcore import Span
from kdcore.train import Distiller
from train_helpers import (
    SPAN_WEIGHTS,
    T,
    TinyLM,
    V,
    assert_params_close,
    dense_loss,
    hand_train,
    lambda_lr,
    make_batch,
    one_thread,  # noqa: F401 (autouse: one thread per test)
    read_log,
    sgd,
    sparse_loss,
    with_top_k,
)

# --- independent float64 sparse KL (a stored top-k teacher) ---------------------------


# --- alpha = 1: hard labels only ----------------------------------------------------------


def test_alpha_one_trains_on_hard_labels_only():
    # alpha = 1 is inside [0, 1]: the loss is the cross-entropy (no divergence term).
    student, teacher = TinyLM(1), TinyLM(2)
    hand = copy.deepcopy(student)
    batches = [make_batch(s) for s in range(2)]
    opt = sgd(student)
    d = Distiller(
        student, teacher, opt, loss="token", alpha=1.0, temperature=T, scheduler=lambda_lr(opt)
    )
    for b in batches:
        d.step(b)
    hand_train(hand, batches, dense_loss(None, "sft", 1.0))
    assert_params_close(student, hand)


# --- offline (top-k) teacher -------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "alpha", "t0"), [("span", 0.0, 1.0), ("token", 0.3, 1.0), ("span", 0.0, 1.5)]
)
def test_offline_top_k_teacher_matches_float64_bucket_kl(mode, alpha, t0):
    student, teacher = TinyLM(1), TinyLM(2)
    hand = copy.deepcopy(student)
    batches = [with_top_k(make_batch(s), teacher, k=6, teacher_temperature=t0) for s in range(3)]
    opt = sgd(student)
    d = Distiller(
        student,
        None,
        opt,
        loss=mode,
        alpha=alpha,
        temperature=T,
        teacher_temperature=t0,
        span_weights=SPAN_WEIGHTS,
        tail="bucket",
        scheduler=lambda_lr(opt),
    )
    records = [d.step(b) for b in batches]
    log = hand_train(hand, batches, sparse_loss(mode, alpha, teacher_temperature=t0))
    for rec, expected in zip(records, log["loss"], strict=True):
        assert rec["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert_params_close(student, hand)
    # The tail bucket matters: the same batch under tail="zero" gives another loss.
    losses = []
    for tail in ("zero", "bucket"):
        m = copy.deepcopy(hand)
        other = Distiller(
            m,
            None,
            sgd(m),
            loss=mode,
            alpha=alpha,
            temperature=T,
            teacher_temperature=t0,
            tail=tail,
            span_weights=SPAN_WEIGHTS,
        )
        losses.append(other.compute_loss(batches[0])[0].item())
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)


def test_offline_span_log_has_per_span_components(tmp_path):
    # The JSONL log of a loss="span" run carries the per-span divergences; a stored
    # top-k teacher is the same loss with another divergence, so its log should too.
    student, teacher = TinyLM(1), TinyLM(2)
    hand = copy.deepcopy(student)
    batches = [with_top_k(make_batch(s), teacher, k=6) for s in range(2)]
    opt = sgd(student)
    d = Distiller(
        student,
        None,
        opt,
        loss="span",
        temperature=T,
        span_weights=SPAN_WEIGHTS,
        scheduler=lambda_lr(opt),
        log_path=tmp_path / "log.jsonl",
    )
    d.fit(batches, progress=False)
    log = hand_train(hand, batches, sparse_loss("span", 0.0))
    records = read_log(tmp_path / "log.jsonl")
    assert len(records) == 2
    for rec, comps in zip(records, log["comps"], strict=True):
        assert rec.get("span_reason") == pytest.approx(comps[Span.REASON], rel=1e-5, abs=1e-6)
        assert rec.get("span_act") == pytest.approx(comps[Span.ACT], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    ("mode", "alpha", "tail"),
    [
        ("token", 0.0, "bucket"),
        ("token", 0.0, "zero"),
        ("token", 0.0, "renormalize"),
        ("token", 0.3, "bucket"),
        ("span", 0.0, "zero"),
        ("span", 0.3, "bucket"),
    ],
)
def test_offline_full_vocabulary_teacher_equals_the_teacher_model(mode, alpha, tail):
    # k = V: the stored distribution is the whole teacher softmax, so every tail
    # rule gives the dense KL at T (re-tempering from T0 = 1 to T is exact), and the
    # step must be the one a live teacher gives.
    student, teacher = TinyLM(1), TinyLM(2)
    online_s = copy.deepcopy(student)
    batches = [make_batch(s) for s in range(3)]
    opt = sgd(student)
    d = Distiller(
        student,
        None,
        opt,
        loss=mode,
        alpha=alpha,
        temperature=T,
        tail=tail,
        span_weights=SPAN_WEIGHTS,
        scheduler=lambda_lr(opt),
    )
    opt_on = sgd(online_s)
    online = Distiller(
        online_s,
        teacher,
        opt_on,
        loss=mode,
        alpha=alpha,
        temperature=T,
        span_weights=SPAN_WEIGHTS,
        scheduler=lambda_lr(opt_on),
    )
    for b in batches:
        off = d.step(with_top_k(b, teacher, k=V))
        on = online.step(b)
        assert off["loss"] == pytest.approx(on["loss"], rel=1e-5, abs=1e-6)
    assert_params_close(student, online_s)


# --- errors ----------------------------------------------------------------------------


def test_span_loss_without_spans_says_what_is_missing():
    # A bare KeyError('spans') does not say which loss needs them or what they are.
    s = TinyLM(1)
    d = Distiller(s, TinyLM(2), sgd(s), loss="span")
    b = {k: v for k, v in make_batch(0).items() if k != "spans"}
    with pytest.raises(KeyError, match=r"loss='span' needs batch\['spans'\]"):
        d.step(b)
