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
    return parser


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
    return 2


if __name__ == "__main__":
    sys.exit(main())
