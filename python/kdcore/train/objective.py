"""What a Distiller minimises: one batch's logits -> (loss, components).

Batches follow the Hugging Face convention: ``labels`` (and ``spans``) are
aligned with ``input_ids`` and the loss shifts by one, so the logits at
position i are scored against token i + 1. A teacher's logits (computed or
stored in the batch as ``teacher_logits``) and a stored top-k teacher
(``teacher_ids`` / ``teacher_logprobs``) are aligned with the logits: entry i
is the teacher's distribution for token i + 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import _validate
from .. import spans as _spans
from ..ops.distillation import distillation_loss
from ..ops.sparse import sparse_kl_loss

MODES = ("span", "token", "sft")

# (student_logits, teacher_logits or None, batch) -> loss or (loss, components)
LossFn = Callable[[torch.Tensor, "torch.Tensor | None", Mapping], object]


@dataclass(frozen=True)
class Objective:
    """The loss of a Distiller, with its arguments spelled out.

    - ``"sft"``: hard-label cross-entropy on ``labels`` (no teacher).
    - ``"token"``: ``alpha * CE + (1 - alpha) * T² * D`` averaged over every
      labelled token alike (:func:`kdcore.distillation_loss`; ``span_weights``
      and ``normalize`` are not used).
    - ``"span"``: the same with per-span weights and normalisation from the
      batch's ``spans`` (``normalize="span"``: each span type averaged over
      its own tokens, then weighted).
    - a callable ``fn(student_logits, teacher_logits, batch)`` returning the
      loss or ``(loss, components)``; it receives the logits without their
      last position (``logits[:, :-1]``, each row predicting the next token)
      and the batch as given: shift ``batch["labels"]`` / ``batch["spans"]``
      with ``[:, 1:]`` to align them.

    With a stored top-k teacher in the batch the divergence is
    :func:`kdcore.sparse_kl_loss` (``tail``, ``teacher_temperature``) under
    the same row weights; ``divergence`` must then be ``"kl"``.
    """

    mode: str | LossFn = "span"
    alpha: float = 0.0
    temperature: float = 1.0
    divergence: str = "kl"
    beta: float = 0.5
    span_weights: Mapping[int, float] | None = None
    normalize: str = "span"
    ignore_index: int = -100
    tail: str = "bucket"
    teacher_temperature: float = 1.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not callable(self.mode) and self.mode not in MODES:
            raise ValueError(
                f"loss must be one of {', '.join(MODES)} or a callable; got {self.mode!r}"
            )
        # Checked here, not at the first batch after minutes of work.
        _validate.loss_options(
            alpha=self.alpha,
            temperature=self.temperature,
            divergence=self.divergence,
            beta=self.beta,
            span_weights=self.span_weights,
            normalize=self.normalize,
            ignore_index=self.ignore_index,
            tail=self.tail,
            teacher_temperature=self.teacher_temperature,
        )

    @property
    def needs_teacher(self) -> bool:
        return self.mode != "sft" and not (self.mode in MODES and self.alpha == 1.0)

    def counts(self, batch: Mapping) -> torch.Tensor | None:
        """This batch's share of the loss's denominators (float64, summable over
        micro-batches and ranks), or None for a callable loss.

        ``"sft"`` / ``"token"``: one slot, the labelled tokens. ``"span"``: the
        labelled tokens of each span id (slots ``0 .. max id``, then one for ids
        without a weight), then the labelled tokens of positive weight.
        """
        if callable(self.mode):
            return None
        labels = _validate.comparable_labels(batch["labels"][:, 1:])
        valid = labels != self.ignore_index
        if self.mode != "span":
            return valid.sum(dtype=torch.float64).reshape(1)
        if batch.get("spans") is None:
            raise KeyError("loss='span' needs batch['spans'] (span ids per token)")
        table, index = self._span_index(batch["spans"][:, 1:])
        present = valid.reshape(-1).to(torch.float64)
        per_span = torch.zeros(table.numel(), dtype=torch.float64, device=labels.device)
        per_span.index_add_(0, index, present)
        positive = ((table[index] > 0) & valid.reshape(-1)).sum(dtype=torch.float64)
        return torch.cat([per_span, positive.reshape(1)])

    def _span_index(self, spans: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight per slot (float64), slot per row): ids without a weight use the last slot."""
        weights = _validate.span_weights(self.span_weights)
        size = max(weights) + 1
        table = torch.zeros(size + 1, dtype=torch.float64, device=spans.device)
        table[list(weights)] = torch.tensor(
            list(weights.values()), dtype=torch.float64, device=spans.device
        )
        ids = spans.reshape(-1).long()
        return table, torch.where((ids >= 0) & (ids < size), ids, size)

    def row_scale(
        self, labels: torch.Tensor, spans: torch.Tensor | None, totals: torch.Tensor
    ) -> torch.Tensor:
        """The weight of each row's loss (float32, labels' shape) given the
        denominators ``totals`` (:meth:`counts` summed over the optimizer step)."""
        valid = labels.reshape(-1) != self.ignore_index
        if spans is None:
            c = valid.to(torch.float64) / totals[0].clamp_min(1.0)
        else:
            table, index = self._span_index(spans)
            w_tok = table[index] * valid
            if self.normalize == "span":
                c = w_tok / totals[:-1].clamp_min(1.0)[index]
            else:
                c = w_tok / totals[-1].clamp_min(1.0)
        return c.to(torch.float32).reshape(labels.shape)

    def __call__(
        self,
        logits: torch.Tensor,
        teacher: torch.Tensor | None,
        batch: Mapping,
        totals: torch.Tensor | None = None,
        scale: float = 1.0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and detached components for full (unshifted) logits.

        ``totals``: the denominators of the whole optimizer step
        (:meth:`counts` summed over its micro-batches and ranks); the loss
        and every component are then this batch's share of the step's values
        (they sum to them). None: this batch's own counts (its mean loss).
        ``scale`` multiplies the loss (not the components) inside the row
        weights, so the kernels' gradients need no second pass.
        """
        student = logits[:, :-1]
        labels = _validate.comparable_labels(batch["labels"][:, 1:])
        if teacher is not None:
            teacher = teacher[:, :-1]
        elif self.mode in ("token", "span") and self.alpha == 1.0:
            teacher = student.detach()  # the divergence has weight 0: CE alone, span-weighted
        if callable(self.mode):
            out = self.mode(student, teacher, batch)
            loss, comps = out if isinstance(out, tuple) else (out, {})
            return (loss * scale if scale != 1.0 else loss), comps
        spans = None
        if self.mode == "span":
            if batch.get("spans") is None:
                raise KeyError("loss='span' needs batch['spans'] (span ids per token)")
            spans = _validate.span_ids(batch["spans"][:, 1:], labels.shape, student)
            _validate.span_ids_have_weights(spans, _validate.span_weights(self.span_weights))
        local = self.counts(batch)
        totals = local if totals is None else totals.to(local.device)
        if self.mode == "sft":
            safe = torch.where(labels != self.ignore_index, labels, 0)
            ce_rows = F.cross_entropy(
                student.reshape(-1, student.shape[-1]).float(), safe.reshape(-1), reduction="none"
            )
            ce = (ce_rows * self.row_scale(labels, None, totals).reshape(-1)).sum()
            return ce * scale if scale != 1.0 else ce, {"ce": ce.detach()}
        if "teacher_ids" in batch:
            return self._sparse(student, labels, spans, totals, scale, batch)
        if teacher is None:
            raise ValueError(
                f"loss={self.mode!r} needs a teacher model, batch['teacher_logits'] or a "
                "stored top-k teacher (batch['teacher_ids'] and batch['teacher_logprobs'])"
            )
        return self._dense(student, teacher, labels, spans, local, totals, scale)

    def _slot_weights(self, totals: torch.Tensor) -> dict[int, float]:
        """The weight of one row of each slot (span id; 0 without spans) in the step."""
        if self.mode != "span":
            return {0: 1.0 / max(float(totals[0]), 1.0)}
        weights = _validate.span_weights(self.span_weights)
        if self.normalize == "span":
            return {k: w / max(float(totals[k]), 1.0) for k, w in weights.items()}
        return {k: w / max(float(totals[-1]), 1.0) for k, w in weights.items()}

    def _dense(self, student, teacher, labels, spans, local, totals, scale):
        """distillation_loss with the step's row weights inside the kernel: a
        slot's span weight becomes (its row weight) × (its rows here), which
        the per-span normalisation divides back by the rows here."""
        per_row = self._slot_weights(totals)
        here = {k: float(local[k]) if spans is not None else float(local[0]) for k in per_row}
        kernel_weights = {k: scale * c * here[k] for k, c in per_row.items()}
        ids = spans if spans is not None else torch.zeros_like(labels)
        loss, parts = distillation_loss(
            student,
            teacher,
            labels,
            alpha=self.alpha,
            temperature=self.temperature,
            divergence=self.divergence,
            beta=self.beta,
            ignore_index=self.ignore_index,
            spans=ids,
            span_weights=kernel_weights,
            normalize="span",
            return_components=True,
        )
        comps = {"ce": parts["ce"] / scale, "divergence": parts["divergence"] / scale}
        if spans is None:
            return loss, comps
        nan = torch.full((), math.nan, dtype=torch.float32, device=student.device)
        for k, w in sorted(_validate.span_weights(self.span_weights).items()):
            if w <= 0:
                continue
            name = _spans.span_name(k)
            if self.alpha == 1.0 or float(totals[k]) <= 0:
                comps[name] = nan  # not computed, or no such tokens in the whole step
            elif here[k] == 0:
                comps[name] = torch.zeros((), dtype=torch.float32, device=student.device)
            else:  # this batch's mean -> its share of the step's mean
                comps[name] = parts[name] * (here[k] / float(totals[k]))
        return loss, comps

    def _sparse(self, student, labels, spans, totals, scale, batch):
        """Per-row sparse KL (T² included) against the stored top-k teacher,
        weighted here by the step's row weights (for the CE term too)."""
        if self.divergence != "kl":
            raise ValueError(
                f"a stored top-k teacher trains with divergence='kl'; got {self.divergence!r}"
            )
        w_row = self.row_scale(labels, spans, totals)
        rows = sparse_kl_loss(
            student,
            batch["teacher_ids"][:, :-1],
            batch["teacher_logprobs"][:, :-1],
            temperature=self.temperature,
            teacher_temperature=self.teacher_temperature,
            tail=self.tail,
            mask=(w_row > 0),
            reduction="none",
        )
        div = torch.where(w_row > 0, rows * w_row, 0.0).sum()
        comps: dict = {"divergence": div.detach()}
        loss = (1.0 - self.alpha) * div
        if self.alpha > 0:
            safe = torch.where(labels != self.ignore_index, labels, 0)
            ce_rows = F.cross_entropy(
                student.reshape(-1, student.shape[-1]).float(), safe.reshape(-1), reduction="none"
            )
            ce = (ce_rows * w_row.reshape(-1)).sum()
            comps["ce"] = ce.detach()
            loss = loss + self.alpha * ce
        if spans is not None:
            _, index = self._span_index(spans)
            scored = w_row.reshape(-1) > 0
            d = rows.detach().reshape(-1).double()
            for k, w in sorted(_validate.span_weights(self.span_weights).items()):
                if w > 0:
                    n = float(totals[k])
                    share = torch.where((index == k) & scored, d, 0.0).sum() / n if n > 0 else None
                    comps[_spans.span_name(k)] = (
                        share.float() if share is not None else torch.tensor(math.nan)
                    )
        return (loss * scale if scale != 1.0 else loss), comps
