"""One-command GPU check of kdcore's Triton kernels: correctness, then speed and memory.

    python benches/gpu_check.py [--out gpu_check.json] [--quick] [--no-compile]

Needs a CUDA GPU, torch and triton (and the installed kdcore wheel); uses
Liger-Kernel only if it is importable. No network, no other packages.
About 2-3 minutes on one H100 / H200 (most of it Triton and torch.compile
compilation).

1. Correctness on fresh random CUDA inputs (a new seed every run, printed)
   against kdcore's float64 reference, with the tolerances of the test suite
   (kdcore.testing): every op, fp32 and bf16, -inf entries, logits of ±3e4,
   log-probabilities far below -104, rows spanning many column blocks,
   V = 262144, rows × V beyond 2^31 (int64 offsets), non-unit grad_output and
   a second backward, torch.compile(fullgraph=True) on CUDA tensors.
2. Forward + backward time (triton.testing.do_bench, median) and peak extra
   memory (torch.cuda.max_memory_allocated above the inputs) of the
   temperature KL loss at T = 2, bf16, 8192 x 128256 and 16384 x 32000:
   kdcore vs torch eager (fp32 upcast, F.log_softmax + F.kl_div) vs
   torch.compile of it (vs Liger-Kernel's KLDiv when importable), against the
   copy floor (read student, read teacher, write gradient at the device-copy
   bandwidth measured in this run); then JSD, distillation_loss and span_loss
   relative to KL at 8192 x 128256; the fused linear loss, plain and with
   kdcore.VocabParallel on a one-rank NCCL group; the fused linear loss
   against TRL's chunked divergence and Liger's fused linear JSD (each when
   importable; benches/trl_compare.py) with loss and gradient differences.

Prints a table and writes JSON. Exits 1 if a correctness check failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

# The test suite's tolerances, defined once in kdcore.testing.
from kdcore.testing import grad_error, loss_error

T = 2.0
STARTED = time.monotonic()
#: "cpu" only to smoke-test this script under the Triton interpreter
#: (TRITON_INTERPRET=1 KDCORE_BACKEND=triton KDCORE_GPU_CHECK_DEVICE=cpu): checks only.
DEV = os.environ.get("KDCORE_GPU_CHECK_DEVICE", "cuda")


def log(*args) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s]", *args, flush=True)


def free() -> None:
    gc.collect()
    if DEV == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ------------------------------------------------------------ correctness

CHECKS: list[dict] = []


class Skip(Exception):
    """A check that cannot run here (reported, not failed)."""


def check(name: str, fn, *args, **kwargs) -> None:
    t0 = time.monotonic()
    try:
        problems = [p for p in fn(*args, **kwargs) if p]
    except Skip as why:
        CHECKS.append({"check": name, "ok": True, "skipped": str(why)})
        log(f"SKIP {name}: {why}")
        return
    except Exception as exc:  # a crash is a failure, and must not hide the other checks
        traceback.print_exc()
        problems = [f"raised {exc!r}"[:400]]
    ok = not problems
    CHECKS.append(
        {"check": name, "ok": ok, "problems": problems, "s": round(time.monotonic() - t0, 2)}
    )
    log(("PASS " if ok else "FAIL ") + name + ("" if ok else ": " + "; ".join(problems)))


def logits(shape, dtype, gen, scale=2.0, banned=0.0):
    x = torch.randn(shape, generator=gen, device=DEV, dtype=torch.float64) * scale
    if banned:
        drop = torch.rand(shape, generator=gen, device=DEV, dtype=torch.float64) < banned
        drop[..., 0] = False
        x = x.masked_fill(drop, -math.inf)
    return x.to(dtype)


def compare(
    op, s, t, dtypes, *extra, teacher_grad=True, grad_out=None, floor=2e-6, ulps=1.0, **kwargs
):
    """kdcore.<op> against reference.<op> (float64) on (s, t, *extra, **kwargs).

    ``t=None``: the op takes no teacher logits (sparse_kl_loss). Returns problems.
    """
    import kdcore
    from kdcore import reference

    def wide(x):
        return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    s_k, s64 = s.clone().requires_grad_(), s.double().requires_grad_()
    wrt_k, wrt_r, args_k, args_r = [s_k], [s64], [s_k], [s64]
    if t is not None:
        t_k, t64 = t.clone().requires_grad_(teacher_grad), t.double().requires_grad_(teacher_grad)
        args_k.append(t_k)
        args_r.append(t64)
        if teacher_grad:
            wrt_k.append(t_k)
            wrt_r.append(t64)
    loss = getattr(kdcore, op)(*args_k, *extra, **kwargs)
    ref = getattr(reference, op)(*args_r, *map(wide, extra), **kwargs)
    problems = [loss_error(loss, ref, dtypes)]
    go_k = None if grad_out is None else grad_out.float()
    go_r = None if grad_out is None else grad_out.double()
    grads = torch.autograd.grad(loss, wrt_k, go_k)
    if ref.requires_grad:
        ref_grads = torch.autograd.grad(ref, wrt_r, go_r)
    else:
        ref_grads = [torch.zeros_like(x) for x in wrt_r]
    for got, exp, dtype in zip(grads, ref_grads, dtypes, strict=False):
        problems.append(grad_error(got, exp, dtype, ulps, floor))
    return problems


def softmax_case(x, log_, gen):
    """kdcore.(log_)softmax values and backward (from the output, as torch's)."""
    import kdcore
    from kdcore import reference

    dtype = x.dtype
    xk = x.clone().requires_grad_()
    y = (kdcore.log_softmax if log_ else kdcore.softmax)(xk, T)
    r = (reference.log_softmax if log_ else reference.softmax)(x.double(), T)
    finite = torch.isfinite(r)
    tol = 1e-5 if dtype == torch.float32 else 2.0**-7
    excess = ((y.double() - r)[finite].abs() - tol * r[finite].abs() - 1e-6).max().item()
    same_inf = torch.equal(torch.isinf(y), torch.isinf(r))
    g = torch.randn(x.shape, generator=gen, device=DEV).to(dtype)
    (dx,) = torch.autograd.grad(y, xk, g)
    yr, gy = y.detach().double(), g.double()
    if log_:
        exact = gy - yr.exp() * gy.sum(-1, keepdim=True)
    else:
        exact = yr * (gy - (gy * yr).sum(-1, keepdim=True))
    return [
        None if excess <= 0 else f"value error {excess:.3e} beyond tolerance",
        None if same_inf else "inf pattern differs",
        grad_error(dx, exact / T, dtype, floor=1e-6 / T),
    ]


def far_below_104(s, t):
    """JSD where most log-probabilities are far below -104: finite and exact."""
    import kdcore
    from kdcore import reference

    x = s.clone().requires_grad_()
    loss = kdcore.jsd_loss(x, t, beta=0.3)
    (g,) = torch.autograd.grad(loss, x)
    ref = reference.jsd_loss(s.double(), t.double(), beta=0.3)
    finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(g).all())
    return [None if finite else "not finite", loss_error(loss, ref, (s.dtype,))]


def labels_for(s, gen):
    """Labels in [0, V) (never on a -inf logit: that CE is infinite), the first -100."""
    vocab = s.shape[-1]
    y = torch.randint(0, vocab, s.shape[:-1], generator=gen, device=DEV)
    banned = torch.isinf(s.float()).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    y = y.masked_fill(banned, -100)
    y.view(-1)[0] = -100
    return y


def grad_outputs(gen):
    """Per-row grad_output (reduction='none'), a second backward through the same
    graph, a scaled scalar loss: the in-place / copying backward of the CUDA path."""
    import kdcore

    s = logits((6, 5008), torch.bfloat16, gen)
    t = logits((6, 5008), torch.bfloat16, gen)
    go = torch.rand(6, generator=gen, device=DEV) + 0.5
    dts = (torch.bfloat16, torch.bfloat16)
    problems = compare("kl_loss", s, t, dts, grad_out=go, ulps=2.0, temperature=T, reduction="none")
    x = s.clone().requires_grad_()
    loss = kdcore.kl_loss(x, t, temperature=T)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    g1_copy = g1.clone()
    (g2,) = torch.autograd.grad(3.0 * loss, x)
    problems.append(None if torch.equal(g1, g1_copy) else "first gradient changed")
    want = (g1.float() * 3.0).to(torch.bfloat16)
    problems.append(None if torch.equal(g2, want) else "second backward is not 3x the first")
    return problems


def compiled_step(gen):
    """torch.compile(fullgraph=True) over user code calling kdcore ops, CUDA tensors."""
    import kdcore

    def step(a, b, y):
        loss = kdcore.kl_loss(a, b, temperature=T, labels=y)
        return loss + 0.1 * kdcore.jsd_loss(a, b) + 0.01 * kdcore.softmax(a, T).square().sum()

    torch._dynamo.reset()
    s = logits((4, 7, 3008), torch.bfloat16, gen)
    t = logits((4, 7, 3008), torch.bfloat16, gen)
    y = labels_for(s, gen)
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    eager = step(a, t, y)
    backend = "inductor" if DEV == "cuda" else "aot_eager"
    got = torch.compile(step, fullgraph=True, backend=backend)(b, t, y)
    (ga,) = torch.autograd.grad(eager, a)
    (gb,) = torch.autograd.grad(got, b)
    close = torch.allclose(got, eager, rtol=1e-4, atol=1e-5)
    gclose = torch.allclose(ga.float(), gb.float(), rtol=2e-2, atol=1e-5)
    return [
        None if close else f"loss {got.item()} vs eager {eager.item()}",
        None if gclose else "gradient differs from eager",
    ]


def int64_offsets(gen):
    """rows x V > 2^31 elements: the last rows against the reference."""
    import kdcore
    from kdcore import reference

    rows, vocab = 16767, 128256  # 2.15e9 elements
    if DEV != "cuda" or torch.cuda.mem_get_info()[0] < 3 * rows * vocab * 2 + (4 << 30):
        raise Skip("not enough free device memory")
    s = logits((rows, vocab), torch.bfloat16, gen)
    t = logits((rows, vocab), torch.bfloat16, gen)
    x = s.requires_grad_()
    loss = kdcore.kl_loss(x, t, temperature=T, reduction="none")
    (g,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    tail = slice(rows - 3, rows)
    s64 = s[tail].detach().double().requires_grad_()
    ref = reference.kl_loss(s64, t[tail].double(), temperature=T, reduction="none")
    (rg,) = torch.autograd.grad(ref.sum(), s64)
    return [loss_error(loss[tail], ref, (torch.bfloat16,)), grad_error(g[tail], rg, torch.bfloat16)]


def correctness(quick: bool) -> None:
    from kdcore import _triton

    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator(device=DEV).manual_seed(seed)
    log(f"correctness: seed {seed}")
    # One fixed configuration (no autotuning) and one specialisation per kernel
    # variant while checking (compile time): V divisible by 16, rows not.
    _triton.set_block(2048)
    shapes = [(3, 17, 1008), (15, 32000)] + ([] if quick else [(2, 262144)])
    if DEV != "cuda":
        shapes = [(3, 5, 1008), (2, 5000)]
    weights = {0: 0.0, 1: 1.0, 2: 2.0, 3: 0.0}
    for dtype in (torch.bfloat16, torch.float32):
        dn = str(dtype).removeprefix("torch.")
        for shape in shapes:
            tag = f"{dn} {'x'.join(map(str, shape))}"
            s = logits(shape, dtype, gen, banned=0.05)
            t = logits(shape, dtype, gen)
            both = torch.rand(shape, generator=gen, device=DEV) < 0.05
            both[..., 0] = False
            s, t = s.masked_fill(both, -math.inf), t.masked_fill(both, -math.inf)
            # KL(P_t || P_s) is finite only where the student is -inf the teacher is too.
            t_fwd = t.masked_fill(torch.isinf(s.float()), -math.inf)
            labels = labels_for(s, gen)
            spans = torch.randint(0, 4, shape[:-1], generator=gen, device=DEV)
            dts = (dtype, dtype)
            check(f"softmax {tag}", softmax_case, s, False, gen)
            check(f"log_softmax {tag}", softmax_case, s, True, gen)
            for reverse in (False, True):
                check(
                    f"kl_loss reverse={reverse} {tag}",
                    compare,
                    "kl_loss",
                    s,
                    t if reverse else t_fwd,
                    dts,
                    temperature=T,
                    reverse=reverse,
                    labels=labels,
                )
            for beta in (0.0, 0.3, 1.0):
                check(
                    f"jsd_loss beta={beta} {tag}",
                    compare,
                    "jsd_loss",
                    s,
                    t_fwd if beta == 0.0 else t,
                    dts,
                    beta=beta,
                    temperature=T,
                )
            check(f"tvd_loss {tag}", compare, "tvd_loss", s, t, dts, temperature=T, labels=labels)
            check(
                f"distillation_loss (jsd + CE at T=1) {tag}",
                compare,
                "distillation_loss",
                s,
                t,
                dts,
                labels,
                teacher_grad=False,
                floor=4e-6,
                alpha=0.4,
                temperature=T,
                divergence="jsd",
            )
            check(
                f"span_loss (kl) {tag}",
                compare,
                "span_loss",
                s,
                t_fwd,
                dts,
                spans,
                teacher_grad=False,
                span_weights=weights,
                temperature=T,
            )
            top = torch.log_softmax(t.double() / 1.5, -1).topk(min(64, shape[-1]), dim=-1)
            for tail in ("bucket", "renormalize", "zero"):
                check(
                    f"sparse_kl_loss tail={tail} {tag}",
                    compare,
                    "sparse_kl_loss",
                    s,
                    None,
                    (dtype,),
                    top.indices,
                    top.values.float(),
                    floor=3e-6 * T,
                    temperature=T,
                    teacher_temperature=1.5,
                    tail=tail,
                )
            del s, t, t_fwd
            free()
        big_s = logits((8, 4096), dtype, gen, scale=3e4).clamp(-3e4, 3e4)
        big_t = logits((8, 4096), dtype, gen, scale=3e4).clamp(-3e4, 3e4)
        for op, kwargs in [
            ("kl_loss", {}),
            ("kl_loss", {"reverse": True}),
            ("jsd_loss", {"beta": 0.4}),
            ("tvd_loss", {}),
        ]:
            check(
                f"{op} {kwargs} logits of ±3e4 {dn}",
                compare,
                op,
                big_s,
                big_t,
                (dtype, dtype),
                floor=1e-6,
                temperature=T,
                **kwargs,
            )
        check(f"log_softmax logits of ±3e4 {dn}", softmax_case, big_s, True, gen)
        far_s = logits((4, 3008), dtype, gen, scale=400.0)
        far_t = logits((4, 3008), dtype, gen, scale=400.0)
        check(f"jsd with log-probs far below -104 {dn}", far_below_104, far_s, far_t)
        del big_s, big_t, far_s, far_t
        free()
    check("grad_output per row, retain_graph, scaled loss (bf16)", grad_outputs, gen)
    check("torch.compile(fullgraph=True) on CUDA tensors", compiled_step, gen)
    _triton.set_block(None)
    check("rows x V > 2^31 (int64 offsets), last rows vs reference", int64_offsets, gen)
    free()
    shape = {} if DEV == "cuda" else {"rows": 16, "vocab": 300, "hs": 32, "ht": 24}
    check(
        "fused linear with VocabParallel on a one-rank group vs float64",
        vocab_parallel_check,
        **shape,
    )
    free()


# ------------------------------------------------------------- benchmarks


def measure(fn, rep_ms: int) -> tuple[float, float]:
    """(median ms of fn, peak GiB allocated above what was allocated before)."""
    import triton

    fn()  # compile / autotune / warm caches
    free()
    ms = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
    free()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**30


def copy_bandwidth() -> float:
    """Device-copy bandwidth in TB/s (bytes read + bytes written per second)."""
    import triton

    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e12


def kd_eager(s, t):
    """What users write today: fp32 upcast, F.log_softmax + F.kl_div (the anchors' baseline)."""
    ls = F.log_softmax(s.float() / T, -1)
    lt = F.log_softmax(t.float() / T, -1)
    return F.kl_div(ls, lt, log_target=True, reduction="batchmean") * T * T


def implementations(args, rows: int, vocab: int, first: bool, gen) -> list:
    """(name, loss_fn(s, t)) to time at one shape."""
    import kdcore

    impls = [
        ("kdcore kl", lambda a, b: kdcore.kl_loss(a, b, temperature=T)),
        ("torch eager", kd_eager),
    ]
    if not args.no_compile:
        impls.append(("torch.compile", torch.compile(kd_eager, dynamic=False)))
    try:
        from liger_kernel.transformers.kl_div import LigerKLDIVLoss

        liger = LigerKLDIVLoss(reduction="batchmean", log_target=True)

        def liger_kl(a, b):
            return liger(F.log_softmax(a.float() / T, -1), F.log_softmax(b.float() / T, -1)) * T * T

        impls.append(("liger kldiv", liger_kl))
    except Exception:
        log("Liger-Kernel not importable: its column is skipped")
    if first:
        labels = torch.randint(0, vocab, (rows,), generator=gen, device="cuda")
        spans = torch.randint(0, 4, (rows,), generator=gen, device="cuda")
        impls += [
            ("kdcore jsd(0.5)", lambda a, b: kdcore.jsd_loss(a, b, beta=0.5, temperature=T)),
            (
                "kdcore distillation(kl)",
                lambda a, b, y=labels: kdcore.distillation_loss(a, b, y, alpha=0.5, temperature=T),
            ),
            ("kdcore span(kl)", lambda a, b, z=spans: kdcore.span_loss(a, b, z, temperature=T)),
        ]
    return impls


def bench_shape(args, rows: int, vocab: int, first: bool, tbps: float, results: list) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(rows, vocab, generator=gen, device="cuda").to(torch.bfloat16)
    t = torch.randn(rows, vocab, generator=gen, device="cuda").to(torch.bfloat16)
    s.requires_grad_()
    floor = 6 * rows * vocab / (tbps * 1e12) * 1e3
    grad_gib = rows * vocab * 2 / 2**30
    for name, fn in implementations(args, rows, vocab, first, gen):
        row = {"shape": [rows, vocab], "impl": name}
        if time.monotonic() - STARTED > args.budget_s and not name.startswith("kdcore"):
            results.append({**row, "skipped": "time budget"})
            continue
        try:
            ms, gib = measure(lambda fn=fn: torch.autograd.grad(fn(s, t), s), args.rep_ms)
            row.update(ms=round(ms, 3), x_floor=round(ms / floor, 2), floor_ms=round(floor, 3))
            row.update(peak_extra_gib=round(gib, 3), x_grad_size=round(gib / grad_gib, 2))
        except Exception as exc:
            traceback.print_exc()
            row["error"] = repr(exc)[:300]
        if name.startswith("kdcore") and "ms" in row:
            row["autotune"] = tuned_config()
        results.append(row)
        log(row)
        free()


def tuned_config() -> dict:
    """The distill kernel's autotuner: the configuration in use and, for the key
    tuned last, every configuration's median time (ms)."""
    from kdcore import _triton

    tuned = _triton._modules().tuned["distill"]
    timings = getattr(tuned, "configs_timings", None) or {}
    return {
        "best": str(getattr(tuned, "best_config", None)),
        "timings_ms": {str(c): round(v[0], 4) for c, v in timings.items()},
    }


def fused_linear_case(args, results: list[dict], rows=8192, vocab=128256, hs=2048, ht=4096):
    """Fused linear + KL at the ANCHORS shape: gradients for the student's hidden
    states and lm_head; kdcore (row chunks: fp32 logits, Triton loss kernel;
    vocab chunks: two passes, no fp32 weight-gradient accumulator) vs torch
    eager on the full logits. Checked first against float64 on 256 rows."""
    import kdcore

    gen = torch.Generator(device="cuda").manual_seed(3)

    def make(n):
        h = (torch.randn(n, hs, generator=gen, device="cuda") * 0.5).to(torch.bfloat16)
        w = (torch.randn(vocab, hs, generator=gen, device="cuda") / hs**0.5).to(torch.bfloat16)
        th = (torch.randn(n, ht, generator=gen, device="cuda") * 0.5).to(torch.bfloat16)
        tw = (torch.randn(vocab, ht, generator=gen, device="cuda") / ht**0.5).to(torch.bfloat16)
        return h.requires_grad_(), w.requires_grad_(), th, tw

    def fused(h, w, th, tw, chunk_over="rows"):
        return kdcore.fused_linear_distillation_loss(
            h, w, teacher_hidden=th, teacher_weight=tw, temperature=T, chunk_over=chunk_over
        )

    def fused_vocab(h, w, th, tw):
        return fused(h, w, th, tw, chunk_over="vocab")

    def fused_rows(chunk):
        def run(h, w, th, tw):
            return kdcore.fused_linear_distillation_loss(
                h, w, teacher_hidden=th, teacher_weight=tw, temperature=T, chunk_size=chunk
            )

        return run

    def eager(h, w, th, tw):
        return kd_eager(h @ w.t(), th @ tw.t())

    def small_check(chunk_over):
        h, w, th, tw = make(256)
        loss = fused(h, w, th, tw, chunk_over)
        gh, gw = torch.autograd.grad(loss, (h, w))
        h64, w64 = h.double().detach().requires_grad_(), w.double().detach().requires_grad_()
        ref = kdcore.reference.kl_loss(h64 @ w64.t(), th.double() @ tw.double().t(), temperature=T)
        rh, rw = torch.autograd.grad(ref, (h64, w64))
        problems = []
        if abs(loss.item() - ref.item()) > 1e-4 * abs(ref.item()) + 1e-5:
            problems.append(f"loss {loss.item()} vs {ref.item()}")
        for name, got, exp in (("hidden", gh, rh), ("weight", gw, rw)):
            err = (got.double() - exp).abs().max().item()
            if err > 2**-7 * exp.abs().max().item():  # bf16 result + bf16 GEMM operands
                problems.append(f"grad {name} error {err:.3e} vs max {exp.abs().max().item():.3e}")
        return problems

    for mode in ("rows", "vocab"):
        check(
            f"fused linear + KL, {mode} chunks (256 rows, V=128256) vs float64", small_check, mode
        )
    paths = gemm_paths()
    results.append({"shape": [], "impl": "16-bit GEMMs, fp32 out", "note": str(paths), **paths})
    log(results[-1])
    free()
    h, w, th, tw = make(rows)
    # Row chunks: every chunk reads and writes the fp32 weight-gradient
    # accumulator (1 GiB here), so bigger chunks trade memory for traffic.
    variants = (
        ("kdcore fused linear kl (row chunks)", fused),
        ("kdcore fused linear kl (row chunks of 512)", fused_rows(512)),
        ("kdcore fused linear kl (row chunks of 1024)", fused_rows(1024)),
        ("kdcore fused linear kl (vocab chunks)", fused_vocab),
        ("torch eager linear+kl", eager),
    )
    for name, fn in variants:
        row = {"shape": [rows, hs, ht, vocab], "impl": name}
        try:
            ms, gib = measure(
                lambda fn=fn: torch.autograd.grad(fn(h, w, th, tw), (h, w)), args.rep_ms
            )
            row.update(ms=round(ms, 3), peak_extra_gib=round(gib, 3))
        except Exception as exc:
            traceback.print_exc()
            row["error"] = repr(exc)[:300]
        results.append(row)
        log(row)
        free()


def one_rank_group() -> None:
    """A process group of this process alone (NCCL on CUDA, gloo on the CPU)."""
    import socket

    dist = torch.distributed
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if DEV == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def vocab_parallel_check(rows=256, vocab=32000, hs=1024, ht=1536):
    """kdcore.VocabParallel on a one-rank group: the sharded arithmetic (forced;
    its all-reduces go through NCCL) against float64 on the full vocabulary,
    forward / reverse KL and JSD with hard labels, bf16 inputs."""
    import kdcore
    from kdcore.ops import vocab_parallel as vp_module

    one_rank_group()
    gen = torch.Generator(device=DEV).manual_seed(5)
    h = (torch.randn(rows, hs, generator=gen, device=DEV) * 0.5).to(torch.bfloat16)
    w = (torch.randn(vocab, hs, generator=gen, device=DEV) / hs**0.5).to(torch.bfloat16)
    b = (torch.randn(vocab, generator=gen, device=DEV) * 0.1).to(torch.bfloat16)
    th = (torch.randn(rows, ht, generator=gen, device=DEV) * 0.5).to(torch.bfloat16)
    tw = (torch.randn(vocab, ht, generator=gen, device=DEV) / ht**0.5).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (rows,), generator=gen, device=DEV)
    labels[::7] = -100
    problems = []
    for divergence, beta in (("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)):
        hk, wk, bk = (x.clone().requires_grad_() for x in (h, w, b))
        vp_module.PLAIN_PATH_AT_SIZE_ONE = False
        try:
            loss = kdcore.fused_linear_distillation_loss(
                hk,
                wk,
                student_bias=bk,
                teacher_hidden=th,
                teacher_weight=tw,
                labels=labels,
                alpha=0.3,
                divergence=divergence,
                beta=beta,
                temperature=T,
                vocab_parallel=kdcore.VocabParallel(0, vocab),
            )
            grads = torch.autograd.grad(loss, (hk, wk, bk))
        finally:
            vp_module.PLAIN_PATH_AT_SIZE_ONE = True
        wide = [x.double().detach().requires_grad_() for x in (h, w, b)]
        ref = kdcore.reference.distillation_loss(
            wide[0] @ wide[1].t() + wide[2],
            th.double() @ tw.double().t(),
            labels,
            alpha=0.3,
            divergence=divergence,
            beta=beta,
            temperature=T,
        )
        refs = torch.autograd.grad(ref, wide)
        if abs(loss.item() - ref.item()) > 1e-4 * abs(ref.item()) + 1e-5:
            problems.append(f"{divergence}: loss {loss.item()} vs {ref.item()}")
        for name, got, exp in zip(("hidden", "weight", "bias"), grads, refs, strict=True):
            err = (got.double() - exp).abs().max().item()
            if err > 2**-7 * exp.abs().max().item():  # bf16 result + bf16 GEMM operands
                problems.append(f"{divergence}: grad {name} error {err:.3e}")
    return problems


def vocab_parallel_case(args, results: list[dict], rows=8192, vocab=128256, hs=2048, ht=4096):
    """Time of the fused linear loss with VocabParallel(0, V) on a one-rank group
    (the plain path: the cost of the checks alone) and of the sharded arithmetic
    forced there, next to the plain loss."""
    import kdcore
    from kdcore.ops import vocab_parallel as vp_module

    one_rank_group()
    gen = torch.Generator(device="cuda").manual_seed(3)
    h = (torch.randn(rows, hs, generator=gen, device="cuda") * 0.5).to(torch.bfloat16)
    w = (torch.randn(vocab, hs, generator=gen, device="cuda") / hs**0.5).to(torch.bfloat16)
    th = (torch.randn(rows, ht, generator=gen, device="cuda") * 0.5).to(torch.bfloat16)
    tw = (torch.randn(vocab, ht, generator=gen, device="cuda") / ht**0.5).to(torch.bfloat16)
    h.requires_grad_()
    w.requires_grad_()

    def run(vp):
        loss = kdcore.fused_linear_distillation_loss(
            h, w, teacher_hidden=th, teacher_weight=tw, temperature=T, vocab_parallel=vp
        )
        return torch.autograd.grad(loss, (h, w))

    variants = (
        ("kdcore fused linear kl (plain)", None, True),
        ("kdcore fused linear kl (VocabParallel, 1 rank)", kdcore.VocabParallel(0, vocab), True),
        (
            "kdcore fused linear kl (sharded arithmetic, 1 rank)",
            kdcore.VocabParallel(0, vocab),
            False,
        ),
    )
    for name, vp, plain in variants:
        row = {"shape": [rows, hs, ht, vocab], "impl": name}
        vp_module.PLAIN_PATH_AT_SIZE_ONE = plain
        try:
            ms, gib = measure(lambda vp=vp: run(vp), args.rep_ms)
            row.update(ms=round(ms, 3), peak_extra_gib=round(gib, 3))
        except Exception as exc:
            traceback.print_exc()
            row["error"] = repr(exc)[:300]
        finally:
            vp_module.PLAIN_PATH_AT_SIZE_ONE = True
        results.append(row)
        log(row)
        free()


def gemm_paths() -> dict:
    """Whether this torch runs the 16-bit x 16-bit -> fp32 GEMMs the fused
    linear loss asks for (else it widens the operands: slower, more memory)."""
    a = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(32, 16, device="cuda", dtype=torch.bfloat16)
    acc = torch.randn(64, 16, device="cuda")
    expected = acc.double() + a.double() @ b.double()
    found = {}
    calls = {
        "mm out_dtype": lambda: torch.mm(a, b, out_dtype=torch.float32),
        "addmm out_dtype in place": lambda: torch.addmm(
            acc, a, b, out_dtype=torch.float32, out=acc
        ),
    }
    for name, call in calls.items():
        try:
            out = call()
            ok = out.dtype == torch.float32
            if name.startswith("addmm"):
                ok = ok and out.data_ptr() == acc.data_ptr()
                ok = ok and torch.allclose(acc.double(), expected, rtol=1e-5, atol=1e-4)
            found[name] = "ok" if ok else f"wrong result ({out.dtype})"
        except Exception as exc:
            found[name] = f"unsupported: {exc!r}"[:200]
    return found


def benchmarks(args, tbps: float, results: list[dict]) -> None:
    for i, (rows, vocab) in enumerate([(8192, 128256), (16384, 32000)]):
        bench_shape(args, rows, vocab, i == 0, tbps, results)
        free()
    fused_linear_case(args, results)
    free()
    trl_case(args, results)
    free()
    vocab_parallel_case(args, results)
    free()


def trl_case(args, results: list[dict]) -> None:
    """kdcore's fused linear loss vs TRL's chunked divergence (the loss of its
    DistillationTrainer) and Liger's fused linear JSD, each where importable,
    at the fused linear shape in bf16: benches/trl_compare.py's comparison."""
    try:
        import trl_compare  # benches/ is this script's directory
    except Exception as exc:
        log(f"benches/trl_compare.py not importable ({exc!r}): the TRL comparison is skipped")
        return
    for beta in (0.0, 0.5):
        rows = trl_compare.compare(
            8192,
            2048,
            4096,
            128256,
            beta=beta,
            temperature=T,
            device="cuda",
            dtype=torch.bfloat16,
            timer=lambda fn: measure(fn, args.rep_ms),
        )
        for row in rows:
            row["impl"] = f"{row['impl']} beta={beta}"
        results.extend(rows)
        free()


def autotune_choices() -> dict:
    from kdcore import _triton

    if not _triton._modules.cache_info().currsize:
        return {}
    out = {}
    for name, tuned in _triton._modules().tuned.items():
        for key, config in getattr(tuned, "cache", {}).items():
            out[f"{name} {key}"] = str(config)
        timings = getattr(tuned, "configs_timings", None) or {}
        if timings:
            out[f"{name} last timings"] = {
                str(c): [round(v, 4) for v in ts] for c, ts in timings.items()
            }
    return out


def table(results: list[dict]) -> str:
    lines = [f"{'shape':>22}  {'impl':<26}{'ms':>9}{'x floor':>9}{'extra GiB':>11}{'x grad':>8}"]

    def num(r, key, spec):
        return format(r[key], spec) if key in r else format("-", spec.split(".")[0])

    for r in results:
        shape = "x".join(map(str, r["shape"]))
        if "ms" in r:
            floor, size = num(r, "x_floor", ">9.2f"), num(r, "x_grad_size", ">8.2f")
            lines.append(
                f"{shape:>22}  {r['impl']:<26}{r['ms']:>9.3f}{floor}"
                f"{r['peak_extra_gib']:>11.3f}{size}"
            )
        else:
            why = r.get("error") or r.get("skipped") or r.get("note")
            lines.append(f"{shape:>22}  {r['impl']:<26}  {why}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--quick", action="store_true", help="fewer correctness shapes")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench rep per case")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=200.0,
        help="after this many seconds only kdcore cases are timed",
    )
    args = parser.parse_args()
    if DEV == "cpu":  # smoke test of the checks under the Triton interpreter
        correctness(quick=True)
        failed = [c for c in CHECKS if not c["ok"]]
        print(f"correctness: {len(CHECKS) - len(failed)}/{len(CHECKS)} passed")
        return 1 if failed else 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    import triton

    import kdcore

    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "kdcore": kdcore.__file__,
        "python": sys.version.split()[0],
    }
    log(info)
    tbps = copy_bandwidth()
    free()
    log(f"device copy bandwidth {tbps:.2f} TB/s")
    correctness(args.quick)
    results: list[dict] = []
    benchmarks(args, tbps, results)
    failed = [c for c in CHECKS if not c["ok"]]
    print()
    print(table(results))
    kl = {tuple(r["shape"]): r["ms"] for r in results if r["impl"] == "kdcore kl" and "ms" in r}
    for r in results:
        if r["impl"].startswith("kdcore ") and r["impl"] != "kdcore kl" and "ms" in r:
            base = kl.get(tuple(r["shape"]))
            if base:
                r["x_kl"] = round(r["ms"] / base, 3)
                print(f"{r['impl']}: {r['x_kl']:.2f}x KL")
    print(f"\ncorrectness: {len(CHECKS) - len(failed)}/{len(CHECKS)} passed")
    for c in failed:
        print("  FAILED", c["check"], "; ".join(c["problems"]))
    out = {
        **info,
        "copy_TBps": round(tbps, 3),
        "checks": CHECKS,
        "timings": results,
        "autotune": autotune_choices(),
        "ok": not failed,
        "wall_s": round(time.monotonic() - STARTED, 1),
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=str)
    log(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
