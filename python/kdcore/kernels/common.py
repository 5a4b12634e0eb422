"""Device helpers shared by the kdcore Triton kernels.

Conventions of every kernel:

- Logits are loaded in their storage dtype and cast to float32 at once; all
  arithmetic is float32, row totals are summed in float64 across lanes.
- Exponentials are base 2: a logit x at temperature T enters as
  ``(x - m) * k`` with ``k = log2(e) / T`` and ``m`` a running maximum, so
  ``exp(x / T - m / T) = exp2((x - m) * k)`` costs one ``ex2`` instruction.
- Rows are reduced with a *per-lane* online softmax: every lane of the block
  keeps its own running maximum and sum, so the column loop has no
  cross-thread reduction; the lanes are combined once per row
  (:func:`lane_total`). One exponential per element updates a lane: for
  ``d = x - m``, ``e = exp2(-|d| k)`` is the new term when ``d <= 0`` and the
  rescale factor of the old sum when ``d > 0``.
- A running maximum starts at ``-FLT_MAX`` (finite), so ``-inf`` logits give
  exact zeros and never ``-inf - -inf``; NaN logits propagate to the row.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
FLT_MAX = tl.constexpr(3.4028234663852886e38)
INF = tl.constexpr(float("inf"))


@triton.jit
def online(x, m, z, k):
    """One element per lane into a running (max m, sum z of exp2((x - m) k)).

    Returns ``(m', z', r, n)``: the new maximum and sum, the factor ``r`` the
    old sum was rescaled by and the term ``n`` that was added
    (``z' = z r + n``).
    """
    d = x - m
    e = tl.exp2(-tl.abs(d) * k)
    up = d > 0
    r = tl.where(up, e, 1.0)
    n = tl.where(up, 1.0, e)
    return tl.maximum(m, x), z * r + n, r, n


@triton.jit
def shift(m_new, m_old, k):
    """(m_new - m_old) k, clamped to FLT_MAX so that 0 * shift stays 0."""
    return tl.minimum((m_new - m_old) * k, FLT_MAX)


@triton.jit
def lane_total(m, z, k):
    """Combines per-lane (max, sum) into the row's maximum, its float64 sum and
    each lane's rescale factor exp2((m_lane - M) k)."""
    big = tl.max(m, 0)
    r = tl.exp2((m - big) * k)
    total = tl.sum(z.to(tl.float64) * r.to(tl.float64), 0)
    return big, total, r


@triton.jit
def nan_like(x):
    """NaN of x's type and shape (a NaN constexpr global would break the JIT's
    global-value checks: NaN != NaN)."""
    return (x - x) * INF


@triton.jit
def log2_f64(x):
    """log2 of a float64 scalar with float64 add/mul/div only (no libdevice).

    x = 2^e m with m in [sqrt(1/2), sqrt(2)); ln m = 2 atanh(s), s = (m-1)/(m+1),
    |s| <= 0.172, by its series to s^23 (error < 1e-17). 0 gives -inf, +inf
    gives +inf, negative or NaN gives NaN. (Subnormal x are not needed here:
    the partition functions are >= 1 or exactly 0.)
    """
    bits = x.to(tl.int64, bitcast=True)
    e = ((bits >> 52) & 0x7FF) - 1023
    m = ((bits & 0xFFFFFFFFFFFFF) | 0x3FF0000000000000).to(tl.float64, bitcast=True)
    big = m > 1.4142135623730951
    m = tl.where(big, m * 0.5, m)
    e = tl.where(big, e + 1, e)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    p = 1.0 / 23.0
    p = p * s2 + 1.0 / 21.0
    p = p * s2 + 1.0 / 19.0
    p = p * s2 + 1.0 / 17.0
    p = p * s2 + 1.0 / 15.0
    p = p * s2 + 1.0 / 13.0
    p = p * s2 + 1.0 / 11.0
    p = p * s2 + 1.0 / 9.0
    p = p * s2 + 1.0 / 7.0
    p = p * s2 + 1.0 / 5.0
    p = p * s2 + 1.0 / 3.0
    p = p * s2 + 1.0
    res = e.to(tl.float64) + (2.0 * s * p) * 1.4426950408889634
    res = tl.where(x == INF, x, res)
    res = tl.where(x == 0.0, -INF, res)
    return tl.where(x >= 0.0, res, nan_like(x))


@triton.jit
def log1p_unit(e):
    """ln(1 + e) for e in [0, 1], accurate relative to the result at every e:
    2 atanh(s) = 2 (s + s³/3 + … + s¹⁵/15), s = e / (2 + e) ≤ 1/3 (no log of
    a rounded 1 + e, no hardware log2 with an absolute error near 1)."""
    s = e / (2.0 + e)
    s2 = s * s
    p = 1.0 / 15.0
    p = p * s2 + 1.0 / 13.0
    p = p * s2 + 1.0 / 11.0
    p = p * s2 + 1.0 / 9.0
    p = p * s2 + 1.0 / 7.0
    p = p * s2 + 1.0 / 5.0
    p = p * s2 + 1.0 / 3.0
    return 2.0 * (s + s * s2 * p)


@triton.jit
def half_sign(x):
    """½ sign(x) with sign(0) = 0 (autograd's subgradient of |x|); NaN stays NaN."""
    return tl.where(x > 0, 0.5, tl.where(x < 0, -0.5, x * 0.0))


@triton.jit
def to_bf16_rne(x):
    """float32 -> bfloat16, round to nearest even, in integer arithmetic.

    (The GPU's cvt.rn does the same; this form is also exact under the CPU
    interpreter, whose float32 -> bfloat16 cast truncates.)
    """
    bits = x.to(tl.int32, bitcast=True)
    r = bits + (0x7FFF + ((bits >> 16) & 1))
    h = ((r >> 16) & 0xFFFF).to(tl.int16)
    h = tl.where(x != x, 0x7FC0, h).to(tl.int16)
    return h.to(tl.bfloat16, bitcast=True)


@triton.jit
def store(ptr, x, mask):
    """Stores float32 ``x`` in ``ptr``'s dtype, rounded to nearest even."""
    if ptr.dtype.element_ty == tl.bfloat16:
        tl.store(ptr, to_bf16_rne(x), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def load(ptr, mask):
    """Loads in the storage dtype, -inf outside ``mask``, cast to float32."""
    return tl.load(ptr, mask=mask, other=-INF).to(tl.float32)
