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
def kl_div(
    p: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    p_dtype: str,
    q: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    q_dtype: str,
    temperature: float,
    weight: npt.NDArray[np.float32],
    loss: npt.NDArray[np.float32],
    grad_p: npt.NDArray[np.float32] | npt.NDArray[np.int16] | None = None,
    grad_q: npt.NDArray[np.float32] | npt.NDArray[np.int16] | None = None,
) -> None: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def simd_level() -> str: ...
