"""TRL's on-policy ``DistillationTrainer`` with kdcore's fused loss and span weights.

>>> from kdcore.integrations.trl import DistillationTrainer
>>> trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config,
...                               train_dataset=prompts, processing_class=tokenizer)

Same arguments and ``trl.DistillationConfig`` as ``trl.DistillationTrainer``;
the student generates, the teacher scores the same tokens, and the loss is
kdcore's fused linear loss on both models' last hidden states and output
heads. ``span_weights=None`` is TRL's objective (the generalized JSD of
``args.beta`` at ``args.temperature``, tool results excluded, summed over the
completion tokens and divided by ``num_items_in_batch``). A mapping
``{Span: weight}`` weights the student's own trajectory by span: tool-call
tokens ACT, tool results OBSERVATION, the rest of the completion REASON;
``normalize`` as in :func:`kdcore.span_loss`. See docs/integrations.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from .. import _validate
from .._extras import require
from ..agent.chat_format import ChatFormat
from ..agent.completion import completion_spans
from ..spans import DEFAULT_SPAN_WEIGHTS, NORMALIZE, Span, span_name
from ._heads import check_pair, divergence_of_beta, output_head, require_head
from ._rows import summed_loss

_trl = require("trl", extra="hf", feature="kdcore.integrations.trl")

__all__ = ["DistillationTrainer"]

#: The TRL release line this subclass was written and tested against: it
#: overrides TRL's internal hooks (completion scoring, the last hidden state,
#: the wrapped forward, the metrics store), which a later release may change.
TESTED_TRL = "1.16"


def untested_trl_warning(version: str) -> str | None:
    """The warning for a TRL ``version`` outside the tested release line, else None."""
    if version == TESTED_TRL or version.startswith(TESTED_TRL + "."):
        return None
    return (
        f"kdcore.integrations.trl was tested with trl {TESTED_TRL}.x and overrides its "
        f"internal hooks; trl {version} is installed. Check that the first logged loss "
        "with span_weights=None equals trl.DistillationTrainer's on the same seed, or "
        f'install "trl=={TESTED_TRL}.*".'
    )


_untested = untested_trl_warning(getattr(_trl, "__version__", "unknown"))
if _untested is not None:
    warnings.warn(_untested, UserWarning, stacklevel=2)

#: The spans an on-policy completion is split into.
_COMPLETION_SPANS = (int(Span.REASON), int(Span.ACT), int(Span.OBSERVATION))


def _span_weights(span_weights: Mapping[int, float] | None) -> dict[int, float] | None:
    if span_weights is None:
        return None
    given = _validate.span_weights(span_weights)
    weights = {k: DEFAULT_SPAN_WEIGHTS.get(k, 0.0) for k in _COMPLETION_SPANS}
    weights.update(given)
    if not any(weights[k] > 0 for k in _COMPLETION_SPANS):
        raise ValueError(
            f"span_weights {given} gives no completion span (REASON, ACT, OBSERVATION) a "
            "positive weight: nothing would be learned"
        )
    return weights


class DistillationTrainer(_trl.DistillationTrainer):
    """``trl.DistillationTrainer`` whose loss is kdcore's fused linear loss.

    Extra keyword arguments: ``span_weights`` (None: TRL's loss; a mapping
    ``{kdcore.Span: weight}``: span-level distillation, spans not given take
    :data:`kdcore.DEFAULT_SPAN_WEIGHTS`), ``normalize`` (``"span"``: each span
    averaged over its own tokens, then weighted; ``"token"``: weighted tokens
    averaged together) and ``chat_format`` (a :class:`kdcore.agent.ChatFormat`
    whose ``tool_call_open`` / ``tool_call_close`` tags mark tool calls in the
    generated text; default ``<tool_call>`` / ``</tool_call>``).

    Logged metrics: TRL's (except ``entropy``, which this loss does not
    compute) and, with span weights, ``span_loss/<span>``: the mean
    divergence over that span's tokens.
    """

    def __init__(
        self,
        *args: Any,
        span_weights: Mapping[int, float] | None = None,
        normalize: str = "span",
        chat_format: ChatFormat | None = None,
        **kwargs: Any,
    ) -> None:
        self.kd_span_weights = _span_weights(span_weights)
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be 'span' or 'token', got {normalize!r}")
        if chat_format is not None and not isinstance(chat_format, ChatFormat):
            raise TypeError(
                f"chat_format must be a kdcore.agent.ChatFormat, got {type(chat_format).__name__}"
            )
        self.kd_normalize = normalize
        self.kd_chat_format = chat_format or ChatFormat()
        super().__init__(*args, **kwargs)
        require_head(self.accelerator.unwrap_model(self.model), "student")
        if self.teacher_model is not None:
            require_head(self.accelerator.unwrap_model(self.teacher_model), "teacher")

    # -- spans of the generated completions ---------------------------------

    @property
    def _kd_span_ids(self) -> list[int]:
        return sorted(self.kd_span_weights or {})

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        out = super()._generate_and_score_completions(inputs)
        if self.kd_span_weights is None:
            return out
        ids, mask = out["completion_ids"], out["completion_mask"].bool()
        tool_mask = out.get("tool_mask")
        spans = torch.zeros_like(ids)  # padding: PROMPT, never scored
        for b in range(ids.shape[0]):
            n = int(mask[b].sum())
            row = ids[b, :n].tolist()
            pieces = self._tokenizer.batch_decode(
                [[t] for t in row], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            tools = None if tool_mask is None else tool_mask[b, :n].tolist()
            spans[b, :n] = torch.tensor(completion_spans(pieces, tools, self.kd_chat_format))
        # Each span's token count over the whole generation batch, on every rank:
        # the denominators of the span means (the span form of num_items_in_batch).
        counts = torch.stack([((spans == k) & mask).sum() for k in self._kd_span_ids])
        counts = self.accelerator.gather(counts.reshape(1, -1)).reshape(-1, counts.numel()).sum(0)
        out["kd_spans"] = spans
        out["kd_span_counts"] = counts.reshape(1, -1).expand(ids.shape[0], -1).clone()
        return out

    # -- the loss -----------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # As TRL: the token count comes from the generated completions (the
        # dataloader's labels know nothing of them), divided by the process
        # count because DDP averages the gradients.
        global_counts, processes = None, 1
        if self.model.training and inputs.get("num_items_in_batch") is not None:
            processes = self.accelerator.num_processes
            num_items_in_batch = inputs["num_items_in_batch"].clamp(min=1.0) / processes
            if "kd_span_counts" in inputs:
                global_counts = inputs["kd_span_counts"][0].to(torch.float64)
        unwrapped = self.accelerator.unwrap_model(model)
        loss, sums, counts = self._forward_redirection(
            model,
            unwrapped,
            self._kd_loss,
            unwrapped,
            inputs,
            num_items_in_batch,
            global_counts,
            processes,
        )
        if sums.numel():
            # Gathered after the wrapped forward (no collective inside it).
            mode = "train" if self.model.training else "eval"
            sums = self.accelerator.gather_for_metrics(sums.reshape(1, -1)).sum(0)
            counts = self.accelerator.gather_for_metrics(counts.reshape(1, -1)).sum(0)
            for k, s, c in zip(self._kd_span_ids, sums.tolist(), counts.tolist(), strict=True):
                if c > 0 and self.kd_span_weights[k] > 0:
                    name = getattr(span_name(k), "name", str(k)).lower()
                    self._metrics[mode][f"span_loss/{name}"].append(s / c)
        return (loss, None) if return_outputs else loss

    def _hidden_states(self, unwrapped_student, inputs):
        """(student, teacher) last hidden states of the completion positions, (B, C, H)."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        keep = inputs["completion_ids"].size(1)
        multimodal = {
            k: inputs[k]
            for k in (
                "pixel_values",
                "image_grid_thw",
                "pixel_attention_mask",
                "spatial_shapes",
                "image_sizes",
                "token_type_ids",
                "mm_token_type_ids",
                "image_position_ids",
            )
            if k in inputs
        }
        student = self._get_last_hidden_state(
            unwrapped_student, input_ids, attention_mask, keep, **multimodal
        )
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():  # through the teacher's wrapper: FSDP gathers its shards
            teacher = self._forward_redirection(
                self.teacher_model,
                unwrapped_teacher,
                self._get_last_hidden_state,
                unwrapped_teacher,
                input_ids,
                attention_mask,
                keep,
                **multimodal,
            )
        return student, teacher, unwrapped_teacher

    def _kd_loss(self, unwrapped_student, inputs, num_items_in_batch, global_counts, processes):
        """(loss, per-span divergence sums, per-span token counts); the last two
        are empty without span weights. With ``global_counts`` (each span's
        tokens in the generation batch, all ranks) a span's sum is divided by
        its global count over ``processes``: summed over the micro-batches and
        averaged by DDP, the step's loss is the span means of the whole batch."""
        h_s, h_t, unwrapped_teacher = self._hidden_states(unwrapped_student, inputs)
        s_head = output_head(unwrapped_student, "student", h_s.dtype)
        t_head = output_head(unwrapped_teacher, "teacher", h_t.dtype)
        check_pair(s_head, t_head)
        divergence, beta = divergence_of_beta(self.beta)
        options = {
            "divergence": divergence,
            "beta": beta,
            "temperature": self.temperature,
            "scale_t2": False,  # TRL's divergence has no T² factor
        }
        h_s = h_s.reshape(-1, h_s.shape[-1])
        h_t = h_t.reshape(-1, h_t.shape[-1])
        completion = inputs["completion_mask"].reshape(-1) != 0
        empty = h_s.new_zeros(0, dtype=torch.float64)

        def part(rows: torch.Tensor) -> torch.Tensor:
            return summed_loss(h_s, s_head, rows, teacher_hidden=h_t, teacher=t_head, **options)

        if self.kd_span_weights is None:
            rows = completion
            if "tool_mask" in inputs:
                rows = rows & (inputs["tool_mask"].reshape(-1) != 0)
            total = part(rows)
            if num_items_in_batch is None:
                denominator = rows.sum().clamp(min=1)
            elif isinstance(num_items_in_batch, torch.Tensor):
                denominator = num_items_in_batch.to(total.device)
            else:
                denominator = num_items_in_batch
            return total / denominator, empty, empty

        spans = inputs["kd_spans"].reshape(-1)
        ids = self._kd_span_ids
        local = torch.stack([((spans == k) & completion).sum() for k in ids]).to(torch.float64)
        counts = local if global_counts is None else global_counts.to(local.device)
        positive = sum(float(counts[i]) for i, k in enumerate(ids) if self.kd_span_weights[k] > 0)
        loss = h_s.new_zeros(())
        sums = torch.zeros(len(ids), dtype=torch.float64, device=local.device)
        for i, k in enumerate(ids):
            weight = self.kd_span_weights[k]
            if weight == 0:
                continue  # never read: no loss, no gradient
            s_k = part(completion & (spans == k))
            sums[i] = s_k.detach().to(torch.float64)
            count = float(counts[i]) if self.kd_normalize == "span" else positive
            loss = loss + s_k * (weight * processes / max(count, 1.0))
        return loss, sums, local
