"""The output-buffer cache under conditions that used to break it: a tracer
active while kdcore is imported, and fork while another thread is inside the
cache. Each case runs in a fresh interpreter (the state at import matters,
and a hung child must not hang the test run)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

_PATH = os.pathsep.join(p for p in sys.path if p)


def _run(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "PYTHONPATH": _PATH, "KDCORE_CPU_CACHE_MB": "1024"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_tracer_at_import_does_not_let_held_outputs_be_overwritten():
    """Debuggers install a tracer that reads every frame's locals, which adds
    references to whatever those frames hold. Reuse must not depend on it."""
    result = _run(
        """
        import sys

        def tracer(frame, event, arg):
            frame.f_locals  # what debuggers do
            return tracer

        sys.settrace(tracer)
        import torch
        import kdcore
        sys.settrace(None)

        torch.manual_seed(0)
        x = torch.randn(64, 8192)  # 2 MiB outputs: the recycled path
        held = [kdcore.softmax(x * (i + 1)) for i in range(4)]
        copies = [h.clone() for h in held]
        for i in range(4):  # later calls may only reuse buffers nobody holds
            kdcore.softmax(x * (10 + i))
        for h, c in zip(held, copies):
            assert torch.equal(h, c), "a held output was overwritten"
        p = kdcore.softmax(x)
        lp = kdcore.log_softmax(p)
        assert lp.data_ptr() != p.data_ptr(), "output aliases the input"
        want = torch.log_softmax(p.double(), -1)
        torch.testing.assert_close(lp.double(), want, rtol=1e-5, atol=1e-6)
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_fork_while_another_thread_allocates_a_buffer():
    """A child forked while another thread is inside the cache (allocating a
    new buffer, which releases the GIL) can still take buffers."""
    result = _run(
        """
        import os, threading, time
        import torch
        from kdcore import _memory

        real_advise = _memory._advise_huge
        entered = threading.Event()

        def slow_advise(start, nbytes):  # madvise releases the GIL, like this sleep
            entered.set()
            time.sleep(1.0)
            real_advise(start, nbytes)

        _memory._advise_huge = slow_advise
        worker = threading.Thread(target=_memory.empty_like, args=(torch.empty(64, 8192),))
        worker.start()
        entered.wait(10)
        pid = os.fork()
        if pid == 0:
            try:
                _memory._advise_huge = real_advise
                out = _memory.empty_like(torch.empty(128, 8192))
                out.fill_(1.0)
                code = 0
            finally:
                os._exit(code)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                print("exit", os.waitstatus_to_exitcode(status))
                break
            time.sleep(0.02)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            print("child hung")
        worker.join()
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "exit 0"


def test_repeated_forks_while_a_thread_calls_kdcore_never_hang():
    """Bounded in time: forks while another thread runs kernels (the cache's
    lock and the kernels' pool lock in every state); each child must finish
    a kernel call of its own."""
    result = _run(
        """
        import os, threading, time
        import torch
        import kdcore

        torch.set_num_threads(1)
        x = torch.randn(64, 8192)
        kdcore.softmax(x, temperature=2.0)  # torch's lazy imports done before any fork
        stop = threading.Event()

        def busy():
            n = 1
            while not stop.is_set():
                kdcore.softmax(x, temperature=2.0)
                kdcore.set_num_threads(1 + n % 2)  # rebuilds the pool under its lock
                n += 1

        th = threading.Thread(target=busy)
        th.start()
        hung = forks = 0
        end = time.monotonic() + 15
        while time.monotonic() < end and forks < 40:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    y = kdcore.softmax(x, temperature=2.0)
                    code = 0 if abs(float(y.sum()) - 64) < 1e-2 else 2
                finally:
                    os._exit(code)
            forks += 1
            deadline = time.monotonic() + 30
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    assert os.waitstatus_to_exitcode(status) == 0, status
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    hung += 1
                    break
                time.sleep(0.002)
        stop.set()
        th.join()
        print(f"hung {hung} of {forks}")
        """,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("hung 0 of"), result.stdout
