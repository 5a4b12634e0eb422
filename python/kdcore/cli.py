"""The ``kdcore`` console command."""

from __future__ import annotations

import argparse
import math
import os
import sys

# torch.Generator.manual_seed takes seeds in [0, 2**64).
_SEED_LIMIT = 2**64
_TEACHER_STEPS = 2500
# Options of the demo run itself; --train-teacher does not use them.
_DEMO_ONLY = (
    "quick",
    "out",
    "steps",
    "problems",
    "held_out",
    "temperature",
    "seed",
    "seeds",
    "workers",
    "device",
    "teacher",
)
_TEACHER_ONLY = ("teacher_steps", "save_teacher")


# Argument types: argparse turns their ArgumentTypeError into
# "argument --name: message" and exit status 2, before any work starts.


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer; got {text!r}") from None
    if not 0 <= value < _SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64); got {value}")
    return value


def _temperature(text: str) -> float:
    """A temperature the losses take (finite, in kdcore's range)."""
    from ._validate import TEMPERATURE_RANGE

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number; got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be finite and > 0; got {text!r}")
    low, high = TEMPERATURE_RANGE
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be in [{low:g}, {high:g}]; got {text!r}")
    return value


def _device(text: str) -> str:
    if text == "auto":
        return text
    import torch

    try:
        kind = torch.device(text).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"takes auto, cpu, cuda or cuda:N; got {text!r}")
    return text


def _existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def _new_file(text: str) -> str:
    """A file path whose directory exists, so that writing it at the end cannot fail on that."""
    directory = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"directory {directory!r} does not exist")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory")
    return text


def _out_dir(text: str) -> str:
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdcore", description="kdcore command line")
    sub = parser.add_subparsers(dest="command", required=True)
    _bench_parser(sub)
    _demo_parser(sub)
    _plot_parser(sub)
    return parser


def _plot_parser(sub) -> None:
    plot = sub.add_parser(
        "plot",
        help="draw the figure of a demo run from its summary.json (needs kdcore[plot])",
        description=(
            "Draws the demo's figure (loss curves, held-out success with the spread over "
            "seeds) from a summary.json that `kdcore demo` wrote; needs matplotlib "
            '(pip install "kdcore[plot]").'
        ),
    )
    plot.set_defaults(command_parser=plot)
    plot.add_argument("summary", type=_existing_file, help="a summary.json of `kdcore demo`")
    plot.add_argument(
        "--out", type=_new_file, help="PNG to write (default: demo.png beside the summary)"
    )


def _bench_parser(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="time kdcore against torch eager and torch.compile in one process",
        description=(
            "Times forward+backward and forward-only temperature-KL distillation losses: "
            "kdcore vs torch eager vs torch.compile of the same formula, with one thread "
            "count for all, medians after warm-up, ratios printed side by side."
        ),
    )
    bench.set_defaults(command_parser=bench)
    bench.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="threads for kdcore and torch alike (default: kdcore's pool size)",
    )
    bench.add_argument(
        "--repeat",
        type=_positive_int,
        default=None,
        help="timed runs per cell, of which the median is reported (default: 7, or 3 with "
        "--quick); torch eager f+b gets max(3, repeat // 2)",
    )
    bench.add_argument(
        "--quick", action="store_true", help="small shapes, 3 repeats unless --repeat (smoke test)"
    )
    bench.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    bench.add_argument(
        "--json", metavar="PATH", type=_new_file, help="also write the results as JSON"
    )
    bench.add_argument(
        "--ops",
        default="kl,family,sparse,fused",
        help="tables to run, comma-separated: kl (the KL anchor shapes), family "
        "(kl/jsd/tvd/distillation/span at 512x32000), sparse (top-k teacher vs dense), "
        "fused (fused linear + distillation loss vs its GEMMs alone)",
    )


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
    demo.set_defaults(command_parser=demo)
    demo.add_argument("--quick", action="store_true", help="smoke-test size (under a minute)")
    demo.add_argument("--out", type=_out_dir, help="output directory (default: kdcore-demo)")
    demo.add_argument("--steps", type=_positive_int, help="optimizer steps per student")
    demo.add_argument(
        "--problems",
        type=_positive_int,
        help="training problems the teacher acts on (at least one batch, 16)",
    )
    demo.add_argument("--held-out", type=_positive_int, help="held-out problems to evaluate on")
    demo.add_argument(
        "--temperature", type=_temperature, help="distillation temperature T, in [1e-18, 1000]"
    )
    demo.add_argument("--seed", type=_seed, help="seed of the students' data order and weights")
    demo.add_argument(
        "--seeds",
        type=_positive_int,
        help="train and evaluate the students for this many seeds (--seed, --seed+1, ...) "
        "and report mean and spread (default 3)",
    )
    demo.add_argument("--threads", type=_positive_int, help="CPU threads for torch and kdcore")
    demo.add_argument(
        "--workers",
        type=_positive_int,
        help="processes training students side by side, one thread each (default: one per "
        "CPU thread on a CPU, 1 on a GPU)",
    )
    demo.add_argument(
        "--device", type=_device, help="auto (cuda if available; the default), cpu, cuda"
    )
    demo.add_argument(
        "--teacher",
        metavar="PATH",
        type=_existing_file,
        help="teacher checkpoint (default: shipped)",
    )
    demo.add_argument(
        "--tune",
        action="store_true",
        help="instead of the demo: train each student at a grid of learning rates and "
        "score them on validation problems (not the held-out ones); writes tune.json and "
        "prints the rates the demo's defaults should hold (about 15 minutes on 2 cores)",
    )
    demo.add_argument(
        "--lr-grid",
        type=_rate_grid,
        metavar="R1,R2,...",
        help="with --tune: the learning rates to try (default: 2e-3,4e-3,8e-3)",
    )
    demo.add_argument(
        "--train-teacher",
        action="store_true",
        help="instead of the demo: retrain the teacher and write it to --save-teacher "
        "(takes only --teacher-steps, --save-teacher and --threads)",
    )
    demo.add_argument(
        "--teacher-steps",
        type=_positive_int,
        help=f"with --train-teacher: optimizer steps (default: {_TEACHER_STEPS})",
    )
    demo.add_argument(
        "--save-teacher",
        metavar="PATH",
        type=_new_file,
        help="with --train-teacher: where to write it (default: teacher.pt)",
    )


def _rate_grid(text: str) -> tuple[float, ...]:
    """``1e-3,2e-3``: learning rates, each finite and in (0, 1]."""
    rates = []
    for part in text.split(","):
        try:
            rate = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {part.strip()!r}") from None
        if not 0.0 < rate <= 1.0:
            raise argparse.ArgumentTypeError(f"each rate must be in (0, 1]; got {part.strip()}")
        rates.append(rate)
    return tuple(dict.fromkeys(rates))


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _given(args, dests) -> list[str]:
    """The options among ``dests`` set on the command line (their defaults are None/False)."""
    return [_flag(d) for d in dests if getattr(args, d) not in (None, False)]


def _check_demo_args(args) -> None:
    """Checks that span several options, so that nothing fails after minutes of work."""
    from .demo.pipeline import DemoConfig

    error = args.command_parser.error
    if args.train_teacher:
        if extra := _given(args, (*_DEMO_ONLY, "tune", "lr_grid")):
            error(f"--train-teacher does not take {', '.join(extra)}")
        return
    if extra := _given(args, _TEACHER_ONLY):
        error(f"{', '.join(extra)}: used only with --train-teacher")
    if args.lr_grid is not None and not args.tune:
        error("--lr-grid: used only with --tune")
    batch = DemoConfig.batch_size
    if args.problems is not None and args.problems < batch:
        error(f"--problems must be >= {batch} (one training batch); got {args.problems}")
    if args.seed is not None and args.seeds is not None and args.seed + args.seeds > _SEED_LIMIT:
        error(f"--seed + --seeds - 1 must be < 2**64; got {args.seed} + {args.seeds} - 1")
    if args.device is not None and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            error(f"--device {args.device}: CUDA is not available")


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    import torch

    from ._threads import set_num_threads

    set_num_threads(threads)
    torch.set_num_threads(threads)


def _run_demo(args) -> int:
    _check_demo_args(args)
    from .demo.pipeline import DemoConfig, retrain_teacher, run_demo

    if args.train_teacher:
        _set_threads(args.threads)
        steps = _TEACHER_STEPS if args.teacher_steps is None else args.teacher_steps
        retrain_teacher(steps, args.save_teacher or "teacher.pt")
        return 0
    options = {
        "steps": args.steps,
        "student_problems": args.problems,
        "held_out": args.held_out,
        "temperature": args.temperature,
        "seed": args.seed,
        "seeds": args.seeds,
        "workers": args.workers,
        "out_dir": args.out,
        "teacher_path": args.teacher,
        "device": args.device,
    }
    chosen = {k: v for k, v in options.items() if v is not None}
    if args.tune:
        from .demo.tune import run_tune

        _set_threads(args.threads)
        grid = {} if args.lr_grid is None else {"grid": args.lr_grid}
        run_tune(DemoConfig.quick(**chosen) if args.quick else DemoConfig(**chosen), **grid)
        return 0
    cfg = DemoConfig.quick(**chosen) if args.quick else DemoConfig(**chosen)
    run_demo(cfg, threads=args.threads)
    return 0


def _ops(args) -> tuple[str, ...]:
    from .bench import OPS

    value = args.ops
    # dict.fromkeys: each table once, in the order given.
    ops = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    unknown = [o for o in ops if o not in OPS]
    if unknown or not ops:
        args.command_parser.error(f"--ops takes {', '.join(OPS)}; got {value!r}")
    return ops


def _run_bench(args) -> int:
    from .bench import run

    return run(
        threads=args.threads,
        repeat=args.repeat,
        quick=args.quick,
        compile=not args.no_compile,
        json_path=args.json,
        ops=_ops(args),
    )


def _run_plot(args) -> int:
    import json

    from ._extras import MissingExtraError
    from .demo.plot import write_demo_figure

    try:
        with open(args.summary, encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        args.command_parser.error(f"cannot read {args.summary!r} as JSON: {exc}")
    if not isinstance(summary, dict) or not isinstance(summary.get("aggregate"), list):
        args.command_parser.error(f"{args.summary!r} is not a summary.json of `kdcore demo`")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.summary)), "demo.png")
    try:
        write_demo_figure(out, summary)
    except MissingExtraError as exc:
        print(f"kdcore plot: {exc}", file=sys.stderr)
        return 1
    except (KeyError, TypeError, ValueError) as exc:
        args.command_parser.error(f"{args.summary!r} is not a well-formed demo summary: {exc!r}")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "plot":
        return _run_plot(args)
    if args.command == "bench":
        return _run_bench(args)
    if args.command == "demo":
        return _run_demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
