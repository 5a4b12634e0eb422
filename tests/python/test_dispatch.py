"""Backend choice: no silent fallback to the reference where a kernel should run."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from kdcore import _dispatch


def fake(device: str, dtype=torch.float32):
    """What select() reads of a tensor: CUDA tensors cannot be made without a GPU."""
    return types.SimpleNamespace(device=torch.device(device), dtype=dtype)


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(_dispatch, "_warned", set())
    monkeypatch.setattr(_dispatch, "_forced", "auto")


def test_cuda_without_triton_warns_once_naming_cause_and_fix(fresh_warnings, monkeypatch):
    monkeypatch.setattr(_dispatch, "triton_available", lambda: False)
    with pytest.warns(_dispatch.FallbackWarning) as record:
        assert _dispatch.select(fake("cuda"), fake("cuda")) == "torch"
    (warning,) = record
    assert warning.filename == __file__, "the warning points at the caller's line, not kdcore's"
    message = str(warning.message)
    assert "triton is not installed" in message and "pip install triton" in message
    assert "reference" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.select(fake("cuda")) == "torch"  # once per process


def test_forced_rust_backend_with_cuda_tensors_warns(fresh_warnings, monkeypatch):
    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(_dispatch, "_forced", "rust")
    with pytest.warns(_dispatch.FallbackWarning, match="KDCORE_BACKEND=rust"):
        assert _dispatch.select(fake("cuda")) == "torch"


@pytest.mark.parametrize(
    "tensors, forced, expected",
    [
        ((fake("cpu"),), "auto", "rust"),
        ((fake("cpu", torch.float64),), "auto", "torch"),  # float64 is the reference's dtype
        ((fake("cuda", torch.float64),), "auto", "torch"),
        ((fake("cuda"),), "torch", "torch"),  # asked for
        ((fake("cuda"),), "auto", "triton"),
        ((fake("mps"),), "auto", "torch"),  # no kernel for that device by design
    ],
)
def test_intended_choices_do_not_warn(fresh_warnings, monkeypatch, tensors, forced, expected):
    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(_dispatch, "_forced", forced)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.select(*tensors) == expected
