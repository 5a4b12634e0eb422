"""``kdcore bench``: kdcore vs torch eager vs torch.compile, in one process.

Every contender runs with the same thread count, is warmed up, and is timed
as the median of ``repeat`` runs; ratios are computed inside this run only.
The torch contenders compute the formula a user writes today:
``F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True) * T²``.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import kdcore

TEMPERATURE = 2.0
FULL_SHAPES = [(512, 32000), (256, 128256)]
QUICK_SHAPES = [(64, 4096)]
DTYPES = [torch.float32, torch.bfloat16]


def torch_kd_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The user's formula: forward KL at T, batchmean, times T²."""
    log_s = F.log_softmax(student.float() / TEMPERATURE, dim=-1)
    log_t = F.log_softmax(teacher.float() / TEMPERATURE, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * TEMPERATURE**2


def kdcore_kd_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return kdcore.kl_loss(student, teacher, temperature=TEMPERATURE)


def median_ms(fn: Callable[[], object], repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _fwd_bwd(loss_fn, student, teacher):
    def step():
        (grad,) = torch.autograd.grad(loss_fn(student, teacher), student)
        return grad

    return step


def _fwd(loss_fn, student, teacher):
    def step():
        with torch.no_grad():
            return loss_fn(student, teacher)

    return step


def _check(student, teacher, compiled) -> float:
    """Relative difference of kdcore's loss from the torch formula (sanity)."""
    with torch.no_grad():
        ours = kdcore_kd_loss(student, teacher).double()
        theirs = (compiled or torch_kd_loss)(student, teacher).double()
    return abs(ours - theirs).item() / max(abs(theirs).item(), 1e-30)


def _table(rows: list[dict]) -> str:
    head = (
        f"{'shape':>14} {'dtype':>8} | {'kdcore f+b':>10} {'kdcore fwd':>10} {'eager f+b':>10} "
        f"{'compile f+b':>11} | {'eager/kd':>8} {'compile/kd':>10} {'f+b/fwd':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        comp = r.get("compile_fwd_bwd_ms")
        lines.append(
            f"{r['shape']:>14} {r['dtype']:>8} | {r['kdcore_fwd_bwd_ms']:>10.2f} "
            f"{r['kdcore_fwd_ms']:>10.2f} {r['eager_fwd_bwd_ms']:>10.2f} "
            f"{comp if comp is not None else float('nan'):>11.2f} | "
            f"{r['eager_over_kdcore']:>8.1f} "
            f"{r.get('compile_over_kdcore', float('nan')):>10.2f} "
            f"{r['fwd_bwd_over_fwd']:>7.2f}"
        )
    return "\n".join(lines)


def run(
    *,
    threads: int | None = None,
    repeat: int = 7,
    quick: bool = False,
    compile: bool = True,
    json_path: str | None = None,
) -> int:
    threads = threads or kdcore.get_num_threads()
    kdcore.set_num_threads(threads)
    torch.set_num_threads(threads)
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    repeat = min(repeat, 3) if quick else repeat
    meta = {
        "threads": threads,
        "torch": torch.__version__,
        "kdcore": kdcore.__version__,
        "simd": kdcore.simd_level(),
        "cpu": platform.processor() or platform.machine(),
        "temperature": TEMPERATURE,
        "repeat": repeat,
    }
    print(
        f"kdcore bench: {threads} threads (kdcore and torch), SIMD {meta['simd']}, "
        f"torch {meta['torch']}, T={TEMPERATURE}, median of {repeat}",
        flush=True,
    )
    compiled = torch.compile(torch_kd_loss) if compile else None
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, v in shapes:
        for dtype in DTYPES:
            student = torch.randn(n, v, generator=gen).to(dtype).requires_grad_()
            teacher = torch.randn(n, v, generator=gen).to(dtype)
            row: dict = {"shape": f"{n}x{v}", "dtype": str(dtype).removeprefix("torch.")}
            row["loss_rel_diff_vs_torch"] = _check(student, teacher, None)
            row["kdcore_fwd_bwd_ms"] = median_ms(_fwd_bwd(kdcore_kd_loss, student, teacher), repeat)
            row["kdcore_fwd_ms"] = median_ms(_fwd(kdcore_kd_loss, student, teacher), repeat)
            row["eager_fwd_bwd_ms"] = median_ms(
                _fwd_bwd(torch_kd_loss, student, teacher), max(3, repeat // 2), warmup=1
            )
            if compiled is not None:
                row["compile_fwd_bwd_ms"] = median_ms(_fwd_bwd(compiled, student, teacher), repeat)
                row["compile_over_kdcore"] = row["compile_fwd_bwd_ms"] / row["kdcore_fwd_bwd_ms"]
            row["eager_over_kdcore"] = row["eager_fwd_bwd_ms"] / row["kdcore_fwd_bwd_ms"]
            row["fwd_bwd_over_fwd"] = row["kdcore_fwd_bwd_ms"] / row["kdcore_fwd_ms"]
            rows.append(row)
            print(
                f"  {row['shape']} {row['dtype']}: kdcore f+b {row['kdcore_fwd_bwd_ms']:.2f} ms, "
                f"fwd {row['kdcore_fwd_ms']:.2f} ms, eager {row['eager_fwd_bwd_ms']:.2f} ms"
                + (f", compile {row['compile_fwd_bwd_ms']:.2f} ms" if compiled else "")
                + f" (loss rel. diff vs torch {row['loss_rel_diff_vs_torch']:.1e})",
                flush=True,
            )
            del student, teacher

    small_s = torch.randn(1, 8, generator=gen).requires_grad_()
    small_t = torch.randn(1, 8, generator=gen)
    small = {
        "kdcore_1x8_fwd_bwd_us": median_ms(_fwd_bwd(kdcore_kd_loss, small_s, small_t), 201) * 1e3,
        "kdcore_1x8_fwd_us": median_ms(_fwd(kdcore_kd_loss, small_s, small_t), 201) * 1e3,
        "eager_1x8_fwd_bwd_us": median_ms(_fwd_bwd(torch_kd_loss, small_s, small_t), 201) * 1e3,
    }
    print()
    print(_table(rows))
    print(
        f"\n1x8 call: kdcore f+b {small['kdcore_1x8_fwd_bwd_us']:.1f} us, "
        f"fwd {small['kdcore_1x8_fwd_us']:.1f} us; eager f+b {small['eager_1x8_fwd_bwd_us']:.1f} us"
    )
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "rows": rows, "small": small}, f, indent=2)
        print(f"wrote {json_path}")
    return 0
