"""kdcore's fused linear loss against TRL's chunked divergence (and Liger-Kernel's
fused linear JSD where importable): forward + backward time and agreement.

    python benches/trl_compare.py [--rows 1024] [--hidden 256] [--vocab 32000]
                                  [--beta 0.5] [--temperature 1.0] [--threads 2] [--reps 5]

Same process, same inputs (student and teacher hidden states and heads, fp32
on the CPU), fixed thread count; each implementation runs forward + backward
(gradients of the student's hidden states and head) ``--reps`` times after a
warm-up and the median is printed. TRL's is the function its
DistillationTrainer calls (trl.trainer.distillation_trainer's
``_chunked_divergence_loss``, generalized JSD of ``beta``, no T² factor);
kdcore's is ``fused_linear_distillation_loss`` with the same divergence and
``scale_t2=False``. Also prints the max absolute difference of the losses and
gradients against kdcore's. benches/gpu_check.py runs :func:`compare` at its
GPU shapes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def kdcore_loss(beta: float, temperature: float) -> Callable:
    import kdcore

    divergence, b = (
        ("kl", 0.5) if beta == 0 else ("reverse_kl", 0.5) if beta == 1 else ("jsd", beta)
    )

    def run(h, w, th, tw):
        return kdcore.fused_linear_distillation_loss(
            h,
            w,
            teacher_hidden=th,
            teacher_weight=tw,
            divergence=divergence,
            beta=b,
            temperature=temperature,
            scale_t2=False,
        )

    return run


def trl_loss(beta: float, temperature: float) -> Callable | None:
    try:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
    except Exception as exc:  # noqa: BLE001 - any failure means: not comparable here
        print(f"TRL not importable ({type(exc).__name__}: {exc}): its column is skipped")
        return None

    def run(h, w, th, tw):
        mask = torch.ones(h.shape[0], dtype=torch.long, device=h.device)
        loss, _, _ = _chunked_divergence_loss(h, th, w, tw, mask, beta, temperature=temperature)
        return loss

    return run


def liger_loss(beta: float, temperature: float) -> Callable | None:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except Exception as exc:  # noqa: BLE001
        print(f"Liger-Kernel not importable ({type(exc).__name__}): its column is skipped")
        return None
    jsd = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, temperature=temperature
    )

    def run(h, w, th, tw):
        labels = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
        return jsd(h, w, th, tw, labels)

    return run


def inputs(rows, hs, ht, vocab, device, dtype, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    h = randn(rows, hs, scale=0.5).requires_grad_()
    w = randn(vocab, hs, scale=hs**-0.5).requires_grad_()
    th, tw = randn(rows, ht, scale=0.5), randn(vocab, ht, scale=ht**-0.5)
    return h, w, th, tw


def cpu_timer(reps: int) -> Callable:
    def timer(fn):
        fn()  # warm-up
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return timer


def compare(rows, hs, ht, vocab, *, beta, temperature, device, dtype, timer) -> list[dict]:
    """One row per implementation: median ms of forward + backward, and the max
    absolute differences of its loss and gradients from kdcore's. ``timer(fn)``
    gives ms, or (ms, peak extra GiB)."""
    h, w, th, tw = inputs(rows, hs, ht, vocab, device, dtype)
    impls = [("kdcore fused_linear", kdcore_loss(beta, temperature))]
    for name, make in (
        ("trl chunked_divergence", trl_loss),
        ("liger fused_linear_jsd", liger_loss),
    ):
        fn = make(beta, temperature)
        if fn is not None:
            impls.append((name, fn))
    results, first = [], None
    for name, fn in impls:
        row = {"impl": name, "shape": [rows, hs, ht, vocab], "beta": beta, "T": temperature}
        try:
            loss = fn(h, w, th, tw)
            grads = torch.autograd.grad(loss, (h, w))
            if first is None:
                first = (loss.detach(), grads)
            else:
                row["loss_diff"] = abs(loss.item() - first[0].item())
                row["grad_h_diff"] = (grads[0].float() - first[1][0].float()).abs().max().item()
                row["grad_w_diff"] = (grads[1].float() - first[1][1].float()).abs().max().item()
            row["loss"] = loss.item()
            timed = timer(lambda fn=fn: torch.autograd.grad(fn(h, w, th, tw), (h, w)))
            ms, gib = timed if isinstance(timed, tuple) else (timed, None)
            row["ms"] = round(ms, 3)
            if gib is not None:
                row["peak_extra_gib"] = round(gib, 3)
        except Exception as exc:  # noqa: BLE001 - reported in the row
            row["error"] = repr(exc)[:300]
        results.append(row)
        print(row, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256, help="student hidden size")
    parser.add_argument("--teacher-hidden", type=int, default=384)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--beta", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    import kdcore

    torch.set_num_threads(args.threads)
    kdcore.set_num_threads(args.threads)
    print(f"threads {args.threads}, torch {torch.__version__}, kdcore {kdcore.__file__}")
    for beta in args.beta:
        compare(
            args.rows,
            args.hidden,
            args.teacher_hidden,
            args.vocab,
            beta=beta,
            temperature=args.temperature,
            device="cpu",
            dtype=torch.float32,
            timer=cpu_timer(args.reps),
        )


if __name__ == "__main__":
    main()
