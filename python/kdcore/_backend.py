"""What a kernel backend offers the ops: the :class:`KernelBackend` contract.

Two backends implement it: ``_rust.BACKEND`` (CPU tensors, the native
module) and ``_triton.BACKEND`` (CUDA tensors, or CPU tensors under the
Triton interpreter). ``_dispatch`` picks one per call; the ops in
``kdcore.ops`` talk only to the object they are handed.

Inputs are 2-D logits ``(rows, V)`` of float32, bfloat16 or float16 on the
backend's device; the public functions have checked shapes, dtypes, devices
and values before (the registered ops can also be called directly: then a
backend's own checks give the error, the native binding's for Rust,
``_validate``'s kernel checks for Triton). Outputs are new tensors, never
views of an input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import torch

#: The divergences of the distill pass (kernel names: JSD(0) / JSD(1) are "kl" / "reverse_kl").
DIVERGENCES = ("kl", "reverse_kl", "tvd", "jsd")
#: What the sparse KL does with the teacher's mass outside its top k.
TAILS = ("bucket", "renormalize", "zero")


@dataclass(slots=True)
class DistillArgs:
    """One distill pass: per row r, ``weight[r] · D(P_t ‖ P_s)`` at ``temperature``,
    plus ``ce_weight[r] · CE(labels[r])`` on the student at T = 1 when labels are given."""

    student: torch.Tensor
    teacher: torch.Tensor  # same shape as student; its dtype may differ
    weight: torch.Tensor  # (rows,) divergence weight per row; rows of weight 0 are never read
    temperature: float
    divergence: str  # one of DIVERGENCES
    beta: float = 0.5  # JSD's mixture weight, 0 < beta < 1 ("jsd" only)
    labels: torch.Tensor | None = None  # (rows,) int, in [0, V) where ce_weight != 0
    ce_weight: torch.Tensor | None = None  # (rows,), given with labels
    grad_student: bool = False  # return the gradient of the weighted sum w.r.t. student
    grad_teacher: bool = False  # ... and w.r.t. teacher
    grad_dtype: torch.dtype | None = None  # the student gradient's dtype (default: student's)


class DistillResult(NamedTuple):
    """Per-row float32 terms and the gradients of their sum (None where not asked for)."""

    div_rows: torch.Tensor
    ce_rows: torch.Tensor | None  # None without labels
    grad_student: torch.Tensor | None
    grad_teacher: torch.Tensor | None


@dataclass(slots=True)
class SparseKLArgs:
    """One sparse-teacher KL pass: per row, ``weight[r] · KL`` from the teacher's
    top-k (ids, log-probabilities at ``teacher_temperature``) to the student's
    full softmax at ``temperature``."""

    student: torch.Tensor
    teacher_ids: torch.Tensor  # (rows, k) int, distinct ids in [0, V) per read row
    teacher_logprobs: torch.Tensor  # (rows, k), <= 0
    weight: torch.Tensor  # (rows,)
    temperature: float
    teacher_temperature: float
    tail: str  # one of TAILS
    grad_student: bool = False


@runtime_checkable
class KernelBackend(Protocol):
    """The kernels one backend runs. Every method is a pure function of its
    arguments except :meth:`scale_grad`, which may scale ``saved`` in place."""

    name: str  # "rust" or "triton"

    def softmax(self, x: torch.Tensor, temperature: float, log: bool) -> torch.Tensor:
        """softmax(x / T) (log-softmax with ``log``) per row, in x's dtype."""
        ...

    def softmax_backward(
        self, grad: torch.Tensor, y: torch.Tensor, temperature: float, log: bool
    ) -> torch.Tensor:
        """The gradient w.r.t. x of :meth:`softmax` from its output ``y``."""
        ...

    def distill(self, args: DistillArgs) -> DistillResult:
        """The fused divergence (and CE) pass with the gradients of its weighted sum."""
        ...

    def sparse_kl(self, args: SparseKLArgs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weighted KL per row (float32), the student gradient or None)."""
        ...

    def scale_grad(
        self, saved: torch.Tensor, grad_out: torch.Tensor, owner: object, key: str
    ) -> torch.Tensor:
        """``saved`` (rows, V) times ``grad_out`` (a scalar or one value per row) for
        the backward of an eager op: ``owner`` (its autograd context) and ``key``
        name the saved gradient, which may be scaled in place and returned when
        the backward frees the graph; a backward that keeps it gets a new tensor."""
        ...
