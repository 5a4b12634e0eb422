"""kdcore.train.topk_logprobs: the stored top-k teacher for offline distillation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kdcore
from kdcore.train import topk_logprobs


@given(
    shape=st.sampled_from([(4, 30), (2, 3, 17), (1, 1)]),
    k_frac=st.floats(0.01, 1.0),
    temperature=st.sampled_from([0.5, 1.0, 3.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_topk_matches_float64_log_softmax(shape, k_frac, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, dtype=torch.float64) * 4
    k = max(1, round(k_frac * shape[-1]))
    ids, lps = topk_logprobs(logits.float(), k, temperature=temperature)
    assert ids.dtype == torch.int32 and lps.dtype == torch.float32
    assert ids.shape == lps.shape == (*shape[:-1], k)
    exact = torch.log_softmax(logits / temperature, -1)
    # The k stored entries are the k largest, in order, with their log-probs.
    torch.testing.assert_close(lps.double(), exact.gather(-1, ids.long()), atol=1e-5, rtol=1e-5)
    kth = exact.sort(-1, descending=True).values[..., k - 1 : k]
    assert bool((lps.double() >= kth - 1e-5).all())


def test_full_vocabulary_topk_gives_the_dense_kl():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 40, generator=g, requires_grad=True)
    t = torch.randn(6, 40, generator=g)
    ids, lps = topk_logprobs(t, 40, temperature=2.0)
    sparse = kdcore.sparse_kl_loss(s, ids, lps, temperature=2.0, teacher_temperature=2.0)
    dense = kdcore.reference.kl_loss(s.double(), t.double(), temperature=2.0)
    torch.testing.assert_close(sparse.double(), dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [0, 41, 2.0, True])
def test_bad_k_is_a_clear_error(k):
    with pytest.raises(ValueError, match="k must be an int in \\[1, 40\\]"):
        topk_logprobs(torch.randn(3, 40), k)


def test_bad_temperature_and_logits():
    with pytest.raises(ValueError, match="temperature"):
        topk_logprobs(torch.randn(3, 40), 4, temperature=0.0)
    with pytest.raises(TypeError):
        topk_logprobs(torch.arange(10), 4)
