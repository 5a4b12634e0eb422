"""The demo's numbers: per-seed rows -> per-model aggregates, paired gaps, tables."""

from __future__ import annotations

from .diagnostics import ERROR_KINDS


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    mean = sum(values) / len(values)
    sd = (sum((x - mean) ** 2 for x in values) / max(1, len(values) - 1)) ** 0.5
    return mean, sd


def aggregate(rows: list[dict]) -> list[dict]:
    """Per model over seeds: mean and spread of success, mean of the rest, the
    first-error counts summed over seeds."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        runs = [r for r in rows if r["model"] == name]
        rates = [r["success_rate"] for r in runs]
        mean, sd = mean_sd(rates)
        secs = [r["train_seconds"] for r in runs if r["train_seconds"] is not None]
        row = {
            "model": name,
            "objective": runs[0]["objective"],
            "parameters": runs[0]["parameters"],
            "lr": runs[0].get("lr"),
            "seeds": [r.get("seed") for r in runs],
            "success_rate": mean,
            "success_sd": sd,
            "success_by_seed": rates,
            "action_token_accuracy": sum(r["action_token_accuracy"] for r in runs) / len(runs),
            "mean_actions": sum(r["mean_actions"] for r in runs) / len(runs),
            "train_seconds": sum(secs) / len(secs) if secs else None,
        }
        if all("reason_token_accuracy" in r for r in runs):
            row["reason_token_accuracy"] = sum(r["reason_token_accuracy"] for r in runs) / len(runs)
        if all("spans" in r for r in runs):
            row["spans"] = {
                span: {k: sum(r["spans"][span][k] for r in runs) / len(runs) for k in values}
                for span, values in runs[0]["spans"].items()
            }
        if all("first_error" in r for r in runs):
            row["first_error"] = {k: sum(r["first_error"][k] for r in runs) for k in ERROR_KINDS}
        out.append(row)
    return out


def paired_gaps(rows: list[dict], pairs: list[tuple[str, str]]) -> list[dict]:
    """Success of ``a`` minus success of ``b`` on each seed both ran (same
    initial weights, batches and teacher trajectories), with mean and sd."""
    out = []
    for a, b in pairs:
        by_seed = {r["seed"]: r["success_rate"] for r in rows if r["model"] == b}
        gaps = [r["success_rate"] - by_seed[r["seed"]] for r in rows if r["model"] == a]
        if not gaps:
            continue
        mean, sd = mean_sd(gaps)
        out.append({"a": a, "b": b, "gap": mean, "gap_sd": sd, "gap_by_seed": gaps})
    return out


def format_table(rows: list[dict]) -> str:
    head = f"{'model':<9} {'params':>7}  {'objective':<40} {'lr':>7} {'success':>8} {'sd':>5} "
    head += f"{'act-tok':>7} {'rsn-tok':>7} {'act KL':>7} {'rsn KL':>7} {'actions':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lr = "-" if r.get("lr") is None else f"{r['lr']:.0e}"
        sd = f"{100 * r['success_sd']:.1f}" if len(r.get("success_by_seed", [])) > 1 else "-"
        reason = r.get("reason_token_accuracy")
        reason = "-" if reason is None else f"{100 * reason:.1f}%"
        kl = {k: v.get("teacher_kl") for k, v in r.get("spans", {}).items()}
        act_kl, rsn_kl = (
            "-" if kl.get(k) is None else f"{kl[k]:.4f}" for k in ("action", "reason")
        )
        lines.append(
            f"{r['model']:<9} {r['parameters'] / 1e3:>6.0f}k  {r['objective']:<40} {lr:>7} "
            f"{100 * r['success_rate']:>7.1f}% {sd:>5} {100 * r['action_token_accuracy']:>6.1f}% "
            f"{reason:>7} {act_kl:>7} {rsn_kl:>7} {r['mean_actions']:>7.2f}"
        )
    return "\n".join(lines)


def format_seed_table(agg: list[dict], gaps: list[dict] = ()) -> str:
    """The aggregate table, success per seed, the paired gaps and where failures start."""
    lines = [format_table(agg), "", "success by seed:"]
    for r in agg:
        values = " ".join(f"{100 * x:5.1f}%" for x in r["success_by_seed"])
        lines.append(f"  {r['model']:<9} {values}   (sd {100 * r['success_sd']:.1f})")
    if gaps:
        lines += ["", "paired gaps (same seeds, batches and teacher trajectories):"]
        for g in gaps:
            values = " ".join(f"{100 * x:+5.1f}" for x in g["gap_by_seed"])
            lines.append(
                f"  {g['a']} - {g['b']}: {100 * g['gap']:+.1f} points "
                f"(sd {100 * g['gap_sd']:.1f}; by seed {values})"
            )
    failed = [r for r in agg if "first_error" in r and sum(r["first_error"].values())]
    if failed:
        lines += ["", "first wrong token of the failed episodes (all seeds):"]
        for r in failed:
            parts = ", ".join(f"{k} {n}" for k, n in r["first_error"].items() if n)
            lines.append(f"  {r['model']:<9} {parts}")
    return "\n".join(lines)
