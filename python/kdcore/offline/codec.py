"""The entry code of a stored top-k teacher: one little-endian uint32 per
(token id, log-probability), ``word = id << 14 | code``: 18 bits of token id
(vocabularies up to 262144) and a 14-bit code.

The code indexes a fixed table of log-probabilities ``-u[c]`` (``table()``),
increasing in ``u``: ``u[0] = 0``; ``u[c] = 2**-20 * 2**((c - 1) / 192)`` for
``1 <= c <= G = 3649`` (geometric up to ``u[G] = 0.5``: relative steps of
0.36 % in ``u``, which is about 1 - p for a likely token, so a dominant
token's probability — and the tail mass 1 - Σ p the losses use — is stored
finely); ``u[c] = 0.5 + (c - G) / 512`` above (linear, up to
``u[16382]`` ~ 25.37); code 16383 is ``-inf``. Each value is computed in
float64 and rounded to float32. Neighbouring codes are at most 1/512 apart.

Rounding: each log-probability is rounded down or up to a neighbouring code
(so within 1/512 < 2e-3 of the truth), choosing, along the row sorted by
decreasing probability, the direction that keeps the running sum of decoded
probabilities closest to the true running sum: the decoded top-k mass stays
within 6e-4 of the true one (half the largest probability gap between
neighbouring codes; the losses accept masses up to 1 + 1e-3) and the
errors of neighbouring entries cancel instead of piling up in the tail
mass. Log-probabilities below the lowest finite code (probabilities below
~9.6e-12) are stored as that code.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

ID_BITS = 18
VALUE_BITS = 14
MAX_VOCAB = 1 << ID_BITS
NEG_INF_CODE = (1 << VALUE_BITS) - 1
#: Codes per doubling of u in the geometric part, its last code, the linear step.
PER_OCTAVE = 192
GEOMETRIC_TOP = 19 * PER_OCTAVE + 1
LINEAR_STEP = 1.0 / 512
#: The largest distance between neighbouring codes (the rounding error bound).
MAX_STEP = LINEAR_STEP


@functools.cache
def table() -> np.ndarray:
    """The 16384 float32 log-probabilities the codes stand for."""
    c = np.arange(1 << VALUE_BITS, dtype=np.float64)
    geometric = 2.0**-20 * np.exp2((c - 1) / PER_OCTAVE)
    linear = 0.5 + (c - GEOMETRIC_TOP) * LINEAR_STEP
    u = np.where(c <= GEOMETRIC_TOP, geometric, linear)
    u[0] = 0.0
    values = (-u).astype(np.float32)
    values[0] = 0.0  # not -0.0
    values[NEG_INF_CODE] = -np.inf
    values.setflags(write=False)
    return values


def check_vocab(vocab_size: int) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int; got {vocab_size!r}")
    if vocab_size > MAX_VOCAB:
        raise ValueError(
            f"vocab_size {vocab_size} is above {MAX_VOCAB}: token ids would not fit the "
            f"{ID_BITS} bits of a stored entry"
        )


def encode(ids: torch.Tensor, logprobs: torch.Tensor, vocab_size: int) -> np.ndarray:
    """``(rows, k)`` ids and log-probabilities -> ``(rows, k)`` uint32 words.

    Each row is stored sorted by decreasing log-probability (ties by id).
    Raises ValueError for ids outside [0, vocab_size), a repeated id in a
    row, or a NaN / positive log-probability. Runs in numpy: small
    element-wise steps, which torch's thread pool only slows down.
    """
    check_vocab(vocab_size)
    ids = torch.as_tensor(ids).detach().to("cpu", torch.int64).numpy()
    lps = torch.as_tensor(logprobs).detach().to("cpu", torch.float64).numpy()
    if ids.ndim != 2 or ids.shape != lps.shape:
        raise ValueError(f"ids and logprobs must both be (rows, k); got {ids.shape}, {lps.shape}")
    _check(ids, lps, vocab_size)
    # Sort by (-logprob, id): a stable sort by id, then a stable sort by -logprob.
    by_id = np.argsort(ids, axis=-1, kind="stable")
    ids, lps = np.take_along_axis(ids, by_id, -1), np.take_along_axis(lps, by_id, -1)
    order = np.argsort(-lps, axis=-1, kind="stable")
    ids, lps = np.take_along_axis(ids, order, -1), np.take_along_axis(lps, order, -1)
    codes = _round_codes(np.minimum(lps, 0.0))
    return ((ids << VALUE_BITS) | codes).astype("<u4")


def decode(words: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint32 words -> (int32 ids, float32 log-probabilities), same shape."""
    w = np.asarray(words, dtype=np.uint32)
    ids = (w >> np.uint32(VALUE_BITS)).astype(np.int32)
    lps = table()[w & np.uint32(NEG_INF_CODE)]
    return torch.from_numpy(ids), torch.from_numpy(lps)


def _check(ids: np.ndarray, lps: np.ndarray, vocab: int) -> None:
    if ids.size == 0:
        return
    bad = (ids < 0) | (ids >= vocab)
    if bad.any():
        raise ValueError(f"token ids must be in [0, {vocab}); got {ids[bad][:5].tolist()}")
    s = np.sort(ids, axis=-1)
    twice = (s[:, 1:] == s[:, :-1]).any(-1)
    if twice.any():
        r = int(np.flatnonzero(twice)[0])
        raise ValueError(f"row {r}: a token id appears twice in the top-k: {ids[r].tolist()}")
    # Log-softmax of float32 logits may come out a few ulp above 0.
    positive = np.isnan(lps) | (lps > 1e-5)
    if positive.any():
        raise ValueError(
            f"log-probabilities must be <= 0 and not NaN; got {lps[positive][:5].tolist()}"
        )


def _round_codes(lps: np.ndarray) -> np.ndarray:
    """Error-diffused rounding of sorted rows (see the module docstring)."""
    u_table = -table()[:NEG_INF_CODE].astype(np.float64)
    top = NEG_INF_CODE - 1  # the lowest finite log-probability's code
    x = -lps  # >= 0; +inf for -inf
    finite = np.isfinite(x)
    lo = np.clip(np.searchsorted(u_table, x, side="right") - 1, 0, top)
    hi = np.where(u_table[lo] == x, lo, np.minimum(lo + 1, top))  # on a code: no choice
    # Columns contiguous: the loop walks the rows' entries in order.
    p = np.ascontiguousarray(np.where(finite, np.exp(lps), 0.0).T)
    p_lo, p_hi = np.exp(-u_table[lo]).T.copy(), np.exp(-u_table[hi]).T.copy()
    lo_t, hi_t, fin_t = lo.T, hi.T, finite.T
    codes = np.empty_like(lo_t)
    err = np.zeros(lps.shape[0])  # decoded - true running mass, per row
    for j in range(lps.shape[1]):
        e_lo = err + p_lo[j] - p[j]
        e_hi = err + p_hi[j] - p[j]
        up = np.abs(e_hi) < np.abs(e_lo)
        codes[j] = np.where(up, hi_t[j], lo_t[j])
        err = np.where(fin_t[j], np.where(up, e_hi, e_lo), err)
    codes = codes.T
    codes[~finite] = NEG_INF_CODE
    return codes
