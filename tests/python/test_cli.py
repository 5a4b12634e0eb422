"""The ``kdcore`` console command (``python -m kdcore``)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_quick_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "kdcore", "bench", "--quick", "--no-compile", "--threads", "1",
         "--ops", "kl,sparse", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "kdcore f+b" in proc.stdout and "eager/kd" in proc.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["threads"] == 1
    ops = {(r["table"], r["op"], r["dtype"]) for r in data["rows"]}
    assert ("kl", "kl", "bfloat16") in ops and ("sparse", "sparse kl k=64", "float32") in ops
    for row in data["rows"]:
        assert row["kdcore_fwd_bwd_ms"] > 0 and row["eager_fwd_bwd_ms"] > 0
        # kdcore and the torch formula agree on the loss they time.
        assert row["loss_rel_diff_vs_torch"] < 1e-4, row


def test_unknown_ops_are_rejected():
    proc = subprocess.run(
        [sys.executable, "-m", "kdcore", "bench", "--ops", "gpu"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "--ops takes kl, family, sparse; got 'gpu'" in proc.stderr
