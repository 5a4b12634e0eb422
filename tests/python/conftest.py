"""Shared test helpers: tolerances (docs/design.md, Tests) and input generators."""

from __future__ import annotations

import math
import os
import struct
import zlib

import pytest
import torch
from hypothesis import HealthCheck, settings

from kdcore.testing import assert_grad_close, assert_loss_close, ulp  # noqa: F401 (re-exported)

settings.register_profile(
    "kdcore",
    deadline=None,
    max_examples=int(os.environ.get("KDCORE_HYPOTHESIS_EXAMPLES", "60")),
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
    derandomize=False,
)
settings.load_profile("kdcore")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make_logits(shape, dtype, *, scale=1.0, seed=0, banned=0.0, generator=None):
    """Random logits in ``dtype``; a fraction ``banned`` of entries is -inf."""
    g = generator or torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if banned > 0:
        drop = torch.rand(shape, generator=g, dtype=torch.float64) < banned
        drop[..., 0] = False  # every row keeps a finite entry
        x = x.masked_fill(drop, -math.inf)
    return x.to(dtype)


FP32_EPS = 2.0**-23


def log_prob_floor(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    """Absolute gradient error that fp32 log-probabilities alone can cause.

    Gradients of the form P_j * (log P_j - log Q_j - D) (the teacher side of
    forward KL, the student side of reverse KL, JSD) cancel log-probabilities
    of magnitude |log p|: with logits of +-30 at T = 0.5 these reach hundreds,
    and fp32 holds each only to about FP32_EPS * |log p|.  The bound is that
    resolution weighted by the probability mass that multiplies it, per row,
    divided by T (the chain rule through z / T); the caller scales it by the
    row weights.  For ordinary logits (|log p| of a few units) it is ~1e-6.
    """
    lps = torch.log_softmax(student.detach().double() / temperature, -1)
    lpt = torch.log_softmax(teacher.detach().double() / temperature, -1)
    mass = lps.exp() + lpt.exp()
    size = (lps.abs() + lpt.abs()).nan_to_num(0.0, posinf=0.0)  # -inf entries carry no mass
    weighted = (mass * size).nan_to_num(0.0)
    per_row = weighted.amax(-1) + weighted.sum(-1)  # one entry's term plus the D term
    if per_row.numel() == 0:
        return 0.0
    return FP32_EPS * per_row.max().item() / temperature


# ---------------------------------------------------------------- backends
#
# `pytest` runs the op tests on the Rust kernels and on the reference fallback
# (the `backend` fixture). `pytest --backend triton` runs the same test files
# on the Triton kernels, with CPU tensors under the Triton interpreter, plus
# test_triton_kernels.py; test_triton.py does that in a child process, since
# TRITON_INTERPRET must be set before triton is first imported.

#: The test files that run on the Triton kernels with --backend triton.
TRITON_SUITE = (
    "test_softmax.py",
    "test_kl.py",
    "test_divergences.py",
    "test_span.py",
    "test_sparse.py",
    "test_torch_integration.py",
    "test_fused_linear.py",
    "test_fused_linear_transforms.py",
    "test_triton_kernels.py",
)
#: Tests of the suite that do not apply to the Triton kernels, and why.
NOT_ON_TRITON = {
    "test_two_threads_at_once_give_the_sequential_results": (
        "the Triton interpreter patches triton.language while a kernel runs: not thread-safe"
    ),
    "test_parallel_path_many_rows": (
        "the Rust thread pool's many-rows path; for the Triton kernels just more of the "
        "same rows (25 s of interpreter time)"
    ),
    "test_compile_fullgraph_matches_eager": (
        "inductor compiles C++ for minutes on CPU; torch.compile over the Triton path is "
        "covered by the aot_eager compile tests"
    ),
    "test_gradcheck": "float64 inputs run the reference, not the kernels",
}


def pytest_addoption(parser):
    parser.addoption(
        "--backend",
        choices=("default", "triton"),
        default="default",
        help="default: the Rust kernels and the reference fallback; triton: the Triton "
        "kernels on CPU tensors under the Triton interpreter (the test files of TRITON_SUITE)",
    )


def _on_triton(config) -> bool:
    return config.getoption("backend") == "triton"


def pytest_configure(config):
    if not _on_triton(config):
        return
    import sys

    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise pytest.UsageError("--backend triton: triton was imported before TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["KDCORE_BACKEND"] = "triton"
    # Rows longer than 256 columns span several blocks (V up to 262144 in the suite).
    os.environ.setdefault("KDCORE_TRITON_BLOCK", "256")
    # The interpreter runs a kernel ~1000x slower than a GPU: fewer examples.
    examples = int(os.environ.get("KDCORE_TRITON_HYPOTHESIS_EXAMPLES", "8"))
    settings.register_profile(
        "kdcore-triton", settings.get_profile("kdcore"), max_examples=examples
    )
    settings.load_profile("kdcore-triton")
    # The numpy interpreter warns on the float overflows the kernels rely on.
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning")
    from kdcore import _dispatch

    _dispatch.set_backend("triton")


def pytest_ignore_collect(collection_path, config):
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    if _on_triton(config):
        return collection_path.name not in TRITON_SUITE or None
    return collection_path.name == "test_triton_kernels.py" or None


def pytest_collection_modifyitems(config, items):
    if not _on_triton(config):
        return
    for item in items:
        reason = NOT_ON_TRITON.get(getattr(item, "originalname", item.name))
        if reason is None and getattr(item, "originalname", "").startswith("test_gradcheck"):
            reason = NOT_ON_TRITON["test_gradcheck"]
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"not on the Triton kernels: {reason}"))


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        names = ["triton"] if _on_triton(metafunc.config) else ["rust", "torch"]
        metafunc.parametrize("backend", names, indirect=True)


@pytest.fixture
def backend(request):
    """Runs a test on each backend of this run (rust and torch, or triton)."""
    from kdcore import _dispatch

    with _dispatch.backend(request.param):
        yield request.param


def png_info(path) -> tuple[tuple[int, int], dict[str, str]]:
    """(width, height) and the tEXt entries of a PNG; checks the signature and every CRC."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, size, text = 8, None, {}
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            text[key.decode("latin-1")] = value.decode("latin-1")
        pos += 12 + length
    assert size is not None and kind == b"IEND"
    return size, text
