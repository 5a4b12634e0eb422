"""Backward of the fused ops: the saved gradient times ``grad_output``.

``dst = src * f / den`` per row (``f`` a scalar or one value per row, ``den``
optional), rounded once to the gradient's dtype. In place (``dst is src``)
with ``SKIP_ONE``, a row whose factor is exactly 1 is not touched: the common
``loss.backward()`` costs one load per row and no pass over the gradient.
"""

import triton
import triton.language as tl

from .common import store


@triton.jit
def _scale_row(src_row, dst_row, f, V, lanes, nblk, BLOCK: tl.constexpr):
    for b in range(0, nblk):
        cols = b * BLOCK + lanes
        inside = cols < V
        x = tl.load(src_row + cols, mask=inside, other=0.0).to(tl.float32)
        store(dst_row + cols, x * f, inside)


@triton.jit
def scale_kernel(
    SRC,
    DST,
    F,
    DEN,
    rows,
    V,
    stride_src,
    stride_dst,
    stride_f,
    stride_den,
    HAS_DEN: tl.constexpr,
    SKIP_ONE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    nblk = tl.cdiv(V, BLOCK)
    for row in range(pid, rows, nprog):
        r64 = tl.cast(row, tl.int64)
        f = tl.load(F + r64 * stride_f).to(tl.float32)
        if HAS_DEN:
            f = f / tl.load(DEN + r64 * stride_den).to(tl.float32)
        src_row = SRC + r64 * stride_src
        dst_row = DST + r64 * stride_dst
        if SKIP_ONE:
            if f != 1.0:
                _scale_row(src_row, dst_row, f, V, lanes, nblk, BLOCK)
        else:
            _scale_row(src_row, dst_row, f, V, lanes, nblk, BLOCK)
