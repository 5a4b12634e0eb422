"""Bad input gets a clear exception naming the argument and what was seen."""

from __future__ import annotations

import math

import pytest
import torch

import kdcore

S = torch.randn(2, 3, 5)
T = torch.randn(2, 3, 5)


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (
            {"teacher_logits": torch.randn(2, 3, 6)},
            ValueError,
            r"same shape.*\(2, 3, 5\).*\(2, 3, 6\)",
        ),
        ({"teacher_logits": torch.randn(6, 5)}, ValueError, r"same shape"),
        (
            {"student_logits": torch.randn(2, 0), "teacher_logits": torch.randn(2, 0)},
            ValueError,
            r"empty vocabulary.*\(2, 0\)",
        ),
        (
            {"student_logits": torch.randint(0, 5, (2, 3, 5))},
            TypeError,
            r"student_logits.*torch.int64",
        ),
        (
            {"teacher_logits": torch.ones(2, 3, 5, dtype=torch.int32)},
            TypeError,
            r"teacher_logits.*int32",
        ),
        (
            {"student_logits": torch.tensor(1.0), "teacher_logits": torch.tensor(1.0)},
            ValueError,
            r"0-d",
        ),
        (
            {"student_logits": [[1.0, 2.0]]},
            TypeError,
            r"student_logits must be a torch.Tensor, got list",
        ),
        ({"temperature": 0.0}, ValueError, r"temperature must be finite and > 0, got 0.0"),
        ({"temperature": -1.0}, ValueError, r"temperature.*-1.0"),
        ({"temperature": math.nan}, ValueError, r"temperature.*nan"),
        ({"temperature": math.inf}, ValueError, r"temperature.*inf"),
        ({"temperature": "2"}, TypeError, r"temperature must be a float, got str"),
        ({"temperature": 1e4}, ValueError, r"temperature must be in \[1e-18, 1000\], got 10000"),
        ({"temperature": 1e-50}, ValueError, r"temperature must be in .*got 1e-50"),
        (
            {"reduction": "avg"},
            ValueError,
            r"reduction must be one of mean, sum, none, batchmean; got 'avg'",
        ),
        (
            {"labels": torch.zeros(2, 3)},
            TypeError,
            r"labels must be an integer tensor, got torch.float32",
        ),
        (
            {"labels": torch.zeros(2, 4, dtype=torch.long)},
            ValueError,
            r"labels.*\(2, 3\).*\(2, 4\)",
        ),
        ({"mask": torch.ones(3, 2, dtype=torch.bool)}, ValueError, r"mask.*\(2, 3\).*\(3, 2\)"),
        (
            {"mask": torch.ones(2, 3, dtype=torch.long)},
            TypeError,
            r"mask must be bool or floating.*int64",
        ),
        (  # weights summing to 0: a mean would divide by 0
            {"mask": torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]])},
            ValueError,
            r"float mask holds per-token weights >= 0",
        ),
        (
            {"mask": torch.tensor([[1.0, math.nan, 0.0], [0.0, 0.0, 0.0]])},
            ValueError,
            r"float mask holds per-token weights >= 0",
        ),
        (
            {"teacher_logits": torch.randn(2, 3, 5, device="meta")},
            ValueError,
            r"teacher_logits is on meta",
        ),
        (
            {"labels": torch.zeros(2, 3, dtype=torch.long, device="meta")},
            ValueError,
            r"labels is on meta",
        ),
    ],
)
@pytest.mark.parametrize("backend_name", ["rust", "torch"])
def test_kl_loss_rejects(kwargs, exc, pattern, backend_name):
    from kdcore import _dispatch

    args = {"student_logits": S, "teacher_logits": T, **kwargs}
    s, t = args.pop("student_logits"), args.pop("teacher_logits")
    with _dispatch.backend(backend_name), pytest.raises(exc, match=pattern):
        kdcore.kl_loss(s, t, **args)


@pytest.mark.parametrize(
    "x, kwargs, exc, pattern",
    [
        (torch.randn(3, 0), {}, ValueError, r"empty vocabulary"),
        (torch.arange(6).reshape(2, 3), {}, TypeError, r"x must be float32.*int64"),
        (torch.randn(2, 3), {"temperature": 0}, ValueError, r"temperature"),
        (torch.randn(2, 3), {"dim": 2}, ValueError, r"dim must be an int in \[-2, 1\], got 2"),
        (torch.randn(2, 3), {"dim": "x"}, ValueError, r"dim must be an int"),
    ],
)
@pytest.mark.parametrize("fn", [kdcore.softmax, kdcore.log_softmax])
def test_softmax_rejects(fn, x, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn(x, **kwargs)


def test_set_num_threads_rejects_bad_values():
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        kdcore.set_num_threads(0)
    with pytest.raises(TypeError, match="n must be an int, got float"):
        kdcore.set_num_threads(2.0)


def test_kernel_op_refuses_unsupported_tensors_clearly():
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"kdcore::softmax runs on CPU tensors.*float64"):
        torch.ops.kdcore.softmax(x, 1.0, False)


def test_unknown_backend_name_is_rejected():
    from kdcore import _dispatch

    with pytest.raises(
        ValueError, match=r"KDCORE_BACKEND must be one of auto, rust, triton, torch; got 'cuda'"
    ):
        _dispatch.set_backend("cuda")


def test_native_rejects_mismatched_arrays():
    from kdcore import _native

    x = torch.randn(2, 3).numpy()
    out = torch.empty(3, 2).numpy()
    with pytest.raises(ValueError, match=r"x and out must have the same shape"):
        _native.softmax(x, out, "float32", 1.0, False)
    with pytest.raises(TypeError, match=r"dtype must be float32, bfloat16 or float16, got float64"):
        _native.softmax(x, x.copy(), "float64", 1.0, False)
    with pytest.raises(ValueError, match=r"temperature: must be finite and > 0"):
        _native.softmax(x, x.copy(), "float32", 0.0, False)


def test_native_checks_dlpack_capsules():
    """The binding takes DLPack capsules (how kdcore hands tensors over): it computes
    through them, and refuses outputs that share memory with another argument,
    element types other than the named dtype, non-contiguous or wrong-rank tensors,
    and capsules already consumed."""
    from torch.utils.dlpack import to_dlpack

    from kdcore import _native

    x, out = torch.randn(2, 3), torch.empty(2, 3)
    _native.softmax(to_dlpack(x), to_dlpack(out), "float32", 1.0, False)
    torch.testing.assert_close(out, torch.softmax(x.double(), -1).float())
    with pytest.raises(ValueError, match=r"x and out share memory"):
        _native.softmax(to_dlpack(x), to_dlpack(x), "float32", 1.0, False)
    rows = torch.randn(3, 3)
    with pytest.raises(ValueError, match=r"x and out share memory"):
        _native.softmax(to_dlpack(rows[:2]), to_dlpack(rows[1:]), "float32", 1.0, False)
    with pytest.raises(TypeError, match=r"x: expected bfloat16 elements"):
        _native.softmax(to_dlpack(x), to_dlpack(out), "bfloat16", 1.0, False)
    with pytest.raises(ValueError, match=r"x: tensor must be C-contiguous"):
        _native.softmax(to_dlpack(x.t()), to_dlpack(out.t().contiguous()), "float32", 1.0, False)
    with pytest.raises(ValueError, match=r"x: expected a 2-D tensor, got 1 dimensions"):
        _native.softmax(to_dlpack(x.reshape(-1)), to_dlpack(out), "float32", 1.0, False)
    used = to_dlpack(x)
    torch.from_dlpack(used)  # consumes it
    with pytest.raises(TypeError, match=r"x: expected an unused \"dltensor\" capsule"):
        _native.softmax(used, to_dlpack(out), "float32", 1.0, False)

    s, t = torch.randn(2, 5), torch.randn(2, 5)
    weight, loss = torch.ones(2), torch.empty(2).numpy()
    args = (to_dlpack(s), "float32", to_dlpack(t), "float32", "kl", 0.5, 1.0)
    with pytest.raises(ValueError, match=r"teacher and grad_student share memory"):
        _native.distill(*args, to_dlpack(weight), loss, grad_student=to_dlpack(t))
    grad = torch.empty(2, 5)
    _native.distill(*args, to_dlpack(weight), loss, grad_student=to_dlpack(grad))
    ref_s, ref_t = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    ref = (ref_t.exp() * (ref_t - ref_s)).sum(-1)
    torch.testing.assert_close(torch.from_numpy(loss).double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_s.exp() - ref_t.exp(), rtol=1e-5, atol=1e-6)
