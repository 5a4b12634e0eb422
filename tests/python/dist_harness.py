"""Runs a function on N local processes joined by a gloo process group
(127.0.0.1, a free port picked now), bounded in time: the processes are
killed when they overrun, and each rank's result comes back through a file."""

from __future__ import annotations

import datetime
import json
import os
import pickle
import socket
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

#: The process group's own timeout (DDP's and FSDP's collectives).
GROUP_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, port: int, out: str, args: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    import kdcore

    kdcore.set_num_threads(1)
    result: dict = {}
    try:
        torch.distributed.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
        )
        result = {"ok": True, "value": fn(rank, world, *args)}
    except BaseException as exc:  # reported to the test, not lost in a child's stderr
        result = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "trace": traceback.format_exc(),
        }
    with open(out, "wb") as f:
        pickle.dump(result, f)
    if torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:
            pass


def run(fn, world: int, tmp: Path, *args, timeout_s: float = 120.0) -> list[dict]:
    """``fn(rank, world, *args)`` on ``world`` processes; every rank's
    ``{"ok", "value" | "error", "exitcode"}``. ``fn`` must be importable
    (module level); processes still alive after ``timeout_s`` are killed."""
    ctx = mp.get_context("spawn")
    port = free_port()
    outs = [str(tmp / f"rank{r}.pkl") for r in range(world)]
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world, port, outs[r], args), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    for p in procs:
        p.join(max(0.0, (deadline - datetime.datetime.now()).total_seconds()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    if hung:
        raise AssertionError(f"ranks {hung} still ran after {timeout_s} s: a hang")
    results = []
    for r, p in enumerate(procs):
        path = Path(outs[r])
        res = pickle.loads(path.read_bytes()) if path.exists() else {"ok": False, "error": None}
        res["exitcode"] = p.exitcode
        results.append(res)
    return results


def values(results: list[dict]) -> list:
    """Every rank's value; a failing rank fails the test with its traceback."""
    bad = [r for r in results if not r["ok"]]
    assert not bad, json.dumps(bad, indent=1, default=str)
    return [r["value"] for r in results]
