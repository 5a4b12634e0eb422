"""kdcore.agent.collate: encodings (and a stored top-k teacher) padded into one
batch, one sequence per item."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kdcore
from agent_helpers import QWEN_MESSAGES, REACT, TOK, P
from kdcore.agent import collate, encode_chat, encode_react


def test_collate_pads_right():
    a = encode_react(REACT)
    b = encode_chat(QWEN_MESSAGES, max_length=100)
    batch = collate([a, b], pad_id=TOK.pad_id)
    n = max(len(a), len(b))
    assert set(batch) == {"input_ids", "labels", "spans", "attention_mask"}
    for key in ("input_ids", "labels", "spans"):
        assert batch[key].shape == (2, n) and batch[key].dtype == torch.int64
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["attention_mask"].sum(1).tolist() == [len(a), len(b)]
    assert torch.equal(batch["input_ids"][1, :100], b.input_ids)
    assert torch.equal(batch["spans"][1, :100], b.spans)
    assert (batch["input_ids"][1, 100:] == 256).all()
    assert (batch["labels"][1, 100:] == -100).all()
    assert (batch["spans"][1, 100:] == P).all()
    assert torch.equal(batch["labels"][0], a.labels)
    padded = collate([a.to_dict(), b], pad_to_multiple_of=64)
    assert padded["input_ids"].shape == (2, 64 * -(-n // 64))
    assert (padded["input_ids"][1, 100:] == 0).all()  # default pad id
    with pytest.raises(ValueError, match="non-empty"):
        collate([])
    with pytest.raises(TypeError, match="Encoded"):
        collate([{"input_ids": a.input_ids}])


def test_collate_pads_a_stored_top_k_teacher():
    from kdcore.train import topk_logprobs

    g = torch.Generator().manual_seed(4)
    items, vocab, k = [encode_react(REACT), encode_chat(QWEN_MESSAGES, max_length=100)], 300, 5
    for item in items:
        ids, lps = topk_logprobs(torch.randn(len(item), vocab, generator=g), k, temperature=2.0)
        item_dict = item.to_dict()
        item_dict.update(teacher_ids=ids, teacher_logprobs=lps)
        items[items.index(item)] = item_dict
    batch = collate(items, pad_id=TOK.pad_id)
    n = batch["input_ids"].shape[1]
    assert batch["teacher_ids"].shape == batch["teacher_logprobs"].shape == (2, n, k)
    assert batch["teacher_ids"].dtype == torch.int32
    assert torch.equal(batch["teacher_ids"][1, :100], items[1]["teacher_ids"])
    assert torch.equal(batch["teacher_logprobs"][1, :100], items[1]["teacher_logprobs"])
    assert (batch["teacher_ids"][1, 100:] == torch.arange(k, dtype=torch.int32)).all()
    assert torch.isneginf(batch["teacher_logprobs"][1, 100:]).all()
    # The padded batch scores exactly the items' own rows (padding is masked).
    s = torch.randn(2, n, vocab, generator=g)
    shifted = dict(labels=batch["labels"][:, 1:], reduction="sum", temperature=2.0)
    got = kdcore.sparse_kl_loss(
        s[:, :-1], batch["teacher_ids"][:, :-1], batch["teacher_logprobs"][:, :-1], **shifted
    )
    want = sum(
        kdcore.sparse_kl_loss(
            s[b, : len(it["labels"]) - 1],
            it["teacher_ids"][:-1],
            it["teacher_logprobs"][:-1],
            labels=it["labels"][1:],
            reduction="sum",
            temperature=2.0,
        )
        for b, it in enumerate(items)
    )
    assert torch.allclose(got, want, rtol=1e-5)
    with pytest.raises(ValueError, match=r"batch\[1\] has no"):
        collate([items[0], encode_react(REACT)])
    with pytest.raises(ValueError, match="only one of"):
        collate([{k: v for k, v in items[0].items() if k != "teacher_logprobs"}])
    with pytest.raises(ValueError, match="must both be \\(L, k\\)"):
        collate([{**items[0], "teacher_ids": items[0]["teacher_ids"][:-1]}])


def test_collate_takes_one_sequence_per_item():
    ids = torch.arange(5)
    row = {"input_ids": ids[None], "labels": ids[None], "spans": torch.zeros(1, 5, dtype=int)}
    batch = collate([row, {k: v[0, :3] for k, v in row.items()}], pad_id=np.int64(9))
    assert batch["input_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 9, 9]]
    assert batch["attention_mask"].sum(1).tolist() == [5, 3]
    two_rows = torch.arange(10).reshape(2, 5)
    item = {"input_ids": two_rows, "labels": two_rows, "spans": two_rows}
    with pytest.raises(ValueError, match=r"batch\[1\]\['input_ids'\].*shape \(2, 5\)"):
        collate([row, item])
    with pytest.raises(ValueError, match=r"batch\[0\]\['spans'\].*shape \(\)"):
        collate([{**row, "spans": torch.tensor(0)}])
    with pytest.raises(TypeError, match=r"batch\[0\]\['labels'\] must hold integers"):
        collate([{**row, "labels": ids.float()}])
    for bad in (True, 1.0, None):
        with pytest.raises(TypeError, match="pad_id must be an int"):
            collate([row], pad_id=bad)
