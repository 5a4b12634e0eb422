"""Pure-PyTorch reference of every kdcore op.

Written for clarity from the definitions, not speed. Float64 inputs are
computed in float64 (tests use that as ground truth); other dtypes are upcast
to float32, matching the kernels' accumulation. Devices without a kdcore
kernel run these functions.
"""

from __future__ import annotations

import math

import torch


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def softmax(x: torch.Tensor, temperature: float = 1.0, dim: int = -1) -> torch.Tensor:
    """softmax(x / T) along ``dim``, in float32 (float64 for float64 input)."""
    return torch.softmax(_upcast(x) / temperature, dim=dim)


def log_softmax(x: torch.Tensor, temperature: float = 1.0, dim: int = -1) -> torch.Tensor:
    """log_softmax(x / T) along ``dim``, in float32 (float64 for float64 input)."""
    return torch.log_softmax(_upcast(x) / temperature, dim=dim)


def kl_div_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    reverse: bool = False,
) -> torch.Tensor:
    """KL per position, shape (...): KL(P_t ‖ P_s), or KL(P_s ‖ P_t) if ``reverse``.

    P = softmax(logits / T). Terms where the first distribution is 0 count 0.
    """
    log_s = log_softmax(student_logits, temperature)
    log_t = log_softmax(teacher_logits, temperature)
    log_p, log_q = (log_s, log_t) if reverse else (log_t, log_s)
    p = log_p.exp()
    # where() before the product keeps 0 * (-inf - -inf) from becoming NaN,
    # in the forward and in the gradient; a NaN p (a NaN row) stays NaN.
    log_ratio = torch.where(p == 0, torch.zeros_like(p), log_p - log_q)
    return (p * log_ratio).sum(-1)


def tvd_rows(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """½ Σ_j |P_t,j − P_s,j| per position."""
    p = softmax(teacher_logits, temperature)
    q = softmax(student_logits, temperature)
    d = p - q
    # |d| = d · sign(d) with sign(0) = 0 (abs's subgradient); unlike abs's
    # backward, a NaN d gives a NaN gradient (a NaN row stays NaN throughout).
    sign = torch.where(torch.isnan(d), d, torch.sign(d)).detach()
    return 0.5 * (d * sign).sum(-1)


def jsd_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """β KL(P_t ‖ M) + (1-β) KL(P_s ‖ M), M = β P_t + (1-β) P_s, per position.

    β = 0 and β = 1 are the forward and reverse KL (GKD / TRL convention).
    """
    if beta == 0.0:
        return kl_div_rows(student_logits, teacher_logits, temperature, reverse=False)
    if beta == 1.0:
        return kl_div_rows(student_logits, teacher_logits, temperature, reverse=True)
    log_q = log_softmax(student_logits, temperature)
    log_p = log_softmax(teacher_logits, temperature)
    p, q = log_p.exp(), log_q.exp()
    # Where both are 0, log M is irrelevant; keep it finite so that no NaN
    # reaches the gradient through logsumexp.
    both = (p == 0) & (q == 0)
    log_p_safe = torch.where(both, torch.zeros_like(log_p), log_p)
    log_q_safe = torch.where(both, torch.zeros_like(log_q), log_q)
    log_m = torch.logsumexp(
        torch.stack([log_p_safe + math.log(beta), log_q_safe + math.log(1.0 - beta)]), dim=0
    )
    kl_p = torch.where(p == 0, torch.zeros_like(p), log_p - log_m)
    kl_q = torch.where(q == 0, torch.zeros_like(q), log_q - log_m)
    return beta * (p * kl_p).sum(-1) + (1.0 - beta) * (q * kl_q).sum(-1)


def divergence_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The per-position divergence named ``divergence`` (kl, reverse_kl, jsd, tvd)."""
    if divergence in ("kl", "reverse_kl"):
        return kl_div_rows(student_logits, teacher_logits, temperature, divergence == "reverse_kl")
    if divergence == "jsd":
        return jsd_rows(student_logits, teacher_logits, beta, temperature)
    if divergence == "tvd":
        return tvd_rows(student_logits, teacher_logits, temperature)
    raise ValueError(f"unknown divergence {divergence!r}")


def cross_entropy_rows(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hard-label cross-entropy at temperature 1 per position (labels must be valid)."""
    log_q = log_softmax(student_logits)
    return -log_q.gather(-1, labels.unsqueeze(-1).long()).squeeze(-1)


def _zero_masked(student_logits, teacher_logits, valid):
    """Masked rows are never read: zero them so NaN or -inf there cannot
    reach the loss or the gradient."""
    keep = valid.unsqueeze(-1)
    return student_logits.masked_fill(~keep, 0.0), teacher_logits.masked_fill(~keep, 0.0)


def reduce_rows(
    rows: torch.Tensor,
    *,
    labels: torch.Tensor | None,
    ignore_index: int,
    mask: torch.Tensor | None,
    reduction: str,
) -> torch.Tensor:
    """Applies masking and a reduction to per-position losses (see kdcore.kl_loss)."""
    weight = torch.ones_like(rows)
    if labels is not None:
        weight = weight * (labels != ignore_index).to(rows.dtype)
    if mask is not None:
        weight = weight * mask.to(rows.dtype)
    weighted = torch.where(weight != 0, rows * weight, torch.zeros_like(rows))
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    if reduction in ("mean", "batchmean"):
        total = weight.sum()
        # torch.where, not a Python branch: meta tensors and vmap have no values to branch on.
        return weighted.sum() / torch.where(total != 0, total, torch.ones_like(total))
    raise ValueError(f"unknown reduction {reduction!r}")


def divergence_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = True,
) -> torch.Tensor:
    """Reference of kdcore.kl_loss / jsd_loss / tvd_loss."""
    if labels is not None or mask is not None:
        valid = torch.ones(
            student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device
        )
        if labels is not None:
            valid = valid & (labels != ignore_index)
        if mask is not None:
            valid = valid & (mask != 0)
        student_logits, teacher_logits = _zero_masked(student_logits, teacher_logits, valid)
    rows = divergence_rows(student_logits, teacher_logits, divergence, beta, temperature)
    if scale_t2:
        rows = rows * temperature**2
    return reduce_rows(
        rows, labels=labels, ignore_index=ignore_index, mask=mask, reduction=reduction
    )


def kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    reverse: bool = False,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = True,
) -> torch.Tensor:
    """Reference of :func:`kdcore.kl_loss`."""
    return divergence_loss(
        student_logits,
        teacher_logits,
        divergence="reverse_kl" if reverse else "kl",
        temperature=temperature,
        labels=labels,
        ignore_index=ignore_index,
        mask=mask,
        reduction=reduction,
        scale_t2=scale_t2,
    )


def jsd_loss(student_logits, teacher_logits, *, beta=0.5, scale_t2=True, **kwargs):
    """Reference of :func:`kdcore.jsd_loss`."""
    return divergence_loss(
        student_logits, teacher_logits, divergence="jsd", beta=beta, scale_t2=scale_t2, **kwargs
    )


def tvd_loss(student_logits, teacher_logits, *, scale_t2=False, **kwargs):
    """Reference of :func:`kdcore.tvd_loss`."""
    return divergence_loss(
        student_logits, teacher_logits, divergence="tvd", scale_t2=scale_t2, **kwargs
    )


def span_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    spans: torch.Tensor,
    *,
    span_weights: dict[int, float],
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    normalize: str = "span",
    scale_t2: bool = True,
    return_components: bool = False,
):
    """Reference of :func:`kdcore.span_loss`, span by span."""
    ids = spans.reshape(-1)
    token_weight = torch.tensor(
        [span_weights[int(i)] for i in ids.tolist()], dtype=torch.float64, device=spans.device
    )
    keep = (token_weight > 0).reshape(spans.shape).unsqueeze(-1)
    # Rows of weight 0 are never read (NaN there cannot leak into the gradient).
    student_logits = student_logits.masked_fill(~keep, 0.0)
    teacher_logits = teacher_logits.masked_fill(~keep, 0.0)
    rows = divergence_rows(student_logits, teacher_logits, divergence, beta, temperature)
    rows = rows.reshape(-1) * (temperature**2 if scale_t2 else 1.0)
    loss = rows.sum() * 0.0
    means = {}
    for k, w in sorted(span_weights.items()):
        if w <= 0:
            continue
        selected = rows[ids == k]
        means[k] = selected.mean() if selected.numel() else rows.new_tensor(float("nan"))
        if normalize == "span" and selected.numel():
            loss = loss + w * means[k]
    if normalize == "token":
        weight = token_weight.to(rows.dtype)
        count = int((weight > 0).sum())
        if count:
            loss = (weight * torch.where(weight > 0, rows, torch.zeros_like(rows))).sum() / count
    if return_components:
        return loss, {k: v.detach() for k, v in means.items()}
    return loss


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    divergence: str = "kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    spans: torch.Tensor | None = None,
    span_weights: dict[int, float] | None = None,
    normalize: str = "span",
    reduction: str = "mean",
    scale_t2: bool = True,
    return_components: bool = False,
):
    """Reference of :func:`kdcore.distillation_loss`, term by term."""
    valid = labels != ignore_index
    if spans is not None:
        token_weight = torch.tensor(
            [span_weights[int(i)] for i in spans.reshape(-1).tolist()], dtype=torch.float64
        ).reshape(spans.shape)
        valid = valid & (token_weight > 0)
    student_logits, teacher_logits = _zero_masked(student_logits, teacher_logits, valid)
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    ce = cross_entropy_rows(student_logits, safe).reshape(-1)
    div = divergence_rows(student_logits, teacher_logits, divergence, beta, temperature)
    div = div.reshape(-1) * (temperature**2 if scale_t2 else 1.0)
    ok = valid.reshape(-1)
    zero = torch.zeros_like(ce)
    ce, div = torch.where(ok, ce, zero), torch.where(ok, div, zero)
    if spans is None:
        if reduction == "none":
            per_row = (alpha * ce + (1 - alpha) * div).reshape(labels.shape)
            comps = {
                "ce": ce.detach().reshape(labels.shape),
                "divergence": div.detach().reshape(labels.shape),
            }
            return (per_row, comps) if return_components else per_row
        n = int(ok.sum())
        scale = 1.0 if reduction == "sum" else (1.0 / n if n else 0.0)
        ce_term, div_term = ce.sum() * scale, div.sum() * scale
        span_comps = {}
    else:
        ids = spans.reshape(-1)
        tw = token_weight.reshape(-1).to(ce.dtype)
        ce_term = div_term = ce.sum() * 0.0
        span_comps = {}
        if normalize == "span":
            for k, w in sorted(span_weights.items()):
                sel = ok & (ids == k)
                n = int(sel.sum())
                if w > 0:
                    span_comps[k] = div[sel].mean() if n else div.new_tensor(float("nan"))
                if w > 0 and n:
                    ce_term = ce_term + w * ce[sel].mean()
                    div_term = div_term + w * div[sel].mean()
        else:
            n = int((ok & (tw > 0)).sum())
            if n:
                ce_term = (tw * ce).sum() / n
                div_term = (tw * div).sum() / n
            for k, w in sorted(span_weights.items()):
                if w > 0:
                    sel = ok & (ids == k)
                    span_comps[k] = (
                        div[sel].mean() if int(sel.sum()) else div.new_tensor(float("nan"))
                    )
    loss = alpha * ce_term + (1 - alpha) * div_term
    if not return_components:
        return loss
    comps = {"ce": ce_term.detach(), "divergence": div_term.detach(), **span_comps}
    return loss, comps


def sparse_kl_rows(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    tail: str = "bucket",
) -> torch.Tensor:
    """KL from a top-k teacher to softmax(student / T) per position (see kdcore.sparse_kl_loss)."""
    log_q = log_softmax(student_logits, temperature)
    ids = teacher_ids.long()
    log_q_ids = log_q.gather(-1, ids)
    lp = teacher_logprobs.to(log_q.dtype)
    mass_tail = (1.0 - lp.exp().sum(-1)).clamp_min(0.0)
    if tail == "renormalize" or ids.shape[-1] == log_q.shape[-1]:
        # (k = V: no token outside the top-k, the missing mass is rounding noise)
        mass_tail = torch.zeros_like(mass_tail)
    ratio = teacher_temperature / temperature
    log_tail = torch.where(
        mass_tail > 0,
        ratio * mass_tail.clamp_min(1e-300).log(),
        torch.full_like(mass_tail, -math.inf),
    )
    p_all = torch.softmax(torch.cat([ratio * lp, log_tail.unsqueeze(-1)], dim=-1), dim=-1)
    p_ids, p_tail = p_all[..., :-1], p_all[..., -1]
    log_p_ids = torch.where(p_ids > 0, p_ids.clamp_min(1e-300).log(), torch.zeros_like(p_ids))
    rows = torch.where(p_ids > 0, p_ids * (log_p_ids - log_q_ids), torch.zeros_like(p_ids)).sum(-1)
    if tail == "bucket":
        outside = torch.ones_like(log_q, dtype=torch.bool).scatter(-1, ids, False)
        log_q_tail = torch.logsumexp(log_q.masked_fill(~outside, -math.inf), dim=-1)
        log_p_tail = p_tail.clamp_min(1e-300).log()
        rows = rows + torch.where(
            p_tail > 0, p_tail * (log_p_tail - log_q_tail), torch.zeros_like(p_tail)
        )
    return rows


def sparse_kl_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    tail: str = "bucket",
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    scale_t2: bool = True,
) -> torch.Tensor:
    """Reference of :func:`kdcore.sparse_kl_loss`."""
    rows = sparse_kl_rows(
        student_logits, teacher_ids, teacher_logprobs, temperature, teacher_temperature, tail
    )
    if scale_t2:
        rows = rows * temperature**2
    return reduce_rows(
        rows, labels=labels, ignore_index=ignore_index, mask=mask, reduction=reduction
    )
