"""Type stubs of the Rust extension ``kdcore._native``.

Arrays are 2-D and C-contiguous, passed as DLPack capsules
(``torch.utils.dlpack.to_dlpack``; the ``weight`` of ``distill`` too) or as
numpy arrays: ``float32`` tensors as float32 arrays, ``bfloat16`` and
``float16`` tensors as int16 views. Their real dtype is named in the
``dtype`` argument. An output may not share memory with another argument.
"""

import numpy as np
import numpy.typing as npt

#: A ``"dltensor"`` capsule of ``torch.utils.dlpack.to_dlpack``.
_Capsule = object

def softmax(
    x: npt.NDArray[np.float32] | npt.NDArray[np.int16] | _Capsule,
    out: npt.NDArray[np.float32] | npt.NDArray[np.int16] | _Capsule,
    dtype: str,
    temperature: float,
    log: bool,
) -> None: ...
def softmax_backward(
    y: npt.NDArray[np.float32] | npt.NDArray[np.int16] | _Capsule,
    grad_y: npt.NDArray[np.float32] | npt.NDArray[np.int16] | _Capsule,
    grad_x: npt.NDArray[np.float32] | npt.NDArray[np.int16] | _Capsule,
    dtype: str,
    temperature: float,
    log: bool,
) -> None: ...
def distill(
    student: npt.NDArray[np.float32] | npt.NDArray[np.int16] | _Capsule,
    student_dtype: str,
    teacher: npt.NDArray[np.float32] | npt.NDArray[np.int16] | _Capsule,
    teacher_dtype: str,
    divergence_name: str,
    beta: float,
    temperature: float,
    weight: npt.NDArray[np.float32] | _Capsule,
    loss: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64] | None = None,
    ce_weight: npt.NDArray[np.float32] | None = None,
    ce_loss: npt.NDArray[np.float32] | None = None,
    grad_student: npt.NDArray[np.float32] | npt.NDArray[np.int16] | _Capsule | None = None,
    grad_teacher: npt.NDArray[np.float32] | npt.NDArray[np.int16] | _Capsule | None = None,
) -> None: ...
def sparse_kl(
    student: npt.NDArray[np.float32] | npt.NDArray[np.int16] | _Capsule,
    student_dtype: str,
    teacher_ids: npt.NDArray[np.int64],
    teacher_logprobs: npt.NDArray[np.float32],
    teacher_temperature: float,
    temperature: float,
    tail: str,
    weight: npt.NDArray[np.float32],
    loss: npt.NDArray[np.float32],
    grad: npt.NDArray[np.float32] | npt.NDArray[np.int16] | _Capsule | None = None,
) -> None: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def simd_level() -> str: ...
