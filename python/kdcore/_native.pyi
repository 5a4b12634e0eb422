"""Type stubs of the Rust extension ``kdcore._native``.

Arrays are 2-D and C-contiguous. ``float32`` tensors are passed as float32
arrays; ``bfloat16`` and ``float16`` tensors as int16 views, with their real
dtype named in the ``dtype`` argument.
"""

import numpy as np
import numpy.typing as npt

def softmax(
    x: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    out: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    dtype: str,
    temperature: float,
    log: bool,
) -> None: ...
def softmax_backward(
    y: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    grad_y: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    grad_x: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    dtype: str,
    temperature: float,
    log: bool,
) -> None: ...
def distill(
    student: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    student_dtype: str,
    teacher: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    teacher_dtype: str,
    divergence_name: str,
    beta: float,
    temperature: float,
    weight: npt.NDArray[np.float32],
    loss: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64] | None = None,
    ce_weight: npt.NDArray[np.float32] | None = None,
    ce_loss: npt.NDArray[np.float32] | None = None,
    grad_student: npt.NDArray[np.float32] | npt.NDArray[np.int16] | None = None,
    grad_teacher: npt.NDArray[np.float32] | npt.NDArray[np.int16] | None = None,
) -> None: ...
def sparse_kl(
    student: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    student_dtype: str,
    teacher_ids: npt.NDArray[np.int64],
    teacher_logprobs: npt.NDArray[np.float32],
    teacher_temperature: float,
    temperature: float,
    tail: str,
    weight: npt.NDArray[np.float32],
    loss: npt.NDArray[np.float32],
    grad: npt.NDArray[np.float32] | npt.NDArray[np.int16] | None = None,
) -> None: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def simd_level() -> str: ...
