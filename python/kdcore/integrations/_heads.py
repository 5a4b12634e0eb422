"""The output heads of Hugging Face models, as kdcore's fused loss takes them.

Shared by both trainers: the head's weight and bias (gathered when FSDP2
shards them), the logit transform a model config asks for, and the checks
that a student and a teacher head can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Head:
    """One model's output projection: ``logits = transform(hidden @ weight.T + bias)``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float
    softcap: float | None


def _is_dtensor(t: object) -> bool:
    dtensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)


def output_head(model: Any, role: str, dtype: torch.dtype | None = None) -> Head:
    """``model``'s output head; ``role`` ("student" / "teacher") names it in errors.

    A DTensor head (FSDP2: ``Shard(0)`` or ``Replicate``) is gathered once with
    ``full_tensor()`` (its backward reduce-scatters the gradient) and cast to
    ``dtype`` (the hidden states' dtype: under mixed precision the gathered
    weight is the fp32 master copy).
    """
    head = require_head(model, role)
    weight, bias = head.weight, getattr(head, "bias", None)
    if _is_dtensor(weight):
        weight = weight.full_tensor()
        if dtype is not None:
            weight = weight.to(dtype)
        if bias is not None and _is_dtensor(bias):
            bias = bias.full_tensor()
    scale, softcap = logit_transform(model.config)
    return Head(weight, bias, scale, softcap)


def require_head(model: Any, role: str) -> Any:
    """``model.get_output_embeddings()``, or a ValueError naming the fix."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(
            f"the {role} model ({type(model).__name__}) has no output embeddings "
            "(get_output_embeddings() gives no lm_head weight); kdcore's fused loss projects "
            "the last hidden states through that head. Load the model with its language-model "
            "head (AutoModelForCausalLM), not a bare backbone (AutoModel)."
        )
    return head


def logit_transform(config: Any) -> tuple[float, float | None]:
    """(logit scale, final soft-cap or None) of a model config.

    The scale goes by several names: ``logit_scale`` (Cohere),
    ``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1) and
    ``logits_scaling``, a divisor (Granite, MiniCPM3) except for HyperCLOVA X,
    where it multiplies. ``final_logit_softcapping`` (Gemma) caps after the
    scale. A ``None`` scale means unscaled.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(text, name, None)
        if scale is not None:
            break
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        divisor = text.logits_scaling
        scale = divisor if getattr(text, "model_type", None) == "hyperclovax" else 1.0 / divisor
    softcap = getattr(text, "final_logit_softcapping", None)
    return (1.0 if scale is None else float(scale)), (None if softcap is None else float(softcap))


def check_pair(student: Head, teacher: Head) -> None:
    """The student and teacher heads must share a device and a vocabulary."""
    if student.weight.device != teacher.weight.device:
        raise ValueError(
            f"the student lm_head is on {student.weight.device} but the teacher lm_head is on "
            f"{teacher.weight.device}; the fused loss reads both heads in one kernel. Place "
            "both heads on the same device (e.g. device_map with lm_head on one device)."
        )
    vs, vt = student.weight.shape[0], teacher.weight.shape[0]
    if vs != vt:
        raise ValueError(
            _vocab_mismatch(f"lm_head has {vs} rows (vocabulary entries)", f"has {vt}")
            + " or resize_token_embeddings() both to the same size."
        )


def _vocab_mismatch(student: str, teacher: str) -> str:
    return (
        f"the student {student} but the teacher {teacher}; distillation compares the full "
        "next-token distributions, so both models need the same tokenizer and vocabulary. "
        "Use a teacher with the student's tokenizer"
    )


def check_vocab_sizes(student_model: Any, teacher_model: Any) -> None:
    """Early form of :func:`check_pair` from the configs (before any forward pass)."""
    sizes = []
    for model in (student_model, teacher_model):
        config = model.config.get_text_config()
        sizes.append(getattr(config, "vocab_size", None))
    if None not in sizes and sizes[0] != sizes[1]:
        raise ValueError(
            _vocab_mismatch(f"has vocab_size {sizes[0]}", f"has vocab_size {sizes[1]}") + "."
        )


def transform_kwargs(student: Head, teacher: Head | None) -> dict[str, Any]:
    """The fused loss's logit-transform arguments that differ from the identity."""
    out: dict[str, Any] = {}
    if student.logit_scale != 1.0:
        out["student_logit_scale"] = student.logit_scale
    if student.softcap is not None:
        out["student_softcap"] = student.softcap
    if teacher is not None:
        if teacher.logit_scale != 1.0:
            out["teacher_logit_scale"] = teacher.logit_scale
        if teacher.softcap is not None:
            out["teacher_softcap"] = teacher.softcap
    return out


def divergence_of_beta(beta: float) -> tuple[str, float]:
    """TRL's ``beta`` as kdcore's divergence: 0 forward KL, 1 reverse KL, else the
    generalized JSD with mixture ``beta·P_t + (1-beta)·P_s`` (the same convention)."""
    if beta == 0.0:
        return "kl", 0.5
    if beta == 1.0:
        return "reverse_kl", 0.5
    return "jsd", float(beta)
