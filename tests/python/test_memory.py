"""The CPU output-buffer cache: a buffer is reused only when nothing uses it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import kdcore
from conftest import make_logits
from kdcore import _memory, reference

BIG = (64, 8192)  # 2 MiB in float32: above the recycling threshold


def test_a_buffer_in_use_is_never_handed_out_again():
    kdcore.empty_cache()  # no idle buffers left from other tests
    x = torch.empty(BIG)
    a = _memory.empty_like(x)
    b = _memory.empty_like(x)
    assert a.data_ptr() != b.data_ptr()
    view = a[5:].t()  # a view (and autograd's saved tensors) keep the storage alive
    del a
    c = _memory.empty_like(x)
    assert c.data_ptr() not in (view.data_ptr() - 5 * BIG[1] * 4, b.data_ptr())
    ptr = view.data_ptr() - 5 * BIG[1] * 4
    del view
    d = _memory.empty_like(x)
    assert d.data_ptr() == ptr  # idle again: reused
    assert d.shape == x.shape and d.dtype == x.dtype and d.is_contiguous()
    assert d.data_ptr() % 64 == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_buffers_have_the_requested_dtype_and_shape(dtype):
    x = torch.empty(3, *BIG, dtype=dtype)
    out = _memory.empty_like(x)
    assert out.dtype == dtype and out.shape == x.shape
    out.fill_(1.5)
    assert bool((out == 1.5).all())


def test_gradients_kept_by_the_user_are_not_overwritten():
    """Each call's gradient stays what it was while the caller holds it: later
    calls (which may recycle idle buffers) never write into it."""
    t = make_logits(BIG, torch.float32, seed=2)
    kept = []
    for seed in range(4):
        s = make_logits(BIG, torch.float32, seed=10 + seed).requires_grad_()
        (g,) = torch.autograd.grad(kdcore.kl_loss(s, t, temperature=2.0), s)
        s64 = s.detach().double().requires_grad_()
        (g64,) = torch.autograd.grad(reference.kl_loss(s64, t.double(), temperature=2.0), s64)
        kept.append((g, g64))
        del g  # dropped ones are recycled by the next call
        if seed % 2:
            kept[-1] = (None, None)
    for g, g64 in kept:
        if g is not None:
            scale = g64.abs().max().item()
            assert (g.double() - g64).abs().max().item() <= 5e-5 * scale


def test_leaf_grad_accumulation_stays_correct():
    """AccumulateGrad may keep kdcore's buffer as ``.grad``; the second
    backward adds into it and must not be handed the same buffer."""
    t = make_logits(BIG, torch.float32, seed=3)
    s = make_logits(BIG, torch.float32, seed=4).requires_grad_()
    for _ in range(3):
        kdcore.kl_loss(s, t, temperature=1.5).backward()
    s64 = s.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(reference.kl_loss(s64, t.double(), temperature=1.5), s64)
    assert (s.grad.double() - 3 * g64).abs().max().item() <= 1.5e-4 * g64.abs().max().item()


def test_empty_cache_releases_idle_buffers_only():
    kdcore.empty_cache()
    base = _memory.cached_bytes()  # buffers other live tensors still use
    x = torch.empty(BIG)
    size = x.numel() * x.element_size() + 64  # + alignment slack
    held = _memory.empty_like(x)
    _memory.empty_like(x)  # a second buffer, idle at once
    assert _memory.cached_bytes() == base + 2 * size
    kdcore.empty_cache()
    assert _memory.cached_bytes() == base + size  # the held one stays
    del held
    kdcore.empty_cache()
    assert _memory.cached_bytes() == base


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cache_limit_from_the_environment():
    code = (
        "import torch; from kdcore import _memory as m; x = torch.empty(64, 8192); "
        "a = m.empty_like(x); print(m.cached_bytes())"
    )
    off = _run(code, KDCORE_CPU_CACHE_MB="0")
    assert off.returncode == 0, off.stderr
    assert off.stdout.strip() == "0"
    on = _run(code, KDCORE_CPU_CACHE_MB="16")
    assert on.returncode == 0, on.stderr
    assert int(on.stdout.strip()) >= 64 * 8192 * 4
    bad = _run("import kdcore", KDCORE_CPU_CACHE_MB="lots")
    assert bad.returncode != 0
    assert "KDCORE_CPU_CACHE_MB" in bad.stderr


def test_the_limit_is_respected():
    cache = _memory._BufferCache(limit_bytes=5 << 20)
    held = [cache.take(2 << 20), cache.take(2 << 20)]
    assert all(h is not None for h in held)
    assert cache.take(2 << 20) is None  # a third would pass the limit: plain allocation
    del held[0]
    assert cache.take(2 << 20) is not None  # the idle one is reused


def test_two_threads_with_recycled_buffers_match_sequential_results():
    """Threads taking buffers from the cache at once never share one."""
    import threading

    t = make_logits(BIG, torch.float32, seed=5)
    students = [make_logits(BIG, torch.float32, seed=20 + i) for i in range(8)]

    def grad(s):
        s = s.clone().requires_grad_()
        (g,) = torch.autograd.grad(kdcore.kl_loss(s, t, temperature=2.0), s)
        return g

    expected = [grad(s).clone() for s in students]
    got: dict[int, torch.Tensor] = {}

    def worker(indices):
        for _ in range(3):  # repeated calls recycle buffers while the other thread runs
            for i in indices:
                got[i] = grad(students[i])

    threads = [threading.Thread(target=worker, args=(range(k, 8, 2),)) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len({g.data_ptr() for g in got.values()}) == len(got)  # all held at once: distinct
    for i, g in got.items():
        assert torch.equal(g, expected[i]), i
