"""The ``kdcore`` console command."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdcore", description="kdcore command line")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser(
        "bench",
        help="time kdcore against torch eager and torch.compile in one process",
        description=(
            "Times forward+backward and forward-only temperature-KL distillation losses: "
            "kdcore vs torch eager vs torch.compile of the same formula, with one thread "
            "count for all, medians after warm-up, ratios printed side by side."
        ),
    )
    bench.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for kdcore and torch alike (default: kdcore's pool size)",
    )
    bench.add_argument("--repeat", type=int, default=7, help="timed runs per cell (median)")
    bench.add_argument(
        "--quick", action="store_true", help="small shapes, few repeats (smoke test)"
    )
    bench.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    bench.add_argument(
        "--ops",
        default="kl,family,sparse",
        help="tables to run, comma-separated: kl (the KL anchor shapes), family "
        "(kl/jsd/tvd/distillation/span at 512x32000), sparse (top-k teacher vs dense)",
    )
    _demo_parser(sub)
    return parser


def _demo_parser(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="distil a small calculator-using agent three ways and compare them",
        description=(
            "Distils the shipped teacher agent into three students of the same size at the "
            "same step budget (hard-label SFT, token-level KD, span-level KD with kdcore's "
            "span loss), runs every model as an agent on held-out problems with its actions "
            "executed, and prints a table; writes summary.json, demo.png and JSONL logs."
        ),
    )
    demo.add_argument("--quick", action="store_true", help="smoke-test size (under a minute)")
    demo.add_argument("--out", default="kdcore-demo", help="output directory")
    demo.add_argument("--steps", type=int, help="optimizer steps per student")
    demo.add_argument("--problems", type=int, help="training problems the teacher acts on")
    demo.add_argument("--held-out", type=int, help="held-out problems to evaluate on")
    demo.add_argument("--temperature", type=float, help="distillation temperature T")
    demo.add_argument("--seed", type=int, help="seed of the students' data order and weights")
    demo.add_argument(
        "--seeds",
        type=int,
        help="train and evaluate the students for this many seeds (--seed, --seed+1, ...) "
        "and report mean and spread (each seed adds about 4 minutes on 2 cores)",
    )
    demo.add_argument("--threads", type=int, help="CPU threads for torch and kdcore")
    demo.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    demo.add_argument("--teacher", metavar="PATH", help="teacher checkpoint (default: shipped)")
    demo.add_argument(
        "--train-teacher",
        action="store_true",
        help="instead of the demo: retrain the teacher and write it to --save-teacher",
    )
    demo.add_argument("--teacher-steps", type=int, default=1500, help="with --train-teacher")
    demo.add_argument(
        "--save-teacher", metavar="PATH", default="teacher.pt", help="with --train-teacher"
    )


def _run_demo(args) -> int:
    from .demo.pipeline import DemoConfig, retrain_teacher, run_demo

    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"kdcore demo: --threads must be >= 1; got {args.threads}")
    if args.train_teacher:
        retrain_teacher(args.teacher_steps, args.save_teacher)
        return 0
    overrides = {
        "steps": args.steps,
        "student_problems": args.problems,
        "held_out": args.held_out,
        "temperature": args.temperature,
        "seed": args.seed,
        "seeds": args.seeds,
    }
    for key, value in overrides.items():
        if value is not None and key != "temperature" and key != "seed" and value < 1:
            raise SystemExit(f"kdcore demo: --{key.replace('_', '-')} must be >= 1; got {value}")
    chosen = {k: v for k, v in overrides.items() if v is not None}
    chosen.update(out_dir=args.out, teacher_path=args.teacher, device=args.device)
    cfg = DemoConfig.quick(**chosen) if args.quick else DemoConfig(**chosen)
    run_demo(cfg, threads=args.threads)
    return 0


def _ops(value: str) -> tuple[str, ...]:
    from .bench import OPS

    ops = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [o for o in ops if o not in OPS]
    if unknown or not ops:
        raise SystemExit(f"kdcore bench: --ops takes {', '.join(OPS)}; got {value!r}")
    return ops


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bench":
        from .bench import run

        return run(
            threads=args.threads,
            repeat=args.repeat,
            quick=args.quick,
            compile=not args.no_compile,
            json_path=args.json,
            ops=_ops(args.ops),
        )
    if args.command == "demo":
        return _run_demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
