"""Per-call cost of ``kdcore.kl_loss`` (forward + backward) on the CPU beside
eager PyTorch and beside the kernel alone, to see what the Python side costs.

    python benches/call_overhead.py [--threads 1] [--rounds 400] [--shapes 1x8,64x32000]
                                    [--temperature 1]

Per shape (rows x V, float32, the student requiring grad), in one process
with fixed thread counts, interleaved (each round runs every variant a few
times in turn, so drift on a shared machine hits them alike), medians over
the rounds, of the process's CPU time by default (``--clock wall`` for
wall-clock time; on a busy machine the CPU time is the steadier):

- ``kdcore``: ``kdcore.kl_loss(s, t)`` then ``backward()``;
- ``torch``: the same loss in eager PyTorch, ``F.kl_div(F.log_softmax(s),
  F.log_softmax(t), log_target=True, reduction="batchmean")`` then ``backward()``
  (at ``--temperature T`` other than 1: the logits divided by T and the loss
  multiplied by T², as kdcore's loss is);
- ``kernel``: the Rust kernel alone, called through the backend object
  (``_rust.BACKEND.distill``: the loss rows and the student gradient);
- ``outside``: the time kdcore spends outside the kernel, measured with the
  backend's ``distill`` replaced by a stub that only allocates its outputs
  as the Rust backend does (the loss rows, the gradient from kdcore's buffer
  cache): kdcore f+b on the stub minus the stub alone. Both are short, so
  this is resolved to a microsecond where a difference of two
  multi-millisecond medians on a shared machine is not;
- ``floor``: the least any autograd-aware op costs around that stub: a bare
  ``torch.autograd.Function`` (forward: the stub, backward: the saved
  gradient) called directly, f+b, minus the stub. ``outside - floor`` is
  what kdcore's own Python (checks, dispatch, weights, the op wrapper, the
  backward's scaling) adds per call;
- ``torch formula``: eager PyTorch with the KL written out,
  ``(P·(log P − log Q)).sum(-1).mean()`` on the two log-softmaxes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import kdcore
from kdcore import _dispatch, _memory, _rust
from kdcore._backend import DistillArgs, DistillResult


class StubBackend:
    """The Rust backend with a ``distill`` that computes nothing: it allocates the
    outputs as ``_rust.BACKEND.distill`` does (its loss rows, the student
    gradient from the buffer cache) and fills the gradient once with zeros."""

    name = "rust"

    def distill(self, args):
        rows = torch.empty(args.student.shape[0], dtype=torch.float32)
        grad = _memory.empty_like(args.student) if args.grad_student else None
        return DistillResult(rows.zero_(), None, grad, None)

    def __getattr__(self, method):
        return getattr(_rust.BACKEND, method)


#: The clock: "cpu" (this process's CPU time, all its threads: time spent
#: descheduled on a shared machine does not count) or "wall".
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def interleaved(variants: dict, rounds: int, inner: int, clock=time.perf_counter):
    """Median seconds per call of each variant over ``rounds`` interleaved rounds."""
    for fn in variants.values():
        for _ in range(inner * 3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            fn()  # untimed: the caches hold this variant's data, not the last one's
            start = clock()
            for _ in range(inner):
                fn()
            times[name].append((clock() - start) / inner)
    return {name: statistics.median(ts) for name, ts in times.items()}


class _Bare(torch.autograd.Function):
    """The floor: the stub kernel in a bare autograd.Function (the summed loss out,
    the gradient saved, as kdcore's eager ops do)."""

    @staticmethod
    def forward(ctx, s, args):
        ctx.set_materialize_grads(False)
        rows, _, grad, _ = StubBackend().distill(args)
        ctx.save_for_backward(grad)
        return rows.sum()

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad, None


def on_stub(fn):
    """``fn`` with the stub in place of the Rust backend (what ``_dispatch.route``
    hands the ops) for one call."""
    stub = StubBackend()

    def run():
        saved = _dispatch._objects.get("rust")
        _dispatch._objects["rust"] = stub
        try:
            fn()
        finally:
            if saved is None:
                _dispatch._objects.pop("rust", None)
            else:
                _dispatch._objects["rust"] = saved

    return run


def measure(rows: int, vocab: int, rounds: int, clock: str, temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(rows, vocab, generator=g).requires_grad_()
    t = torch.randn(rows, vocab, generator=g)
    weight = torch.full((rows,), 1.0 / rows)
    T = temperature
    weight = weight * (T * T)
    args = DistillArgs(s.detach(), t, weight, T, "kl", 0.5, None, None, True, False)

    def kd():
        kdcore.kl_loss(s, t, temperature=T).backward()
        s.grad = None

    def torch_kl():
        if T == 1.0:  # (the least eager code: no division, no T² factor)
            lq, lp = F.log_softmax(s, -1), F.log_softmax(t, -1)
            return F.kl_div(lq, lp, reduction="batchmean", log_target=True)
        lq, lp = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
        return F.kl_div(lq, lp, reduction="batchmean", log_target=True) * (T * T)

    def eager():
        torch_kl().backward()
        s.grad = None

    def kernel():
        _rust.BACKEND.distill(args)

    def formula():
        lq, lp = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
        ((lp.exp() * (lp - lq)).sum(-1).mean() * (T * T)).backward()
        s.grad = None

    def bare():
        _Bare.apply(s, args).backward()
        s.grad = None

    # The same loss: a check that the comparison is fair.
    ref = torch_kl()
    assert torch.allclose(kdcore.kl_loss(s, t, temperature=T), ref, rtol=1e-4, atol=1e-6)

    inner = 20 if rows * vocab < 100_000 else 2
    variants = {
        "kdcore": kd,
        "torch": eager,
        "formula": formula,
        "kernel": kernel,
        "bare": bare,
        "kdcore_stub": on_stub(kd),
        "stub": on_stub(lambda: StubBackend().distill(args)),
    }
    med = interleaved(variants, rounds, inner, CLOCKS[clock])
    us = {k: v * 1e6 for k, v in med.items()}
    print(
        f"{rows}x{vocab} fp32, T = {T:g}, {clock} time, medians of {rounds} rounds x {inner} calls:"
    )
    print(f"  kdcore f+b            {us['kdcore']:10.1f} us")
    print(f"  torch eager f+b       {us['torch']:10.1f} us   (F.kl_div, log_target)")
    print(f"  torch formula f+b     {us['formula']:10.1f} us   (Σ P (log P - log Q))")
    print(f"  kernel alone          {us['kernel']:10.1f} us   (_rust.BACKEND.distill)")
    print(f"  kdcore - torch        {us['kdcore'] - us['torch']:+10.1f} us")
    print(f"  kdcore / torch        {us['kdcore'] / us['torch']:10.2f}")
    print(f"  kdcore - kernel       {us['kdcore'] - us['kernel']:+10.1f} us")
    print(f"  kdcore f+b, stub      {us['kdcore_stub']:10.1f} us   (distill computes nothing)")
    print(f"  stub alone            {us['stub']:10.1f} us")
    outside = us["kdcore_stub"] - us["stub"]
    floor = us["bare"] - us["stub"]
    print(f"  outside the kernel    {outside:+10.1f} us   (f+b on the stub - stub alone)")
    print(f"  autograd floor        {floor:+10.1f} us   (a bare autograd.Function on the stub)")
    print(f"  kdcore's own Python   {outside - floor:+10.1f} us   (outside - floor)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch and kdcore threads")
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--shapes", default="1x8,64x32000", help="rows x V, comma separated")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    parser.add_argument("--temperature", type=float, default=1.0)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    kdcore.set_num_threads(opts.threads)
    print(f"threads: torch {torch.get_num_threads()}, kdcore {kdcore.get_num_threads()}")
    for shape in opts.shapes.split(","):
        rows, vocab = (int(x) for x in shape.lower().split("x"))
        measure(rows, vocab, opts.rounds, opts.clock, opts.temperature)


if __name__ == "__main__":
    main()
