"""torch.library registration: opcheck, gradcheck, torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch

import kdcore
from conftest import make_logits
from kdcore.ops.fused import distill_op
from kdcore.ops.softmax import softmax_backward_op, softmax_op


def _kl_samples():
    for s_dtype, t_dtype in [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16),
    ]:
        s = make_logits((5, 37), s_dtype, seed=1)
        t = make_logits((5, 37), t_dtype, seed=2)
        w = torch.rand(5)
        labels = torch.tensor([0, 5, 36, 2, 1])
        for div in ("kl", "reverse_kl", "tvd", "jsd"):
            yield (s.clone().requires_grad_(), t, w, 2.0, div, 0.3, None, None, True, False)
            yield (
                s.clone().requires_grad_(),
                t.clone().requires_grad_(),
                w,
                0.5,
                div,
                0.3,
                labels,
                w * 0.5,
                True,
                True,
            )
            yield (s, t, w, 1.0, div, 0.3, labels, w, False, False)


@pytest.mark.parametrize("args", list(_kl_samples()))
def test_opcheck_distill(args):
    torch.library.opcheck(distill_op, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("log", [False, True])
def test_opcheck_softmax(dtype, log):
    x = make_logits((4, 19), dtype, seed=3)
    torch.library.opcheck(softmax_op, (x.clone().requires_grad_(), 2.0, log))
    y = softmax_op(x, 2.0, log)
    torch.library.opcheck(softmax_backward_op, (torch.randn(4, 19).to(dtype), y, 2.0, log))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("masking", [None, "labels", "float"])
def test_gradcheck_kl_loss_float64(reduction, reverse, masking):
    s = make_logits((3, 6), torch.float64, seed=4).requires_grad_()
    t = make_logits((3, 6), torch.float64, seed=5).requires_grad_()
    kwargs = {}
    if masking == "labels":
        kwargs["labels"] = torch.tensor([1, -100, 2])
    elif masking == "float":
        kwargs["mask"] = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)

    def fn(a, b):
        return kdcore.kl_loss(a, b, temperature=1.7, reverse=reverse, reduction=reduction, **kwargs)

    assert torch.autograd.gradcheck(fn, (s, t))


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dim", [-1, 0])
def test_gradcheck_softmax_float64(log, dim):
    x = make_logits((3, 5), torch.float64, seed=6).requires_grad_()
    fn = kdcore.log_softmax if log else kdcore.softmax
    assert torch.autograd.gradcheck(lambda a: fn(a, temperature=0.8, dim=dim), (x,))


def _user_step(student, teacher, labels):
    # What a user's training step looks like: kdcore ops between torch ops.
    loss = kdcore.kl_loss(student, teacher, temperature=2.0, labels=labels)
    probs = kdcore.softmax(student, temperature=2.0)
    logp = kdcore.log_softmax(student * 1.5, temperature=1.0)
    return loss + 0.1 * (probs * logp).sum(-1).mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(dtype, compile_backend):
    torch._dynamo.reset()
    s = make_logits((2, 4, 50), dtype, seed=7)
    t = make_logits((2, 4, 50), dtype, seed=8)
    labels = torch.tensor([[1, 2, -100, 3], [4, -100, 5, 6]])
    compiled = torch.compile(_user_step, fullgraph=True, backend=compile_backend)
    a = s.clone().requires_grad_()
    b = s.clone().requires_grad_()
    eager = _user_step(a, t, labels)
    got = compiled(b, t, labels)
    eager.backward()
    got.backward()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got, eager, rtol=tol, atol=tol)
    assert torch.allclose(b.grad.float(), a.grad.float(), rtol=tol, atol=tol)


def test_compile_module_wrapper_no_graph_break():
    torch._dynamo.reset()
    loss_fn = kdcore.nn.KLLoss(temperature=3.0, reduction="sum")
    s = make_logits((6, 40), torch.float32, seed=9).requires_grad_()
    t = make_logits((6, 40), torch.float32, seed=10)
    compiled = torch.compile(lambda a, b: loss_fn(a, b), fullgraph=True, backend="aot_eager")
    got = compiled(s, t)
    assert torch.allclose(got, loss_fn(s, t), rtol=1e-6)
