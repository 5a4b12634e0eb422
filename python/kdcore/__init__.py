"""kdcore: fused knowledge-distillation losses for PyTorch.

Rust SIMD kernels run CPU tensors; everything is a registered ``torch.library``
op, so autograd and ``torch.compile(fullgraph=True)`` work through it.

>>> loss = kdcore.kl_loss(student_logits, teacher_logits, temperature=2.0)
"""

from __future__ import annotations

from . import nn, reference
from ._memory import empty_cache
from ._native import simd_level
from ._threads import get_num_threads, set_num_threads
from .ops.distillation import distillation_loss
from .ops.fused_linear import fused_linear_distillation_loss
from .ops.kl import jsd_loss, kl_loss, tvd_loss
from .ops.softmax import log_softmax, softmax
from .ops.span import span_loss
from .ops.sparse import sparse_kl_loss
from .ops.vocab_parallel import VocabParallel
from .spans import DEFAULT_SPAN_WEIGHTS, Span

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SPAN_WEIGHTS",
    "Span",
    "VocabParallel",
    "distillation_loss",
    "empty_cache",
    "fused_linear_distillation_loss",
    "get_num_threads",
    "jsd_loss",
    "kl_loss",
    "log_softmax",
    "nn",
    "reference",
    "set_num_threads",
    "simd_level",
    "softmax",
    "span_loss",
    "sparse_kl_loss",
    "tvd_loss",
]
