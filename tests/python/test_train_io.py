"""kdcore.train.io: atomic checkpoint writes (a failed save leaves the previous
checkpoint and no temporary file) and the JSONL log file (strict JSON; the records
a resumed or fresh run writes again are set aside, not lost)."""

from __future__ import annotations

import os

import pytest
import torch

from kdcore.train import JsonlLog, load_checkpoint
from train_helpers import (
    make_batch,
    one_thread,  # noqa: F401 (autouse: one thread per test)
    read_log,
    resumable,
)

# --- the log cut back when a run starts or resumes --------------------------------------


def test_a_fresh_run_sets_an_old_log_aside(tmp_path):
    d = resumable(tmp_path, 1, every=0)
    d.fit([make_batch(s) for s in range(3)], progress=False)
    old = (tmp_path / "log.jsonl").read_text()
    (tmp_path / "last.pt").unlink()
    fresh = resumable(tmp_path, 2, every=0)
    fresh.fit([make_batch(s) for s in range(2)], progress=False)
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == [1, 2]
    assert (tmp_path / "log.jsonl.discarded").read_text() == old


def test_log_cut_back_keeps_records_without_a_step(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"run": "meta"}\n{"step": 1}\n{"step": 2}\n{"step": 3, "lo')  # cut short
    JsonlLog(path, after_step=1).close()
    assert path.read_text() == '{"run": "meta"}\n{"step": 1}\n'
    assert (tmp_path / "log.jsonl.discarded").read_text() == '{"step": 2}\n{"step": 3, "lo\n'


# --- atomic checkpoint writes ---------------------------------------------------------------


def _partial_save(obj, f, *args, **kwargs):
    f.write(b"\x80garbage" * 64)
    raise OSError("disk full")


def _interrupting_save(obj, f, *args, **kwargs):
    f.write(b"\x80garbage" * 64)
    raise KeyboardInterrupt


def _failing_replace(src, dst):
    raise OSError("rename failed")


@pytest.mark.parametrize(
    ("target", "attr", "fake", "error"),
    [
        (torch, "save", _partial_save, OSError),
        (torch, "save", _interrupting_save, KeyboardInterrupt),
        (os, "replace", _failing_replace, OSError),
    ],
)
def test_a_failed_save_leaves_the_previous_checkpoint(
    tmp_path, monkeypatch, target, attr, fake, error
):
    d = resumable(tmp_path, 1, every=0)
    d.step(make_batch(0))
    path = d.save()
    assert path == tmp_path / "last.pt"
    before = path.read_bytes()
    d.step(make_batch(1))
    monkeypatch.setattr(target, attr, fake)
    with pytest.raises(error):
        d.save()
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["state"]["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.pt"], "a temporary file was left behind"
    d.save()  # and saving works again
    assert load_checkpoint(path)["state"]["step"] == 2
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


# --- the JSONL log ------------------------------------------------------------------------


def test_jsonl_log_writes_strict_json(tmp_path):
    log = JsonlLog(tmp_path / "x.jsonl")
    log.write({"a": float("nan"), "b": float("inf"), "c": torch.tensor(1.5), "d": 3})
    log.close()
    (rec,) = read_log(tmp_path / "x.jsonl")
    assert rec["a"] is None and rec["c"] == 1.5 and rec["d"] == 3
    assert rec["b"] is None or isinstance(rec["b"], str)
