"""The ops layer's contracts: both kernel backends meet ``KernelBackend``, the
backend is decided once per call (``_dispatch.route``) and the ops use only the
object they are handed, and a kernel op's eager twin and registered op agree."""

from __future__ import annotations

import dataclasses
import inspect
import pathlib
import re

import pytest
import torch

import kdcore
from kdcore import _dispatch, _rust, _triton
from kdcore._backend import KernelBackend
from kdcore.ops import _fused_linear_problem
from kdcore.ops._fused_linear_autograd import FUSED_LINEAR
from kdcore.ops.fused import DISTILL

METHODS = ("softmax", "softmax_backward", "distill", "sparse_kl", "scale_grad")


@pytest.mark.parametrize("kernels", [_rust.BACKEND, _triton.BACKEND], ids=["rust", "triton"])
def test_both_backends_meet_the_contract(kernels):
    assert isinstance(kernels, KernelBackend)
    for name in METHODS:
        want = list(inspect.signature(getattr(KernelBackend, name)).parameters)[1:]  # no self
        assert list(inspect.signature(getattr(kernels, name)).parameters) == want, name


def test_route_is_the_one_decision():
    x = torch.randn(2, 3)
    assert _dispatch.route(x) is _rust.BACKEND
    assert _dispatch.route(x, x.double()) is None
    assert _dispatch.route(torch.empty(2, 3, device="meta")) is _dispatch.REGISTERED
    with _dispatch.backend("torch"):
        assert _dispatch.route(x) is None
    seen = []

    def f(v):
        seen.append(_dispatch.route(v))
        return v.sum()

    torch.func.grad(f)(x)
    assert seen == [None]  # transforms cannot see through the kernels: the reference


class _Recording:
    """The Rust backend, noting which of its methods the ops call."""

    name = "rust"

    def __init__(self):
        self.calls = []

    def __getattr__(self, method):
        def call(*args, **kwargs):
            self.calls.append(method)
            return getattr(_rust.BACKEND, method)(*args, **kwargs)

        return call


def _kl(s):
    return kdcore.kl_loss(s, torch.randn(3, 7), temperature=2.0)


def _softmax(s):
    return (kdcore.softmax(s, 2.0) * torch.arange(7.0)).sum()


def _sparse(s):
    ids, lps = torch.tensor([[1, 4]] * 3), torch.log(torch.tensor([[0.5, 0.25]] * 3))
    return kdcore.sparse_kl_loss(s, ids, lps, temperature=2.0)


def _fused_linear(s):
    g = torch.Generator().manual_seed(1)
    w, t = torch.randn(9, 7, generator=g), torch.randn(3, 9, generator=g)
    return kdcore.fused_linear_distillation_loss(s, w, teacher_logits=t, temperature=2.0)


@pytest.mark.parametrize(
    "loss, calls",
    [
        (_kl, ["distill", "scale_grad"]),
        (_softmax, ["softmax", "softmax_backward"]),
        (_sparse, ["sparse_kl", "scale_grad"]),
        # (its backward scales (N, H) / (V, H) gradients with torch ops)
        (_fused_linear, ["distill"]),
    ],
)
def test_ops_talk_only_to_the_routed_backend(monkeypatch, loss, calls):
    recording = _Recording()
    monkeypatch.setattr(_dispatch, "route", lambda *tensors: recording)

    def second_decision(*args):
        raise AssertionError("the backend was decided a second time")

    monkeypatch.setattr(_dispatch, "kernels_for", second_decision)
    monkeypatch.setattr(_dispatch, "kernel_backend", second_decision)
    s = torch.randn(3, 7, requires_grad=True)
    (loss(s) * 3.0).backward()
    assert recording.calls == calls
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_eager_twin_and_registered_op_agree():
    g = torch.Generator().manual_seed(0)
    s0, t0 = torch.randn(5, 13, generator=g), torch.randn(5, 13, generator=g)
    weight, ce_weight = torch.rand(5, generator=g), torch.rand(5, generator=g)
    labels = torch.randint(0, 13, (5,), generator=g)
    results = []
    for route in (_rust.BACKEND, _dispatch.REGISTERED):
        s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
        loss, div_rows, ce_rows, *_ = DISTILL(
            route, s, t, weight, 2.0, "jsd", 0.3, labels, ce_weight, True, True, reduce_first=True
        )
        (loss * 0.5).backward()
        results.append((loss, div_rows, ce_rows, s.grad, t.grad))
    for eager, registered in zip(*results, strict=True):
        torch.testing.assert_close(eager, registered, rtol=0, atol=0)


@pytest.mark.parametrize("chunk_over", ["rows", "vocab"])
def test_fused_linear_twin_and_registered_op_agree(chunk_over):
    g = torch.Generator().manual_seed(3)
    h0, w0, b0 = torch.randn(6, 5, generator=g), torch.randn(11, 5, generator=g), torch.randn(11)
    problem = _fused_linear_problem.Problem(
        torch.randn(6, 11, generator=g),  # teacher logits
        None,
        None,
        None,
        None,
        None,
        torch.randint(0, 11, (6,), generator=g),
        torch.rand(6, generator=g),
        torch.rand(6, generator=g),
        2.0,
        1.0,
        "bucket",
        "reverse_kl",
        0.5,
        11,
        4,
        chunk_over,
        1.5,
        1.0,
        3.0,
        None,
    )
    results = []
    for route in (_rust.BACKEND, _dispatch.REGISTERED):
        h, w, b = (x.clone().requires_grad_() for x in (h0, w0, b0))
        fields = [getattr(problem, f.name) for f in dataclasses.fields(problem)]
        loss, *_ = FUSED_LINEAR(route, h, w, b, *fields, True, True, True)
        (loss * 0.5).backward()
        results.append((loss, h.grad, w.grad, b.grad))
    for eager, registered in zip(*results, strict=True):
        torch.testing.assert_close(eager, registered, rtol=0, atol=0)


def test_ops_do_not_reach_into_a_backend_module():
    ops = pathlib.Path(kdcore.__file__).parent / "ops"
    for path in ops.glob("*.py"):
        source = path.read_text()
        assert not re.search(r"import\s+(_triton|_rust)\b|from \.\.(_triton|_rust) import", source)


@pytest.mark.parametrize("op", ["kl", "sparse", "softmax", "fused_linear"])
def test_backward_fills_no_logit_sized_zero_gradients(op):
    """The eager twin's outputs besides the loss are not differentiated: autograd
    must not materialise a (rows, V) zero gradient for each of them (that cost
    as much as the kernel)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    rows, vocab = 16, 512
    s = torch.randn(rows, vocab, requires_grad=True)
    t = torch.randn(rows, vocab)
    if op == "kl":
        loss = kdcore.kl_loss(s, t)
    elif op == "sparse":
        ids = torch.topk(t, 8, dim=-1).indices
        loss = kdcore.sparse_kl_loss(s, ids, torch.log_softmax(t, -1).gather(-1, ids))
    elif op == "softmax":
        loss = (kdcore.softmax(s) * t).sum()
    else:  # s is the weight: no weight-sized zero gradient for the saved gradient outputs
        h = torch.randn(8, vocab, requires_grad=True)
        loss = kdcore.fused_linear_distillation_loss(h, s, teacher_logits=torch.randn(8, rows))

    class Fills(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.big = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in ("zeros", "zeros_like", "zero_", "fill_") and isinstance(out, torch.Tensor):
                if out.numel() >= rows * vocab:
                    self.big.append(name)
            return out

    with Fills() as mode:
        (grad,) = torch.autograd.grad(loss, s)
    assert grad.shape == s.shape
    assert mode.big == [], f"logit-sized fills in the backward: {mode.big}"


def _general_route(*tensors):
    """``_dispatch.route`` without its fast path for plain CPU tensors."""
    saved = _dispatch._plain_cpu
    _dispatch._plain_cpu = lambda tensors: False
    try:
        return _dispatch.route(*tensors)
    finally:
        _dispatch._plain_cpu = saved


@pytest.mark.parametrize("setting", ["auto", "rust", "torch"])
def test_routes_fast_path_gives_the_general_answer(setting):
    cases = [
        (torch.randn(2, 3), torch.randn(2, 3)),
        (torch.randn(2, 3, dtype=torch.bfloat16), torch.randn(2, 3)),
        (torch.randn(2, 3, dtype=torch.float16),),
        (torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64)),
        (torch.randn(2, 3, dtype=torch.float64),),
        (torch.empty(2, 3, device="meta"), torch.randn(2, 3)),
        (torch.randn(2, 3, requires_grad=True),),
    ]
    with _dispatch.backend(setting):
        for tensors in cases:
            assert _dispatch.route(*tensors) is _general_route(*tensors), tensors
        seen = []

        def f(v):
            seen.append((_dispatch.route(v), _general_route(v)))
            return v.sum()

        torch.func.grad(f)(torch.randn(3))
        assert seen == [(None, None)]


def test_reused_row_weights_are_never_written():
    from kdcore import _weights

    g = torch.Generator().manual_seed(5)
    s0, t = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    for temperature, reduction in [(1.0, "mean"), (2.0, "mean"), (1.0, "sum"), (1.0, "mean")]:
        s = s0.clone().requires_grad_()
        loss = kdcore.kl_loss(s, t, temperature=temperature, reduction=reduction)
        loss.backward()
        ref = (
            torch.nn.functional.kl_div(
                torch.log_softmax(s0.double() / temperature, -1),
                torch.log_softmax(t.double() / temperature, -1),
                reduction="sum",
                log_target=True,
            )
            * temperature**2
        )
        ref = ref / 4 if reduction == "mean" else ref
        assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for (rows, value, dtype), weight in _weights._UNIFORM.items():
        assert torch.equal(weight, torch.full((rows,), value, dtype=dtype))
    with torch.inference_mode():  # no inference tensor is kept for later calls
        count = len(_weights._UNIFORM)
        kdcore.kl_loss(torch.randn(13, 9), torch.randn(13, 9), temperature=3.0)
        assert len(_weights._UNIFORM) == count


def test_unreduced_total_is_not_the_row_term_output():
    """The total of a single term is that term's rows: the eager twin returns a
    copy as the loss when it does not sum it (outputs may not alias)."""
    s, t = torch.randn(3, 7, requires_grad=True), torch.randn(3, 7)
    weight = torch.ones(3)
    outputs = DISTILL(_rust.BACKEND, s, t, weight, 1.0, "kl", 0.5, None, None, True, False)
    total, div_rows = outputs[0], outputs[1]
    assert torch.equal(total, div_rows)
    assert total.untyped_storage().data_ptr() != div_rows.untyped_storage().data_ptr()
    assert total.requires_grad and not div_rows.requires_grad


def test_reused_row_weights_ignore_a_default_device_and_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kdcore import _weights

    s, t = torch.randn(6, 5), torch.randn(6, 5)
    with torch.device("meta"):  # a default device must not place the CPU weights
        loss = kdcore.kl_loss(s, t, temperature=1.7)
    assert loss.device.type == "cpu"
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(s)
        weight = _weights.masked_row_weights(
            fake, labels=None, ignore_index=-100, mask=None, reduction="mean", scale=2.3
        )
    assert weight.shape == (6,)
    assert all(type(w) is torch.Tensor for w in _weights._UNIFORM.values())
    assert all(w.device.type == "cpu" for w in _weights._UNIFORM.values())
