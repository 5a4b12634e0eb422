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
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1]; got {self.alpha}")

        # Checked here, not at the first batch after minutes of work.
        for name in ("temperature", "teacher_temperature"):
            try:
                _validate.temperature(getattr(self, name))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{name}: {exc}") from None

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
        labels = batch["labels"][:, 1:]
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
        weights = _spans.validate_weights(self.span_weights)
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
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and detached components for full (unshifted) logits.

        ``totals``: the denominators of the whole optimizer step
        (:meth:`counts` summed over its micro-batches and ranks); the loss
        and every component are then this batch's share of the step's values
        (they sum to them). None: this batch's own counts (its mean loss).
        """
        student = logits[:, :-1]
        labels = batch["labels"][:, 1:]
        if teacher is not None:
            teacher = teacher[:, :-1]
        elif self.mode in ("token", "span") and self.alpha == 1.0:
            teacher = student.detach()  # the divergence has weight 0: CE alone, span-weighted
        if callable(self.mode):
            out = self.mode(student, teacher, batch)
            return out if isinstance(out, tuple) else (out, {})
        spans = None
        if self.mode == "span":
            if batch.get("spans") is None:
                raise KeyError("loss='span' needs batch['spans'] (span ids per token)")
            spans = _spans.validate_spans(batch["spans"][:, 1:], labels.shape, student)
            _spans.check_ids_have_weights(spans, _spans.validate_weights(self.span_weights))
        if totals is None:
            totals = self.counts(batch)
        scale = self.row_scale(labels, spans, totals.to(labels.device))
        if self.mode == "sft":
            safe = torch.where(labels != self.ignore_index, labels, 0)
            ce_rows = F.cross_entropy(
                student.reshape(-1, student.shape[-1]).float(), safe.reshape(-1), reduction="none"
            )
            ce = (ce_rows * scale.reshape(-1)).sum()
            return ce, {"ce": ce.detach()}
        if "teacher_ids" in batch:
            div_rows = self._sparse_rows(student, scale, batch)
            ce_rows = None
            if self.alpha > 0:
                safe = torch.where(labels != self.ignore_index, labels, 0)
                ce_rows = F.cross_entropy(
                    student.reshape(-1, student.shape[-1]).float(), safe.reshape(-1),
                    reduction="none",
                ).reshape(labels.shape)  # fmt: skip
                rows = (1.0 - self.alpha) * div_rows + self.alpha * ce_rows
            else:
                rows = (1.0 - self.alpha) * div_rows
        else:
            if teacher is None:
                raise ValueError(
                    f"loss={self.mode!r} needs a teacher model, batch['teacher_logits'] or a "
                    "stored top-k teacher (batch['teacher_ids'] and batch['teacher_logprobs'])"
                )
            rows, parts = distillation_loss(
                student, teacher, labels, alpha=self.alpha, temperature=self.temperature,
                divergence=self.divergence, beta=self.beta, ignore_index=self.ignore_index,
                reduction="none", return_components=True,
            )  # fmt: skip
            div_rows, ce_rows = parts["divergence"], parts["ce"]
        loss = (rows * scale).sum()
        dense = "teacher_ids" not in batch
        return loss, self._components(div_rows, ce_rows, scale, spans, totals, dense)

    def _components(self, div_rows, ce_rows, scale, spans, totals, dense: bool) -> dict:
        """Detached shares of the step's CE, divergence and per-span mean divergences
        (NaN for a term of weight 0 or a span without tokens in the step)."""
        nan = torch.full((), math.nan, dtype=torch.float32, device=scale.device)

        def share(rows, weight):
            if weight == 0 or rows is None:
                return nan
            return torch.where(scale > 0, rows.detach().float() * scale, 0.0).sum()

        comps: dict = {"divergence": share(div_rows, 1.0 - self.alpha)}
        if dense or self.alpha > 0:  # a dense loss reports both terms
            comps["ce"] = share(ce_rows, self.alpha)
        if spans is None:
            return comps
        _, index = self._span_index(spans)
        scored = scale.reshape(-1) > 0  # labelled rows of a span of positive weight
        for k, w in sorted(_spans.validate_weights(self.span_weights).items()):
            if w <= 0:
                continue
            n = totals[k] if k < totals.numel() - 1 else totals.new_zeros(())
            if self.alpha == 1.0 or n <= 0:
                comps[_spans.span_name(k)] = nan
                continue
            sel = (index == k) & scored
            d = div_rows.detach().reshape(-1).double()
            comps[_spans.span_name(k)] = (torch.where(sel, d, 0.0).sum() / n).float()
        return comps

    def _sparse_rows(self, student, scale, batch) -> torch.Tensor:
        """Per-row sparse KL (T² included) against the stored top-k teacher."""
        if self.divergence != "kl":
            raise ValueError(
                f"a stored top-k teacher trains with divergence='kl'; got {self.divergence!r}"
            )
        ids = batch["teacher_ids"][:, :-1]
        logprobs = batch["teacher_logprobs"][:, :-1]
        return sparse_kl_loss(
            student, ids, logprobs, temperature=self.temperature,
            teacher_temperature=self.teacher_temperature, tail=self.tail,
            mask=(scale > 0), reduction="none",
        )  # fmt: skip
