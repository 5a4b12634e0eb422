"""kdcore's thread pool: size, environment variable, fork safety."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import kdcore
from conftest import make_logits


def _loss_and_grad():
    s = make_logits((256, 1000), torch.float32, seed=1).requires_grad_()
    t = make_logits((256, 1000), torch.float32, seed=2)
    loss = kdcore.kl_loss(s, t, temperature=2.0)
    loss.backward()
    return loss.detach(), s.grad


def test_results_do_not_depend_on_thread_count():
    before = kdcore.get_num_threads()
    try:
        kdcore.set_num_threads(1)
        assert kdcore.get_num_threads() == 1
        one = _loss_and_grad()
        kdcore.set_num_threads(3)
        assert kdcore.get_num_threads() == 3
        three = _loss_and_grad()
    finally:
        kdcore.set_num_threads(before)
    assert torch.equal(one[0], three[0])
    assert torch.equal(one[1], three[1])


def test_environment_variable_sets_the_pool_size():
    code = "import kdcore; print(kdcore.get_num_threads())"
    env = {**os.environ, "KDCORE_NUM_THREADS": "3"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert out.stdout.strip() == "3"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_does_not_hang():
    expected = _loss_and_grad()  # the parent's pool is running
    pid = os.fork()
    if pid == 0:  # child: must be able to use the kernels, in parallel
        code = 1
        try:
            # torch's own OpenMP pool is not fork-safe (DataLoader workers set
            # this too); kdcore's pool is what this test is about.
            torch.set_num_threads(1)
            got = _loss_and_grad()
            code = 0 if torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]) else 2
        finally:
            os._exit(code)
    import time

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("kdcore call in a forked child hung")


class _KDDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        s = make_logits((64, 1000), torch.float32, seed=i)
        t = make_logits((64, 1000), torch.float32, seed=100 + i)
        return kdcore.kl_loss(s, t, temperature=2.0)


def test_dataloader_workers_can_call_kdcore():
    _loss_and_grad()  # start the pool before the workers fork
    loader = torch.utils.data.DataLoader(
        _KDDataset(), batch_size=None, num_workers=2, multiprocessing_context="fork", timeout=120
    )
    got = torch.stack(list(loader))
    expected = torch.stack([_KDDataset()[i] for i in range(4)])
    assert torch.equal(got, expected)
