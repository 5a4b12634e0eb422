"""Diagnoses the demo's students: the earlier default set-up next to the current one.

    python scripts/demo_diagnose.py --setup before --seeds 1 --out diag-before
    python scripts/demo_diagnose.py --setup before --lr 1e-3 --seeds 1 --out diag-before-lr1e-3

``before`` is the demo as it shipped before the redesign (0.14M-parameter
student with learned positions, batch 16, 800 steps, lr 3e-3 for every
objective, sampled teacher trajectories); ``now`` is ``kdcore demo``'s
defaults. Each run is a full ``run_demo`` (same pipeline, same diagnostics);
this prints per objective: held-out success, action- and reasoning-token
accuracy, where failed episodes first go wrong, and each objective's loss and
gradient norm at the initial weights. docs/demo.md quotes its output.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from kdcore.demo.model import ModelConfig
from kdcore.demo.pipeline import DemoConfig, run_demo

BEFORE = DemoConfig(
    student_problems=1000,
    steps=800,
    batch_size=16,
    learning_rates={"sft": 3e-3, "token_kd": 3e-3, "span_kd": 3e-3},
    student=ModelConfig(d_model=64, n_layers=2, n_heads=4, positions="learned"),
    rollout_temperature=1.0,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", choices=("before", "now"), default="before")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, help="one learning rate for every objective")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="kdcore-demo-diagnose")
    args = parser.parse_args()
    cfg = BEFORE if args.setup == "before" else DemoConfig()
    cfg = replace(cfg, seeds=args.seeds, seed=args.seed, out_dir=args.out)
    if args.lr is not None:
        cfg = replace(cfg, learning_rates=dict.fromkeys(cfg.learning_rates, args.lr))
    summary = run_demo(cfg, threads=args.threads)
    print(f"\nsetup {args.setup}: {cfg.student}")
    for row in summary["rows"]:
        if row["model"] == "teacher":
            continue
        scale = row["initial_loss_scale"]
        errors = ", ".join(f"{k} {n}" for k, n in row["first_error"].items() if n)
        print(
            f"{row['model']:<9} seed {row['seed']} lr {row['lr']:g}: "
            f"success {100 * row['success_rate']:.1f}%, "
            f"action-token {100 * row['action_token_accuracy']:.2f}%, "
            f"reasoning-token {100 * row['reason_token_accuracy']:.2f}%, "
            f"initial loss {scale['loss']:.3f} (grad norm {scale['grad_norm']:.2f}); "
            f"first wrong token: {errors or '-'}"
        )


if __name__ == "__main__":
    main()
