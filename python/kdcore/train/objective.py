"""What a Distiller minimises: one batch's logits -> (loss, components).

Batches follow the Hugging Face convention: ``labels`` (and ``spans``) are
aligned with ``input_ids`` and the loss shifts by one, so the logits at
position i are scored against token i + 1. A teacher's logits (computed or
stored in the batch as ``teacher_logits``) and a stored top-k teacher
(``teacher_ids`` / ``teacher_logprobs``) are aligned with the logits: entry i
is the teacher's distribution for token i + 1.
"""

from __future__ import annotations

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

    def __call__(
        self, logits: torch.Tensor, teacher: torch.Tensor | None, batch: Mapping
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and detached components for full (unshifted) logits."""
        student = logits[:, :-1]
        labels = _validate.comparable_labels(batch["labels"][:, 1:])
        if teacher is not None:
            teacher = teacher[:, :-1]
        elif self.mode in ("token", "span") and self.alpha == 1.0:
            teacher = student.detach()  # the divergence has weight 0: CE alone, span-weighted
        if callable(self.mode):
            out = self.mode(student, teacher, batch)
            return out if isinstance(out, tuple) else (out, {})
        if self.mode == "sft":
            ce = F.cross_entropy(
                student.reshape(-1, student.shape[-1]).float(), labels.reshape(-1),
                ignore_index=self.ignore_index,
            )  # fmt: skip
            return ce, {"ce": ce.detach()}
        spans = None
        if self.mode == "span":
            if batch.get("spans") is None:
                raise KeyError("loss='span' needs batch['spans'] (span ids per token)")
            spans = batch["spans"][:, 1:]
        if "teacher_ids" in batch:
            return self._sparse(student, labels, spans, batch)
        if teacher is None:
            raise ValueError(
                f"loss={self.mode!r} needs a teacher model, batch['teacher_logits'] or a stored "
                "top-k teacher (batch['teacher_ids'] and batch['teacher_logprobs'])"
            )
        loss, comps = distillation_loss(
            student, teacher, labels, alpha=self.alpha, temperature=self.temperature,
            divergence=self.divergence, beta=self.beta, ignore_index=self.ignore_index,
            spans=spans, span_weights=self.span_weights if spans is not None else None,
            normalize=self.normalize, return_components=True,
        )  # fmt: skip
        return loss, comps

    def _sparse(self, student, labels, spans, batch) -> tuple[torch.Tensor, dict]:
        if self.divergence != "kl":
            raise ValueError(
                f"a stored top-k teacher trains with divergence='kl'; got {self.divergence!r}"
            )
        ids = batch["teacher_ids"][:, :-1]
        logprobs = batch["teacher_logprobs"][:, :-1]
        valid = labels != self.ignore_index
        dtype = torch.float32
        index = weights = None
        if spans is not None:
            weights = _spans.validate_weights(self.span_weights)
            _spans.check_ids_have_weights(spans, weights)
            w_row, index = _spans.row_weights(
                spans, weights, self.normalize, 1.0, dtype, valid=valid
            )
        else:
            w_row = (valid.to(dtype) / valid.sum().clamp_min(1)).reshape(-1)
        mask = w_row.reshape(valid.shape)
        # Per-row sparse KL (T² included), weighted here: the row weights carry the
        # normalisation, for the CE term too (as in distillation_loss with spans).
        rows = sparse_kl_loss(
            student, ids, logprobs, temperature=self.temperature,
            teacher_temperature=self.teacher_temperature, tail=self.tail,
            mask=(mask > 0), reduction="none",
        )  # fmt: skip
        div = (rows * mask).sum()
        comps: dict = {"divergence": div.detach()}
        if index is not None:
            comps.update(_spans.span_means((rows * mask).reshape(-1), w_row, index, weights))
        loss = (1.0 - self.alpha) * div
        if self.alpha > 0:
            safe = torch.where(valid, labels, torch.zeros_like(labels))
            ce_rows = F.cross_entropy(
                student.reshape(-1, student.shape[-1]).float(), safe.reshape(-1), reduction="none"
            )
            ce = (ce_rows * w_row).sum()
            comps["ce"] = ce.detach()
            loss = loss + self.alpha * ce
        return loss, comps
