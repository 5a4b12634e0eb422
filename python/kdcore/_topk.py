"""Row checks of a stored top-k teacher (ids, log-probabilities) that need the
rows sorted: shared by the Triton path and the reference path (the Rust
kernel makes the same checks itself)."""

from __future__ import annotations

import torch

#: Top-k masses may exceed 1 by this much (rounding of stored log-probs).
MASS_SLACK = 1e-3


def check_rows(
    ids: torch.Tensor, logprobs: torch.Tensor, active: torch.Tensor, vocab: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validates the rows of (rows, k) ``ids`` / ``logprobs`` where ``active``
    (rows whose loss weight is not 0; the others are never read).

    Returns ``(ids sorted per row, log-probs in that order, top-k mass in
    float of the log-probs)``; raises ValueError naming the first bad row:
    an id outside [0, vocab), an id twice, a log-probability that is NaN or
    > 0, or masses summing above 1 + MASS_SLACK. One host sync per call.
    """
    ids_sorted, order = ids.sort(dim=-1)
    lp = logprobs.gather(-1, order)
    bad_range = (ids_sorted[:, 0] < 0) | (ids_sorted[:, -1] >= vocab)
    twice = (ids_sorted[:, 1:] == ids_sorted[:, :-1]).any(-1)
    bad_lp = (torch.isnan(lp) | (lp > 0)).any(-1)
    mass = lp.exp().sum(-1)
    heavy = mass > 1.0 + MASS_SLACK
    problems = active & (bad_range | twice | bad_lp | heavy)
    if bool(problems.any()):
        r = int(problems.nonzero()[0, 0])
        row, lps = ids_sorted[r].tolist(), lp[r].tolist()
        if bad_range[r]:
            bad = [i for i in ids[r].tolist() if not 0 <= i < vocab][0]
            message = f"row {r}: token id {bad} is outside [0, {vocab})"
        elif twice[r]:
            bad = next(a for a, b in zip(row, row[1:], strict=False) if a == b)
            message = f"row {r}: token id {bad} appears twice in the top-k"
        elif bad_lp[r]:
            j = next(j for j, v in enumerate(lps) if not v <= 0)
            message = f"row {r}: log-probability {lps[j]} of token {row[j]} is not <= 0"
        else:
            message = f"row {r}: top-k probabilities sum to {float(mass[r]):.6f} > 1"
        raise ValueError(f"teacher: {message}")
    return ids_sorted, lp, mass
