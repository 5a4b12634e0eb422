"""The ``kdcore`` console command (``python -m kdcore``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_bench_quick_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdcore",
            "bench",
            "--quick",
            "--no-compile",
            "--threads",
            "1",
            "--ops",
            "kl,sparse,fused",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "kdcore f+b" in proc.stdout and "eager/kd" in proc.stdout
    assert "kd/floor" in proc.stdout and "fused/GEMMs" in proc.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["threads"] == 1
    ops = {(r["table"], r["op"], r["dtype"]) for r in data["rows"]}
    assert ("kl", "kl", "bfloat16") in ops and ("sparse", "sparse kl k=64", "float32") in ops
    (fused,) = [r for r in data["rows"] if r["table"] == "fused"]
    assert fused["shape"] == "256x128x4096"
    assert fused["fused_over_gemms"] == fused["fused_fwd_bwd_ms"] / fused["gemms_ms"] > 0
    for row in (r for r in data["rows"] if r["table"] != "fused"):
        # The floor is timed in the same run, and every ratio is against it.
        assert row["floor_ms"] > 0
        assert row["kdcore_over_floor"] == row["kdcore_fwd_bwd_ms"] / row["floor_ms"]
        assert row["kdcore_fwd_bwd_ms"] > 0 and row["eager_fwd_bwd_ms"] > 0
        # kdcore and the torch formula agree on the loss they time.
        assert row["loss_rel_diff_vs_torch"] < 1e-4, row


def test_unknown_ops_are_rejected():
    proc = subprocess.run(
        [sys.executable, "-m", "kdcore", "bench", "--ops", "gpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "--ops takes kl, family, sparse, fused; got 'gpu'" in proc.stderr


def _cli_error(capsys, argv) -> str:
    """Runs ``kdcore argv`` in-process; returns stderr of its usage error (exit status 2)."""
    from kdcore.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def no_work(monkeypatch):
    """Makes any bench or demo run that gets past argument checking fail at once."""
    import kdcore.bench
    import kdcore.demo.pipeline

    def started(*args, **kwargs):
        raise AssertionError("work started despite a bad argument")

    monkeypatch.setattr(kdcore.bench, "run", started)
    monkeypatch.setattr(kdcore.demo.pipeline, "run_demo", started)
    monkeypatch.setattr(kdcore.demo.pipeline, "retrain_teacher", started)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--quick", "--ops", "kl", "--repeat", "0"], "argument --repeat: must be >= 1; got 0"),
        (["--repeat", "-2"], "argument --repeat: must be >= 1; got -2"),
        (["--repeat", "three"], "argument --repeat: must be an integer >= 1; got 'three'"),
        (["--threads", "-1"], "argument --threads: must be >= 1; got -1"),
        (["--threads", "0"], "argument --threads: must be >= 1; got 0"),
        (["--ops", ","], "--ops takes kl, family, sparse, fused; got ','"),
        (["--json", "no-such-dir/out.json"], "argument --json: directory"),
    ],
)
def test_bench_rejects_bad_arguments_up_front(capsys, no_work, argv, message):
    assert message in _cli_error(capsys, ["bench", *argv])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--quick", "--temperature", "-1"],
            "argument --temperature: must be finite and > 0; got '-1'",
        ),
        (["--temperature", "0"], "argument --temperature: must be finite and > 0; got '0'"),
        (["--temperature", "nan"], "argument --temperature: must be finite and > 0; got 'nan'"),
        (["--temperature", "inf"], "argument --temperature: must be finite and > 0; got 'inf'"),
        (["--temperature", "2000"], "argument --temperature: must be in [1e-18, 1000]; got '2000'"),
        (["--steps", "0"], "argument --steps: must be >= 1; got 0"),
        (["--held-out", "-3"], "argument --held-out: must be >= 1; got -3"),
        (["--seeds", "0"], "argument --seeds: must be >= 1; got 0"),
        (["--threads", "0"], "argument --threads: must be >= 1; got 0"),
        (["--problems", "0"], "argument --problems: must be >= 1; got 0"),
        (["--problems", "15"], "--problems must be >= 16 (one training batch); got 15"),
        (["--seed", "-1"], "argument --seed: must be in [0, 2**64); got -1"),
        (["--seed", str(2**64 - 1), "--seeds", "2"], "--seed + --seeds - 1 must be < 2**64"),
        (["--device", "gpu"], "argument --device: takes auto, cpu, cuda or cuda:N; got 'gpu'"),
        (["--teacher", "no-such-teacher.pt"], "argument --teacher: no such file"),
        (["--train-teacher", "--steps", "5"], "--train-teacher does not take --steps"),
        (["--train-teacher", "--teacher-steps", "0"], "argument --teacher-steps: must be >= 1"),
        (["--teacher-steps", "5"], "--teacher-steps: used only with --train-teacher"),
        (["--train-teacher", "--save-teacher", "no-such-dir/t.pt"], "argument --save-teacher"),
    ],
)
def test_demo_rejects_bad_arguments_up_front(capsys, no_work, argv, message):
    assert message in _cli_error(capsys, ["demo", *argv])


def test_demo_out_must_not_be_a_file(capsys, no_work, tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    err = _cli_error(capsys, ["demo", "--out", str(path)])
    assert "argument --out:" in err and "is not a directory" in err


def test_demo_options_reach_the_config(monkeypatch, tmp_path):
    import kdcore.demo.pipeline
    from kdcore.cli import main

    seen = {}
    monkeypatch.setattr(
        kdcore.demo.pipeline, "run_demo", lambda cfg, threads: seen.update(cfg=cfg, threads=threads)
    )
    argv = [
        "demo",
        "--quick",
        "--temperature",
        "2.5",
        "--out",
        str(tmp_path),
        "--device",
        "cpu",
        "--seed",
        "3",
        "--seeds",
        "2",
        "--threads",
        "1",
    ]
    assert main(argv) == 0
    cfg = seen["cfg"]
    assert (cfg.temperature, cfg.out_dir, cfg.device, cfg.seed, cfg.seeds) == (
        2.5,
        str(tmp_path),
        "cpu",
        3,
        2,
    )
    assert (cfg.steps, cfg.held_out, cfg.student_problems) == (30, 32, 128)  # --quick sizes
    assert seen["threads"] == 1


def test_train_teacher_honours_threads(monkeypatch, tmp_path):
    import torch

    import kdcore
    import kdcore.demo.pipeline
    from kdcore.cli import main

    seen = {}

    def retrain(steps, save_to):
        seen.update(
            steps=steps,
            save_to=save_to,
            threads=(kdcore.get_num_threads(), torch.get_num_threads()),
        )

    monkeypatch.setattr(kdcore.demo.pipeline, "retrain_teacher", retrain)
    before = kdcore.get_num_threads(), torch.get_num_threads()
    target = str(tmp_path / "t.pt")
    try:
        argv = ["demo", "--train-teacher", "--threads", "1", "--save-teacher", target]
        assert main(argv) == 0
    finally:
        kdcore.set_num_threads(before[0])
        torch.set_num_threads(before[1])
    assert seen == {"steps": 2500, "save_to": target, "threads": (1, 1)}


def test_bench_run_rejects_non_positive_counts():
    from kdcore.bench import run

    with pytest.raises(ValueError, match=r"repeat must be an int >= 1; got 0"):
        run(repeat=0)
    with pytest.raises(ValueError, match=r"threads must be an int >= 1; got 0"):
        run(threads=0)


@pytest.mark.parametrize(("argv", "repeat"), [(["--repeat", "5"], 5), ([], 3)])
def test_bench_quick_honours_explicit_repeat(tmp_path, argv, repeat):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdcore",
            "bench",
            "--quick",
            "--no-compile",
            "--threads",
            "1",
            "--ops",
            "kl",
            "--json",
            str(out),
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    eager = max(3, repeat // 2)
    assert f"median of {repeat} runs ({eager} for torch eager)" in proc.stdout
    meta = json.loads(out.read_text())["meta"]
    assert (meta["repeat"], meta["eager_repeat"]) == (repeat, eager)
