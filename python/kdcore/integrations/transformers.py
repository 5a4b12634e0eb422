"""``KDTrainer``: a ``transformers.Trainer`` for off-policy distillation on
encoded agent trajectories, with kdcore's fused loss on the hidden states.

>>> from kdcore.integrations.transformers import KDTrainer
>>> trainer = KDTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
...                     train_dataset=encoded, span_weights={Span.REASON: 1.0, Span.ACT: 2.0})
>>> trainer.train()

Items hold ``input_ids``, ``labels`` and ``spans`` (kdcore.agent's
``Encoded.to_dict()``, aligned: the loss shifts by one) and optionally a
stored top-k teacher (``teacher_ids`` / ``teacher_logprobs`` from
``kdcore.offline.TopKDataset(..., inputs=items)``) instead of a teacher model.
Checkpoints, resuming, logging (``report_to``) and distributed launch are the
Trainer's own. See docs/integrations.md.
"""

from __future__ import annotations

import functools
import inspect
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch

from .. import _validate
from .._extras import require
from ..agent.collate import collate
from ..spans import span_name
from ..train.objective import Objective
from ._heads import check_pair, check_vocab_sizes, output_head, require_head
from ._rows import summed_loss

_transformers = require("transformers", extra="hf", feature="kdcore.integrations.transformers")

__all__ = ["KDTrainer"]

#: The columns a batch of encoded trajectories carries (kept by the Trainer).
COLUMNS = ("input_ids", "labels", "spans", "attention_mask", "teacher_ids", "teacher_logprobs")


def _backbone(model: Any) -> Any:
    """The module whose output is the last hidden state (before the head)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, "base_model", None)
    if backbone is None or backbone is base:
        raise ValueError(
            f"{type(base).__name__} has no separate backbone (model.base_model is the model "
            "itself), so its last hidden state cannot be read before the head; use a "
            "transformers causal LM (AutoModelForCausalLM)"
        )
    return backbone


class KDTrainer(_transformers.Trainer):
    """``transformers.Trainer`` whose loss is kdcore's fused linear distillation loss.

    Keyword arguments beyond the Trainer's: ``teacher_model`` (a causal LM
    with the student's vocabulary; None when the dataset carries a stored
    top-k teacher), ``temperature``, ``divergence`` (``"kl"``,
    ``"reverse_kl"``, ``"jsd"``, ...), ``beta``, ``alpha`` (weight of the
    hard-label cross-entropy), ``scale_t2``, ``span_weights`` (None: every
    labelled token alike; a mapping ``{kdcore.Span: weight}``: span-level
    distillation), ``normalize`` (``"span"`` or ``"token"``, as in
    :func:`kdcore.span_loss`), ``teacher_temperature`` and ``tail`` (stored
    top-k teacher). The loss of an optimizer step is that of its whole batch
    (all micro-batches and ranks: the span form of ``num_items_in_batch``).
    ``data_collator`` defaults to :func:`kdcore.agent.collate` with the
    tokenizer's pad id. Logged metrics add ``span_loss/<span>``.
    """

    # The loss is normalised by the step's token counts: no further division
    # by the accumulation steps.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: Any = None,
        args: Any = None,
        *,
        teacher_model: Any = None,
        temperature: float = 1.0,
        divergence: str = "kl",
        beta: float = 0.5,
        alpha: float = 0.0,
        scale_t2: bool = True,
        span_weights: Mapping[int, float] | None = None,
        normalize: str = "span",
        teacher_temperature: float = 1.0,
        tail: str = "bucket",
        data_collator: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        self.kd_objective = Objective(
            mode="token" if span_weights is None else "span",
            alpha=alpha,
            temperature=temperature,
            divergence=divergence,
            beta=beta,
            span_weights=span_weights,
            normalize=normalize,
            teacher_temperature=teacher_temperature,
            tail=tail,
        )
        self.kd_scale_t2 = bool(scale_t2)
        if model is None:
            raise ValueError("KDTrainer needs model= (the student, a causal LM)")
        require_head(model, "student")
        _backbone(model)
        if teacher_model is not None:
            require_head(teacher_model, "teacher")
            _backbone(teacher_model)
            check_vocab_sizes(model, teacher_model)
        if data_collator is None:
            pad = getattr(processing_class, "pad_token_id", None)
            data_collator = functools.partial(collate, pad_id=0 if pad is None else pad)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            processing_class=processing_class,
            **kwargs,
        )
        self.teacher_model = None
        if teacher_model is not None:
            teacher_model.requires_grad_(False)
            self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        self._kd_totals: torch.Tensor | None = None
        self._kd_metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(COLUMNS)

    # -- the step's denominators ---------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._kd_totals = None
        if batches:
            totals = sum(self.kd_objective.counts(b) for b in batches).to(device)
            if self.args.world_size > 1:
                totals = self.accelerator.gather(totals.reshape(1, -1)).sum(0)
            self._kd_totals = totals
        return batches, num_items_in_batch

    # -- the loss -------------------------------------------------------------

    def _last_hidden(self, model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The backbone's last hidden state, read by a hook while the model runs
        through its wrapper (DDP / FSDP see an ordinary forward); the head
        computes one position's logits at most (``logits_to_keep=1``)."""
        unwrapped = self.accelerator.unwrap_model(model)
        captured: list[torch.Tensor] = []

        def keep(_module, _args, output):
            hidden = getattr(output, "last_hidden_state", None)
            captured.append(output[0] if hidden is None else hidden)

        inputs = {"input_ids": batch["input_ids"], "use_cache": False}
        if "attention_mask" in batch:
            inputs["attention_mask"] = batch["attention_mask"].long()
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        if "logits_to_keep" in inspect.signature(base.forward).parameters:
            inputs["logits_to_keep"] = 1
        handle = _backbone(unwrapped).register_forward_hook(keep)
        try:
            model(**inputs)
        finally:
            handle.remove()
        return captured[-1]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        objective = self.kd_objective
        labels = inputs["labels"][:, 1:]
        valid = (labels != objective.ignore_index).reshape(-1)
        spans = None
        if objective.mode == "span":
            if inputs.get("spans") is None:
                raise KeyError(
                    "span_weights needs batch['spans'] (span ids per token, e.g. from "
                    "kdcore.agent.encode_chat)"
                )
            spans = _validate.span_ids(inputs["spans"][:, 1:], labels.shape, labels)
            _validate.span_ids_have_weights(spans, _validate.span_weights(objective.span_weights))
            spans = spans.reshape(-1)
        student_model = self.accelerator.unwrap_model(model)
        h_s = self._last_hidden(model, inputs)[:, :-1]
        s_head = output_head(student_model, "student", h_s.dtype)
        h_s = h_s.reshape(-1, h_s.shape[-1])
        options: dict[str, Any] = {
            "divergence": objective.divergence,
            "beta": objective.beta,
            "temperature": objective.temperature,
            "alpha": objective.alpha,
            "scale_t2": self.kd_scale_t2,
        }
        teacher: dict[str, Any] = {}
        if "teacher_ids" in inputs:
            k = inputs["teacher_ids"].shape[-1]
            teacher["teacher_topk"] = (
                inputs["teacher_ids"][:, :-1].reshape(-1, k),
                inputs["teacher_logprobs"][:, :-1].reshape(-1, k),
            )
            options["teacher_temperature"] = objective.teacher_temperature
            options["tail"] = objective.tail
        elif self.teacher_model is not None:
            with torch.no_grad():
                h_t = self._last_hidden(self.teacher_model, inputs)[:, :-1]
            t_head = output_head(
                self.accelerator.unwrap_model(self.teacher_model), "teacher", h_t.dtype
            )
            check_pair(s_head, t_head)
            teacher = {"teacher_hidden": h_t.reshape(-1, h_t.shape[-1]), "teacher": t_head}
        else:
            raise ValueError(
                "KDTrainer has no teacher: pass teacher_model=, or train on items that carry a "
                "stored top-k teacher (kdcore.offline.TopKDataset(dir, inputs=items))"
            )
        flat_labels = labels.reshape(-1)
        local = objective.counts(inputs).to(h_s.device)
        training = model.training and self._kd_totals is not None
        totals = self._kd_totals.to(local.device) if training else local
        share = self.accelerator.num_processes if training else 1
        per_row = objective._slot_weights(totals)  # a row's weight in the step, per slot

        def part(rows: torch.Tensor) -> torch.Tensor:
            return summed_loss(h_s, s_head, rows, labels=flat_labels, **teacher, **options)

        mode = "train" if model.training else "eval"
        if spans is None:
            loss = part(valid) * (per_row[0] * share)
        else:
            loss = h_s.new_zeros(())
            for k, row_weight in sorted(per_row.items()):
                if row_weight == 0:
                    continue  # never read: no loss, no gradient
                rows = valid & (spans == k)
                s_k = part(rows)
                loss = loss + s_k * (row_weight * share)
                n = int(rows.sum())
                if n:
                    name = getattr(span_name(k), "name", str(k)).lower()
                    self._kd_metrics[mode][f"span_loss/{name}"].append(float(s_k.detach()) / n)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs).detach()
        return loss, None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for key, values in self._kd_metrics[mode].items():
            if values:
                logs[prefix + key] = sum(values) / len(values)
        self._kd_metrics[mode].clear()
        super().log(logs, start_time)
