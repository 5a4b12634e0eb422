"""Gradients handed out by kdcore's fused ops are the caller's to modify.

A backward that keeps the graph must not hand out the gradient it saved:
editing ``.grad`` (zeroing, clipping, an in-place hook) would change every
later backward through the same graph. Compared with plain torch losses,
which behave this way by construction.
"""

from __future__ import annotations

import pytest
import torch

import kdcore
from conftest import make_logits
from kdcore import reference

SHAPE = (64, 8192)  # 2 MiB: the recycled-buffer path
T = 2.0


def _losses():
    ids = torch.stack([torch.randperm(SHAPE[1])[:8] for _ in range(SHAPE[0])])
    lps = torch.log_softmax(torch.randn(SHAPE[0], 8), -1) - 0.1
    return {
        "kl": (
            lambda s, t: kdcore.kl_loss(s, t, temperature=T),
            lambda s, t: reference.kl_loss(s, t, temperature=T),
        ),
        "jsd": (
            lambda s, t: kdcore.jsd_loss(s, t, temperature=T),
            lambda s, t: reference.jsd_loss(s, t, temperature=T),
        ),
        "sparse": (
            lambda s, t: kdcore.sparse_kl_loss(s, ids, lps, temperature=T),
            lambda s, t: reference.sparse_kl_loss(s, ids, lps, temperature=T),
        ),
    }


LOSSES = _losses()


def _reference_grad(name, s, t):
    s64 = s.detach().double().requires_grad_()
    (g,) = torch.autograd.grad(LOSSES[name][1](s64, t.double()), s64)
    return g


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_three_retained_backwards_accumulate_three_gradients(name):
    s = make_logits(SHAPE, torch.float32, seed=1).requires_grad_()
    t = make_logits(SHAPE, torch.float32, seed=2)
    loss = LOSSES[name][0](s, t)
    for _ in range(3):
        loss.backward(retain_graph=True)
    g = _reference_grad(name, s, t)
    torch.testing.assert_close(s.grad.double(), 3 * g, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("edit", ["zero", "clip", "hook"])
def test_editing_grad_does_not_change_the_next_backward(name, edit):
    s = make_logits(SHAPE, torch.float32, seed=3).requires_grad_()
    t = make_logits(SHAPE, torch.float32, seed=4)
    if edit == "hook":
        s.register_hook(lambda g: g.mul_(0.5))
    loss = LOSSES[name][0](s, t)
    g = _reference_grad(name, s, t) * (0.5 if edit == "hook" else 1.0)
    for _ in range(3):
        loss.backward(retain_graph=True)
        torch.testing.assert_close(s.grad.double(), g, rtol=1e-4, atol=1e-7)
        if edit == "clip":
            torch.nn.utils.clip_grad_norm_([s], 1e-6)
        s.grad.zero_()
    loss.backward()  # the last one frees the graph
    torch.testing.assert_close(s.grad.double(), g, rtol=1e-4, atol=1e-7)


def test_autograd_grad_results_with_retain_graph_may_be_modified():
    s = make_logits(SHAPE, torch.float32, seed=5).requires_grad_()
    t = make_logits(SHAPE, torch.float32, seed=6)
    loss = kdcore.kl_loss(s, t, temperature=T)
    g = _reference_grad("kl", s, t)
    (first,) = torch.autograd.grad(loss, s, retain_graph=True)
    first.mul_(0.5)
    (second,) = torch.autograd.grad(loss, s, retain_graph=True)
    (third,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(first.double(), g * 0.5, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(second.double(), g, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(third.double(), g, rtol=1e-4, atol=1e-7)
    assert len({first.data_ptr(), second.data_ptr(), third.data_ptr()}) == 3


def test_fused_linear_retained_backwards_accumulate():
    torch.manual_seed(0)
    h = torch.randn(32, 64, requires_grad=True)
    w = torch.randn(4096, 64, requires_grad=True)
    teacher = make_logits((32, 4096), torch.float32, seed=7)
    loss = kdcore.fused_linear_distillation_loss(h, w, teacher_logits=teacher, temperature=T)
    loss.backward(retain_graph=True)
    g_h, g_w = h.grad.clone(), w.grad.clone()
    h.grad.zero_()
    w.grad.mul_(0.0)
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * g_h)
    torch.testing.assert_close(w.grad, 2 * g_w)


def test_a_graph_freeing_backward_hands_out_without_a_copy():
    """The common step (``loss.backward()``) keeps its zero-copy path: the
    gradient is the kernel's own buffer, and it is right."""
    s = make_logits(SHAPE, torch.float32, seed=8).requires_grad_()
    t = make_logits(SHAPE, torch.float32, seed=9)
    loss = kdcore.kl_loss(s, t, temperature=T)
    loss.backward()
    torch.testing.assert_close(s.grad.double(), _reference_grad("kl", s, t), rtol=1e-4, atol=1e-7)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
