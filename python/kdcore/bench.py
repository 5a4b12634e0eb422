"""``kdcore bench``: kdcore vs torch eager vs torch.compile, in one process.

Every contender runs with the same thread count, is warmed up, and is timed
as the median of ``repeat`` runs (torch eager f+b, the slowest, of
``eager_repeat(repeat)``); ratios are computed inside this run only.

Each row also times the memory floor on the same tensors,
``torch.add(student, teacher, out=preallocated)``: one pass that reads both
logit tensors and writes one tensor of their size into a buffer that is
already paged in, the least traffic a forward+backward returning the
student's gradient can move (docs/benchmarks.md). ``kd/floor`` is kdcore's
f+b over it. The ``fused`` table times the fused linear + distillation loss
against its four GEMMs alone (into preallocated outputs).
For the KL table the torch contenders compute the formula a user writes
today, ``F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True) * T²``;
for the other losses they run kdcore's own pure-PyTorch reference (float32
arithmetic), eager and compiled.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kdcore
from kdcore import reference
from kdcore._files import atomic_write

TEMPERATURE = 2.0
KL_SHAPES = [(512, 32000), (256, 128256)]
FAMILY_SHAPE = (512, 32000)
SPARSE_SHAPE, SPARSE_K = (4096, 32000), 64
DTYPES = [torch.float32, torch.bfloat16]
FUSED_SHAPE, FUSED_QUICK_SHAPE = (2048, 512, 32000), (256, 128, 4096)
OPS = ("kl", "family", "sparse", "fused")
REPEAT, QUICK_REPEAT = 7, 3


def eager_repeat(repeat: int) -> int:
    """Timed runs of torch eager f+b: fewer than the others (it is the slowest), at least 3."""
    return max(3, repeat // 2)


def torch_kd_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The user's formula: forward KL at T, batchmean, times T²."""
    log_s = F.log_softmax(student.float() / TEMPERATURE, dim=-1)
    log_t = F.log_softmax(teacher.float() / TEMPERATURE, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * TEMPERATURE**2


def interleaved_medians_ms(
    contenders: dict[str, tuple[Callable[[], object], int]], warmup: int = 2
) -> dict[str, float]:
    """Median wall time (ms) of each ``name: (fn, repeat)``, timed in rounds.

    Each round runs every contender that still needs samples once, so that
    drift in the machine's load (this benchmark runs on shared hosts) falls on
    all of them alike instead of on whichever was timed last.
    """
    for fn, _ in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(max(repeat for _, repeat in contenders.values())):
        for name, (fn, repeat) in contenders.items():
            if round_ < repeat:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


@dataclass
class Case:
    """One benchmark row: a kdcore loss and its torch counterpart on the same inputs."""

    table: str
    name: str
    shape: tuple[int, int]
    dtype: torch.dtype
    teacher: torch.Tensor
    ours: Callable[[torch.Tensor], torch.Tensor]
    theirs: Callable[[torch.Tensor], torch.Tensor]


def _fwd_bwd(loss_fn, student):
    def step():
        (grad,) = torch.autograd.grad(loss_fn(student), student)
        return grad

    return step


def _fwd(loss_fn, student):
    def step():
        with torch.no_grad():
            return loss_fn(student)

    return step


def _cases(ops, quick, gen):
    """(case, student) pairs, built lazily so that only one case's tensors live at a time."""
    n_kl = [(64, 4096)] if quick else KL_SHAPES
    fam = (64, 4096) if quick else FAMILY_SHAPE
    sparse = (256, 4096) if quick else SPARSE_SHAPE
    T = TEMPERATURE
    for dtype in DTYPES:
        if "kl" in ops:
            for shape in n_kl:
                t = torch.randn(shape, generator=gen).to(dtype)
                yield Case(
                    "kl",
                    "kl",
                    shape,
                    dtype,
                    t,
                    lambda s, t=t: kdcore.kl_loss(s, t, temperature=T),
                    lambda s, t=t: torch_kd_loss(s, t),
                )
        if "family" in ops:
            t = torch.randn(fam, generator=gen).to(dtype)
            labels = torch.randint(0, fam[1], (fam[0],), generator=gen)
            spans = torch.randint(0, 4, (fam[0],), generator=gen)
            span_w = kdcore.DEFAULT_SPAN_WEIGHTS
            # Precomputed per-row span weights for the torch version (the
            # reduction is not what is measured).
            w_tok = torch.tensor([span_w[int(i)] for i in spans])
            counts = torch.bincount(spans, minlength=4).float()
            w_row = w_tok / counts[spans] * T * T

            def torch_span(s, t=t, w_row=w_row):
                return (reference.kl_div_rows(s, t, T) * w_row).sum()

            def torch_distill(s, t=t, labels=labels):
                ce = F.cross_entropy(s.float(), labels)
                return 0.5 * ce + 0.5 * T * T * reference.kl_div_rows(s, t, T).mean()

            yield from (
                Case(
                    "family",
                    "kl",
                    fam,
                    dtype,
                    t,
                    lambda s, t=t: kdcore.kl_loss(s, t, temperature=T),
                    lambda s, t=t: reference.kl_loss(s, t, temperature=T),
                ),
                Case(
                    "family",
                    "jsd b=0.5",
                    fam,
                    dtype,
                    t,
                    lambda s, t=t: kdcore.jsd_loss(s, t, beta=0.5, temperature=T),
                    lambda s, t=t: reference.jsd_loss(s, t, beta=0.5, temperature=T),
                ),
                Case(
                    "family",
                    "tvd",
                    fam,
                    dtype,
                    t,
                    lambda s, t=t: kdcore.tvd_loss(s, t, temperature=T),
                    lambda s, t=t: reference.tvd_loss(s, t, temperature=T),
                ),
                Case(
                    "family",
                    "distill a=0.5",
                    fam,
                    dtype,
                    t,
                    lambda s, t=t, y=labels: kdcore.distillation_loss(
                        s, t, y, alpha=0.5, temperature=T
                    ),
                    torch_distill,
                ),
                Case(
                    "family",
                    "span",
                    fam,
                    dtype,
                    t,
                    lambda s, t=t, sp=spans: kdcore.span_loss(s, t, sp, temperature=T),
                    torch_span,
                ),
            )
        if "sparse" in ops:
            t = torch.randn(sparse, generator=gen).to(dtype)
            top = torch.log_softmax(t.float(), -1).topk(SPARSE_K, dim=-1)
            ids, lps = top.indices, top.values
            yield Case(
                "sparse",
                "dense kl",
                sparse,
                dtype,
                t,
                lambda s, t=t: kdcore.kl_loss(s, t, temperature=T),
                lambda s, t=t: reference.kl_loss(s, t, temperature=T),
            )

            def ours_sparse(s, ids=ids, lps=lps):
                return kdcore.sparse_kl_loss(s, ids, lps, temperature=T)

            def torch_sparse(s, ids=ids, lps=lps):
                return reference.sparse_kl_loss(s, ids, lps, temperature=T)

            name = f"sparse kl k={SPARSE_K}"
            yield Case("sparse", name, sparse, dtype, t, ours_sparse, torch_sparse)


def _measure(case: Case, repeat: int, compile: bool, gen) -> dict:
    student = torch.randn(case.shape, generator=gen).to(case.dtype).requires_grad_()
    row: dict = {
        "table": case.table,
        "op": case.name,
        "shape": f"{case.shape[0]}x{case.shape[1]}",
        "dtype": str(case.dtype).removeprefix("torch."),
    }
    with torch.no_grad():
        ours, theirs = case.ours(student).double(), case.theirs(student).double()
    row["loss_rel_diff_vs_torch"] = abs(ours - theirs).item() / max(abs(theirs).item(), 1e-30)
    floor_out = torch.empty_like(student)
    plain = student.detach()

    def floor():
        torch.add(plain, case.teacher, out=floor_out)

    contenders = {
        "floor_ms": (floor, repeat),
        "kdcore_fwd_bwd_ms": (_fwd_bwd(case.ours, student), repeat),
        "kdcore_fwd_ms": (_fwd(case.ours, student), repeat),
        # The cost of a fresh gradient-sized buffer from torch's allocator
        # (allocation and first touch of its pages): what eager and compiled
        # code pay for every large tensor; kdcore recycles its own (_memory).
        "grad_alloc_ms": (lambda: torch.empty_like(student).fill_(1.0), repeat),
        "eager_fwd_bwd_ms": (_fwd_bwd(case.theirs, student), eager_repeat(repeat)),
    }
    if compile:
        torch._dynamo.reset()
        compiled = torch.compile(case.theirs)
        contenders["compile_fwd_bwd_ms"] = (_fwd_bwd(compiled, student), repeat)
    # One warm-up call each (it compiles the torch.compile contender).
    row.update(interleaved_medians_ms(contenders, warmup=1))
    row["eager_over_kdcore"] = row["eager_fwd_bwd_ms"] / row["kdcore_fwd_bwd_ms"]
    row["kdcore_over_floor"] = row["kdcore_fwd_bwd_ms"] / row["floor_ms"]
    row["eager_over_floor"] = row["eager_fwd_bwd_ms"] / row["floor_ms"]
    row["fwd_bwd_over_fwd"] = row["kdcore_fwd_bwd_ms"] / row["kdcore_fwd_ms"]
    if compile:
        row["compile_over_kdcore"] = row["compile_fwd_bwd_ms"] / row["kdcore_fwd_bwd_ms"]
    return row


def _table(rows: list[dict]) -> str:
    head = (
        f"{'op':>16} {'shape':>11} {'dtype':>8} | {'kdcore f+b':>10} {'kdcore fwd':>10} "
        f"{'floor':>7} {'eager f+b':>10} {'compile f+b':>11} {'grad alloc':>10} | "
        f"{'kd/floor':>8} {'eager/floor':>11} {'eager/kd':>8} {'compile/kd':>10} {'f+b/fwd':>7}"
    )
    lines = [head, "-" * len(head)]
    nan = float("nan")
    for r in rows:
        lines.append(
            f"{r['op']:>16} {r['shape']:>11} {r['dtype']:>8} | {r['kdcore_fwd_bwd_ms']:>10.2f} "
            f"{r['kdcore_fwd_ms']:>10.2f} {r['floor_ms']:>7.2f} {r['eager_fwd_bwd_ms']:>10.2f} "
            f"{r.get('compile_fwd_bwd_ms', nan):>11.2f} {r['grad_alloc_ms']:>10.2f} | "
            f"{r['kdcore_over_floor']:>8.2f} {r['eager_over_floor']:>11.1f} "
            f"{r['eager_over_kdcore']:>8.1f} "
            f"{r.get('compile_over_kdcore', nan):>10.2f} {r['fwd_bwd_over_fwd']:>7.2f}"
        )
    return "\n".join(lines)


class FusedCase:
    """The fused linear + distillation loss's benchmark case (teacher as hidden
    states, labels, alpha 0.5) and its four GEMMs alone: student and teacher
    logits, then the student's hidden and weight gradients, each into a
    preallocated output (``zs``, ``zt``, ``gh``, ``gw``)."""

    def __init__(self, shape: tuple[int, int, int], gen) -> None:
        n, hidden, vocab = shape
        self.h = torch.randn(n, hidden, generator=gen).requires_grad_()
        self.w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).requires_grad_()
        self.th = torch.randn(n, hidden, generator=gen)
        self.tw = torch.randn(vocab, hidden, generator=gen) / hidden**0.5
        self.labels = torch.randint(0, vocab, (n,), generator=gen)
        self.zs, self.zt = torch.empty(n, vocab), torch.empty(n, vocab)
        self.grad_logits = torch.randn(n, vocab, generator=gen)
        self.gh, self.gw = torch.empty(n, hidden), torch.empty(vocab, hidden)

    def fused(self, chunk_size: int | None = None):
        loss = kdcore.fused_linear_distillation_loss(
            self.h,
            self.w,
            teacher_hidden=self.th,
            teacher_weight=self.tw,
            labels=self.labels,
            alpha=0.5,
            temperature=TEMPERATURE,
            chunk_size=chunk_size,
        )
        return torch.autograd.grad(loss, (self.h, self.w))

    def gemms(self) -> None:
        hd, wd = self.h.detach(), self.w.detach()
        torch.mm(hd, wd.t(), out=self.zs)
        torch.mm(self.th, self.tw.t(), out=self.zt)
        torch.mm(self.grad_logits, wd, out=self.gh)
        torch.mm(self.grad_logits.t(), hd, out=self.gw)


def _measure_fused(repeat: int, quick: bool, gen) -> dict:
    """The fused linear + distillation loss against its GEMMs alone (:class:`FusedCase`)."""
    n, hidden, vocab = FUSED_QUICK_SHAPE if quick else FUSED_SHAPE
    case = FusedCase((n, hidden, vocab), gen)
    # Fewer runs: one call is seconds at the full shape.
    runs = max(3, repeat // 2)
    times = interleaved_medians_ms(
        {"fused_fwd_bwd_ms": (case.fused, runs), "gemms_ms": (case.gemms, runs)}
    )
    return {
        "table": "fused",
        "op": "fused linear distill",
        "shape": f"{n}x{hidden}x{vocab}",
        "dtype": "float32",
        **times,
        "fused_over_gemms": times["fused_fwd_bwd_ms"] / times["gemms_ms"],
    }


def _fused_table(rows: list[dict]) -> str:
    head = (
        f"{'op':>20} {'shape':>16} {'dtype':>8} | {'fused f+b':>10} {'GEMMs alone':>11} | "
        f"{'fused/GEMMs':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['op']:>20} {r['shape']:>16} {r['dtype']:>8} | {r['fused_fwd_bwd_ms']:>10.1f} "
            f"{r['gemms_ms']:>11.1f} | {r['fused_over_gemms']:>11.2f}"
        )
    return "\n".join(lines)


def _summary(rows: list[dict]) -> list[str]:
    """Ratios the issues set targets for, computed from this run's rows."""
    out = []
    by = {(r["table"], r["op"], r["dtype"]): r for r in rows}
    for dtype in ("float32", "bfloat16"):
        kl = by.get(("family", "kl", dtype))
        for op in ("jsd b=0.5", "tvd", "distill a=0.5", "span"):
            r = by.get(("family", op, dtype))
            if kl and r:
                ratio = r["kdcore_fwd_bwd_ms"] / kl["kdcore_fwd_bwd_ms"]
                out.append(f"{op} / kl (f+b, {dtype}): {ratio:.2f}")
        dense = by.get(("sparse", "dense kl", dtype))
        sparse = by.get(("sparse", f"sparse kl k={SPARSE_K}", dtype))
        if dense and sparse:
            ratio = dense["kdcore_fwd_bwd_ms"] / sparse["kdcore_fwd_bwd_ms"]
            out.append(f"dense kl / sparse kl k={SPARSE_K} (f+b, {dtype}): {ratio:.2f}x")
    return out


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}")


def run(
    *,
    threads: int | None = None,
    repeat: int | None = None,
    quick: bool = False,
    compile: bool = True,
    json_path: str | None = None,
    ops: tuple[str, ...] = OPS,
) -> int:
    """Runs the benchmark and prints its tables; ``repeat`` defaults to 7 (3 if ``quick``)."""
    if repeat is None:
        repeat = QUICK_REPEAT if quick else REPEAT
    _check_positive("repeat", repeat)
    if threads is None:
        threads = kdcore.get_num_threads()
    _check_positive("threads", threads)
    kdcore.set_num_threads(threads)
    torch.set_num_threads(threads)
    meta = {
        "threads": threads,
        "torch": torch.__version__,
        "kdcore": kdcore.__version__,
        "simd": kdcore.simd_level(),
        "cpu": platform.processor() or platform.machine(),
        "temperature": TEMPERATURE,
        "repeat": repeat,
        "eager_repeat": eager_repeat(repeat),
    }
    print(
        f"kdcore bench: {threads} threads (kdcore and torch), SIMD {meta['simd']}, "
        f"torch {meta['torch']}, T={TEMPERATURE}, median of {repeat} runs "
        f"({meta['eager_repeat']} for torch eager), ops {', '.join(ops)}",
        flush=True,
    )
    gen = torch.Generator().manual_seed(0)
    rows = []
    for case in _cases(ops, quick, gen):
        row = _measure(case, repeat, compile, gen)
        rows.append(row)
        print(
            f"  [{row['table']}] {row['op']} {row['shape']} {row['dtype']}: kdcore f+b "
            f"{row['kdcore_fwd_bwd_ms']:.2f} ms, fwd {row['kdcore_fwd_ms']:.2f} ms, eager "
            f"{row['eager_fwd_bwd_ms']:.2f} ms"
            + (f", compile {row['compile_fwd_bwd_ms']:.2f} ms" if compile else "")
            + f" (loss rel. diff vs torch {row['loss_rel_diff_vs_torch']:.1e})",
            flush=True,
        )
    if "fused" in ops:
        row = _measure_fused(repeat, quick, gen)
        rows.append(row)
        print(
            f"  [fused] {row['op']} {row['shape']}: fused f+b {row['fused_fwd_bwd_ms']:.1f} ms, "
            f"GEMMs alone {row['gemms_ms']:.1f} ms",
            flush=True,
        )

    small_s = torch.randn(1, 8, generator=gen).requires_grad_()
    small_t = torch.randn(1, 8, generator=gen)

    def small_kd(s):
        return kdcore.kl_loss(s, small_t, temperature=TEMPERATURE)

    def small_torch(s):
        return torch_kd_loss(s, small_t)

    # Interleaved (a call is microseconds: drift would decide a separate median).
    small_ms = interleaved_medians_ms(
        {
            "kdcore_1x8_fwd_bwd_us": (_fwd_bwd(small_kd, small_s), 401),
            "kdcore_1x8_fwd_us": (_fwd(small_kd, small_s), 401),
            "eager_1x8_fwd_bwd_us": (_fwd_bwd(small_torch, small_s), 401),
        },
        warmup=50,
    )
    small = {name: ms * 1e3 for name, ms in small_ms.items()}
    print()
    for table in ops:
        picked = [r for r in rows if r["table"] == table]
        if picked:
            print(f"[{table}]")
            print(_fused_table(picked) if table == "fused" else _table(picked))
            print()
    for line in _summary(rows):
        print(line)
    print(
        f"1x8 call: kdcore f+b {small['kdcore_1x8_fwd_bwd_us']:.1f} us, "
        f"fwd {small['kdcore_1x8_fwd_us']:.1f} us; "
        f"eager f+b {small['eager_1x8_fwd_bwd_us']:.1f} us "
        f"(kdcore/eager f+b {small['kdcore_1x8_fwd_bwd_us'] / small['eager_1x8_fwd_bwd_us']:.2f})"
    )
    if json_path:
        text = json.dumps({"meta": meta, "rows": rows, "small": small}, indent=2)
        atomic_write(json_path, lambda f: f.write(text.encode("utf-8")))
        print(f"wrote {json_path}")
    return 0
