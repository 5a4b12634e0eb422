"""Inputs changed by another thread during a kernel call: the worst outcome
is a wrong value or an ordinary exception, never a crash, a BaseException, or
a process whose later calls are off. Each case runs in a fresh interpreter,
bounded in time (a crash there fails the test instead of ending the run)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

import kdcore
from conftest import make_logits

_PATH = os.pathsep.join(p for p in sys.path if p)


def _run(code: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "PYTHONPATH": _PATH},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_ids_rewritten_during_sparse_kl_never_poison_later_calls():
    result = _run(
        """
        import threading, time
        import torch
        import kdcore
        from kdcore import reference

        torch.manual_seed(0)
        rows, vocab, k = 512, 4096, 32
        s = torch.randn(rows, vocab)
        good = torch.stack([torch.randperm(vocab)[:k] for _ in range(rows)])
        bad = good.clone()
        bad[:, 0] = 10**12  # out of range: must never be used as an index
        lps = torch.log_softmax(torch.randn(rows, k), -1) - 0.05
        ids = good.clone()
        stop = threading.Event()

        def scribble():
            while not stop.is_set():
                ids.copy_(bad)  # torch releases the GIL inside copy_
                ids.copy_(good)

        th = threading.Thread(target=scribble)
        th.start()
        outcomes = {}
        end = time.monotonic() + 8
        try:
            while time.monotonic() < end:
                try:
                    kdcore.sparse_kl_loss(s, ids, lps, temperature=2.0)
                    outcomes["ok"] = outcomes.get("ok", 0) + 1
                except Exception as e:  # ValueError / RuntimeError: fine
                    outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
        finally:
            stop.set()
            th.join()
        # The process is healthy: a valid call matches the float64 reference.
        got = kdcore.sparse_kl_loss(s, good, lps, temperature=2.0)
        want = reference.sparse_kl_loss(s.double(), good, lps.double(), temperature=2.0)
        assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want)), (got, want)
        print("healthy", outcomes)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("healthy"), result.stdout


def test_share_memory_on_an_input_during_a_call_does_not_crash():
    """``share_memory_()`` (what torch.multiprocessing queues do) moves a
    storage to shared memory and frees the old pages; it must not do so
    under a running kernel."""
    result = _run(
        """
        import threading, time
        import torch
        import kdcore

        torch.set_num_threads(1)
        kdcore.set_num_threads(1)  # a kernel call longer than the copy to shared memory
        teacher = torch.randn(512, 32000)
        end = time.monotonic() + 20
        n = 0
        while time.monotonic() < end and n < 10:
            x = torch.randn(512, 32000)  # 65 MB: mmap-ed, so freed pages are unmapped
            t = threading.Thread(target=x.share_memory_)
            t.start()
            for _ in range(3):
                loss = kdcore.jsd_loss(x, teacher, temperature=2.0)
            t.join()
            assert x.is_shared()
            n += 1
        want = kdcore.reference.jsd_loss(x.double(), teacher.double(), temperature=2.0)
        torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-6)
        print("ok", n)
        """
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    assert result.stdout.startswith("ok")


def test_inputs_stay_resizable_after_a_call():
    """Borrowing an input for a call leaves its storage as it was: ``Tensor.numpy()``
    would mark it non-resizable for good."""
    s = make_logits((8, 64), torch.float32, seed=1).requires_grad_()
    t = make_logits((8, 64), torch.float32, seed=2)
    ids = torch.stack([torch.randperm(64)[:4] for _ in range(8)])
    lps = torch.log_softmax(torch.randn(8, 4), -1) - 0.1
    kdcore.kl_loss(s, t, temperature=2.0).backward()
    kdcore.sparse_kl_loss(s, ids, lps).backward()
    x = make_logits((8, 64), torch.bfloat16, seed=3)
    kdcore.softmax(x)
    for tensor in (s.detach(), t, ids, lps, x):
        tensor.resize_(2 * tensor.numel())  # fails on a non-resizable storage


def test_labels_rewritten_during_distillation_loss_never_poison_later_calls():
    result = _run(
        """
        import threading, time
        import torch
        import kdcore
        from kdcore import _rust, reference
        from kdcore._backend import DistillArgs

        torch.manual_seed(0)
        rows, vocab = 512, 4096
        s, t = torch.randn(rows, vocab), torch.randn(rows, vocab)
        good = torch.randint(0, vocab, (rows,))
        bad = torch.full((rows,), 10**12)  # out of range: must never be used as an index
        labels = good.clone()
        weight, ce_weight = torch.ones(rows), torch.ones(rows)
        stop = threading.Event()

        def scribble():
            while not stop.is_set():
                labels.copy_(bad)  # torch releases the GIL inside copy_
                labels.copy_(good)

        th = threading.Thread(target=scribble)
        th.start()
        outcomes = {}
        end = time.monotonic() + 8
        try:
            while time.monotonic() < end:
                try:  # the kernel call itself (the public op copies labels first)
                    args = DistillArgs(s, t, weight, 2.0, "kl", 0.5, labels, ce_weight, True)
                    _rust.BACKEND.distill(args)
                    outcomes["ok"] = outcomes.get("ok", 0) + 1
                except Exception as e:  # ValueError / RuntimeError: fine
                    outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
        finally:
            stop.set()
            th.join()
        got = kdcore.distillation_loss(s, t, good, temperature=2.0)
        want = reference.distillation_loss(s.double(), t.double(), good, temperature=2.0)
        assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want)), (got, want)
        print("healthy", outcomes)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("healthy"), result.stdout
