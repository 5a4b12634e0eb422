"""kdcore.offline: capture, storage format, TopKDataset, resume, serving import."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdcore
from kdcore import offline
from kdcore.agent import collate
from kdcore.offline import codec
from kdcore.train import Distiller, topk_logprobs
from offline_helpers import Toy, batches, items

HERE = Path(__file__).resolve().parent
STEP = 2.0**-9  # the largest distance between neighbouring codes


def _max(t: torch.Tensor) -> float:
    return float(t.max()) if t.numel() else 0.0


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


# --- the entry code --------------------------------------------------------------


@given(
    vocab=st.sampled_from([3, 50, 1000, 32000, 131073, 262144]),
    k_frac=st.floats(0.0, 1.0),
    scale=st.sampled_from([0.5, 3.0, 10.0, 40.0]),
    temperature=st.sampled_from([0.7, 1.0, 2.0]),
    seed=st.integers(0, 2**31 - 1),
)
@settings(deadline=None)
def test_code_round_trip_ids_exact_logprobs_within_one_step(
    vocab, k_frac, scale, temperature, seed
):
    g = torch.Generator().manual_seed(seed)
    rows = 3 if vocab > 10000 else 16
    logits = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale
    k = max(1, min(vocab, round(k_frac * 64)))
    ids, lps = topk_logprobs(logits.float(), k, temperature=temperature)
    words = codec.encode(ids, lps, vocab)
    assert words.dtype == np.dtype("<u4") and words.shape == (rows, k)
    got_ids, got = codec.decode(words)
    # Same ids per row (stored sorted by decreasing log-probability).
    assert torch.equal(got_ids.sort(-1).values, ids.sort(-1).values)
    exact = torch.log_softmax(logits / temperature, -1).gather(-1, got_ids.long())
    # The code table, from its definition in float64 (docs/offline.md).
    c = torch.arange(16383, dtype=torch.float64)
    u = torch.where(c <= 3649, 2.0**-20 * 2 ** ((c - 1) / 192), 0.5 + (c - 3649) / 512)
    u[0] = 0
    assert torch.equal(torch.tensor(codec.table()[:16383]), (-u).float())
    floor = -float(u[-1])
    inside = exact >= floor
    err = (got.double() - exact).abs()
    # Against what was stored: one code step (+ float32 rounding of the table);
    # against the float64 truth also the float32 log-softmax's own error.
    by_id, in_by_id = got_ids.argsort(-1), ids.argsort(-1)
    given = lps.double().gather(-1, in_by_id)
    codec_err = (got.double().gather(-1, by_id) - given).abs()
    assert _max(codec_err[exact.gather(-1, by_id) >= floor]) <= STEP + 2e-6
    assert _max(err[inside]) < 2e-3
    assert bool((got[~inside] == codec.table()[16382]).all())  # below the codes: the lowest
    # Decoded top-k mass within 6e-4 of the true one (half the largest probability
    # gap between neighbouring codes): never above 1 + 1e-3.
    mass, true_mass = got.double().exp().sum(-1), exact.exp().sum(-1)
    assert bool(((mass - true_mass).abs() <= 6e-4 + k * math.exp(floor)).all())
    assert bool((mass <= 1 + 1e-3).all())


def test_code_keeps_minus_infinity_and_checks_rows():
    ids = torch.tensor([[3, 1, 2]])
    lps = torch.tensor([[-0.1, -math.inf, -2.5]])
    got_ids, got = codec.decode(codec.encode(ids, lps, 10))
    assert got_ids.tolist() == [[3, 2, 1]]
    assert got[0, 2] == -math.inf and abs(float(got[0, 0]) + 0.1) <= STEP
    with pytest.raises(ValueError, match="appears twice"):
        codec.encode(torch.tensor([[1, 1]]), torch.tensor([[-1.0, -2.0]]), 10)
    with pytest.raises(ValueError, match=r"must be in \[0, 10\)"):
        codec.encode(torch.tensor([[10]]), torch.tensor([[-1.0]]), 10)
    with pytest.raises(ValueError, match="<= 0"):
        codec.encode(torch.tensor([[1]]), torch.tensor([[0.5]]), 10)
    with pytest.raises(ValueError, match="above 262144"):
        codec.check_vocab(262145)


@pytest.mark.parametrize("student_kind", ["random", "close"])
@pytest.mark.parametrize("teacher_scale", [2.0, 6.0])
def test_sparse_kl_from_stored_entries_within_1e_3_relative(student_kind, teacher_scale):
    g = torch.Generator().manual_seed(7)
    rows, vocab, k = 2048, 262144 // 64, 64
    teacher = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * teacher_scale
    if student_kind == "random":
        student = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * teacher_scale
    else:  # a well-trained student: the teacher plus a little noise (small KL)
        student = teacher + 0.3 * torch.randn(rows, vocab, generator=g, dtype=torch.float64)
    ids, lps = topk_logprobs(teacher.float(), k)
    got_ids, got = codec.decode(codec.encode(ids, lps, 262144))
    for tail in ("bucket", "renormalize", "zero"):
        exact = kdcore.reference.sparse_kl_loss(student, ids.long(), lps.double(), tail=tail)
        stored = kdcore.reference.sparse_kl_loss(student, got_ids.long(), got.double(), tail=tail)
        assert abs(float(stored / exact) - 1) < 1e-3, (tail, float(exact), float(stored))


# --- capture and TopKDataset -------------------------------------------------------


def _capture(tmp: Path, data, **kw):
    kw.setdefault("k", 5)
    kw.setdefault("shard_tokens", 20)
    kw.setdefault("progress", False)
    return offline.capture(Toy(), batches(data), tmp, **kw)


def test_capture_round_trip_matches_the_teacher(tmp_path):
    data = items(10, seed=1)
    manifest = _capture(tmp_path, data, temperature=2.0, tokenizer_fingerprint="sha256:x")
    assert manifest["complete"] and len(manifest["shards"]) > 1
    assert manifest["sequences"] == 10 and manifest["tokens"] == sum(
        len(d["input_ids"]) for d in data
    )
    assert manifest["vocab_size"] == 50 and manifest["teacher"] == "Toy"
    ds = offline.TopKDataset(tmp_path, vocab_size=50, k=5, temperature=2.0)
    assert len(ds) == 10
    for i in [9, 0, 4, -1]:
        tokens = data[i]["input_ids"]
        logits = Toy()(tokens[None]).detach()[0]
        exact = torch.log_softmax(logits.double() / 2.0, -1)
        ref_ids, _ = topk_logprobs(logits, 5, temperature=2.0)
        item = ds[i]
        L = len(tokens)
        assert item["teacher_ids"].shape == item["teacher_logprobs"].shape == (L, 5)
        got_ids, got = item["teacher_ids"][:-1], item["teacher_logprobs"][:-1]
        assert torch.equal(got_ids.sort(-1).values, ref_ids[:-1].sort(-1).values.int())
        err = (got.double() - exact[:-1].gather(-1, got_ids.long())).abs()
        assert _max(err) <= STEP + 1e-6
        # The last position predicts no token of the sequence: an empty row.
        assert item["teacher_ids"][-1].tolist() == list(range(5))
        assert bool(torch.isneginf(item["teacher_logprobs"][-1]).all())


def test_capture_takes_the_masked_tokens_left_or_right_padded(tmp_path):
    teacher = Toy()
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    offline.capture(
        teacher,
        [{"input_ids": ids, "attention_mask": mask, "labels": ids}],
        tmp_path,
        k=4,
        progress=False,
    )
    ds = offline.TopKDataset(tmp_path)
    assert [len(ds[i]["teacher_ids"]) for i in range(2)] == [3, 5]
    logits = teacher(ids, mask)
    ref_ids, _ = topk_logprobs(logits[0, 2:4], 4)
    assert torch.equal(ds[0]["teacher_ids"][:2].sort(-1).values, ref_ids.sort(-1).values)


def test_topk_dataset_rejects_what_the_student_does_not_expect(tmp_path):
    _capture(tmp_path, items(4), tokenizer_fingerprint="sha256:aa")
    with pytest.raises(ValueError, match="vocab_size = 50, but 51 is expected"):
        offline.TopKDataset(tmp_path, vocab_size=51)
    with pytest.raises(ValueError, match="k = 5, but 8 is expected"):
        offline.TopKDataset(tmp_path, k=8)
    with pytest.raises(ValueError, match="tokenizer_fingerprint = 'sha256:aa'"):
        offline.TopKDataset(tmp_path, tokenizer_fingerprint="sha256:bb")
    with pytest.raises(ValueError, match="temperature"):
        offline.TopKDataset(tmp_path, temperature=2.0)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        offline.TopKDataset(tmp_path / "nothing-here")


def test_inputs_are_checked_against_the_tokens_the_teacher_saw(tmp_path):
    data = items(6, seed=2, min_len=2)
    _capture(tmp_path, data)
    ds = offline.TopKDataset(tmp_path, inputs=data)
    assert torch.equal(ds[3]["input_ids"], data[3]["input_ids"]) and "labels" in ds[3]
    batch = collate([ds[i] for i in range(6)])
    assert batch["teacher_ids"].shape == (*batch["input_ids"].shape, 5)
    swapped = [data[1], data[0], *data[2:]]
    with pytest.raises(ValueError, match=r"inputs\[0\].*not in capture order"):
        offline.TopKDataset(tmp_path, inputs=swapped)[0]
    with pytest.raises(ValueError, match="inputs has 5 items"):
        offline.TopKDataset(tmp_path, inputs=data[:5])


# --- damaged captures --------------------------------------------------------------


def _damaged(tmp_path):
    _capture(tmp_path, items(10, seed=3))
    return json.loads((tmp_path / "manifest.json").read_text())


def test_a_corrupted_shard_is_named(tmp_path):
    manifest = _damaged(tmp_path)
    path = tmp_path / manifest["shards"][1]["file"]
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40  # one bit of one entry
    path.write_bytes(bytes(raw))
    ds = offline.TopKDataset(tmp_path)
    ds[0]  # shard 0 is fine
    first = manifest["shards"][0]["sequences"]
    with pytest.raises(offline.ShardError, match="shard shard-00001.kdtopk: its SHA-256"):
        ds[first]
    with pytest.raises(offline.ShardError, match="shard-00001"):
        offline.TopKDataset(tmp_path).verify()
    offline.TopKDataset(tmp_path, verify=False)[first]  # opted out: reads it


def test_a_truncated_or_missing_shard_is_named(tmp_path):
    manifest = _damaged(tmp_path)
    path = tmp_path / manifest["shards"][2]["file"]
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(offline.ShardError, match="shard shard-00002.kdtopk: truncated"):
        offline.TopKDataset(tmp_path)
    path.write_bytes(b"KD")
    with pytest.raises(offline.ShardError, match="shard-00002.kdtopk: truncated"):
        offline.TopKDataset(tmp_path)
    path.unlink()
    with pytest.raises(offline.ShardError, match="shard shard-00002.kdtopk: missing"):
        offline.TopKDataset(tmp_path)


def test_a_manifest_that_disagrees_with_a_shard_is_named(tmp_path):
    manifest = _damaged(tmp_path)
    manifest["shards"][1]["sequences"] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(offline.ShardError, match="shard shard-00001.kdtopk: its header"):
        offline.TopKDataset(tmp_path)
    manifest["shards"][1]["sequences"] -= 1
    for field, value, message in [
        ("file", "../../etc/passwd", r"shards\[1\] is not shard-00001.kdtopk"),
        ("rows", "12", "shard shard-00001.kdtopk: rows is not a non-negative int"),
        ("sha256", None, "shard shard-00001.kdtopk: sha256 is not a SHA-256"),
    ]:
        broken = json.loads(json.dumps(manifest))
        broken["shards"][1][field] = value
        (tmp_path / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message):
            offline.TopKDataset(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid manifest"):
        offline.TopKDataset(tmp_path)
    manifest["complete"] = False
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not complete"):
        offline.TopKDataset(tmp_path)


# --- resume --------------------------------------------------------------------------


class _Interrupted(Exception):
    pass


def _interrupting(seq, after):
    for n, b in enumerate(seq):
        if n == after:
            raise _Interrupted
        yield b


@given(after=st.integers(0, 9), kind=st.sampled_from(["batches", "manifest"]))
@settings(
    deadline=None, max_examples=int(os.environ.get("KDCORE_HYPOTHESIS_EXAMPLES", "60")) // 3 + 1
)
def test_resume_after_an_interruption_gives_identical_shards(tmp_path_factory, after, kind):
    data = items(30, seed=4)
    whole = tmp_path_factory.mktemp("whole")
    offline.capture(Toy(), batches(data), whole, k=5, shard_tokens=20, progress=False)
    part = tmp_path_factory.mktemp("part")
    if kind == "batches":  # the batch iterator fails (or Ctrl-C) after `after` batches
        with pytest.raises(_Interrupted):
            offline.capture(
                Toy(),
                _interrupting(batches(data), after),
                part,
                k=5,
                shard_tokens=20,
                progress=False,
            )
    else:  # killed after a shard file was written, before its manifest
        from kdcore.offline import manifest as mf

        real, calls = mf.save, []

        def save(out_dir, m):
            calls.append(1)
            if len(calls) > after % 4:
                raise KeyboardInterrupt
            real(out_dir, m)

        mf.save = save
        try:
            with pytest.raises(KeyboardInterrupt):
                offline.capture(Toy(), batches(data), part, k=5, shard_tokens=20, progress=False)
        finally:
            mf.save = real
    offline.capture(Toy(), batches(data), part, k=5, shard_tokens=20, progress=False)
    assert _files(part) == _files(whole)


def test_resume_after_the_process_is_killed(tmp_path):
    """A capture killed with SIGKILL mid-way resumes to identical files."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path[:0] = [{str(HERE)!r}]
        from offline_helpers import Toy, batches, items
        from kdcore import offline
        def killing(seq):
            for n, b in enumerate(seq):
                if n == 7:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield b
        offline.capture(Toy(), killing(batches(items(30, seed=5))), sys.argv[1], k=5,
                        shard_tokens=20, progress=False)
    """)
    part = tmp_path / "part"
    run = subprocess.run(
        [sys.executable, "-c", script, str(part)],
        timeout=120,
        env={**os.environ, "KDCORE_NUM_THREADS": "1"},
    )
    assert run.returncode == -9
    listed = json.loads((part / "manifest.json").read_text())
    assert not listed["complete"] and listed["shards"]
    (part / ".shard-00009.kdtopk.0123456789ab.tmp").write_bytes(b"half")  # as a kill leaves
    data = items(30, seed=5)
    offline.capture(Toy(), batches(data), part, k=5, shard_tokens=20, progress=False)
    whole = tmp_path / "whole"
    offline.capture(Toy(), batches(data), whole, k=5, shard_tokens=20, progress=False)
    assert _files(part) == _files(whole)


def test_resume_captures_damaged_shards_again(tmp_path):
    data = items(30, seed=13)
    whole = tmp_path / "whole"
    offline.capture(Toy(), batches(data), whole, k=5, shard_tokens=20, progress=False)
    part = tmp_path / "part"
    with pytest.raises(_Interrupted):
        offline.capture(
            Toy(), _interrupting(batches(data), 8), part, k=5, shard_tokens=20, progress=False
        )
    listed = json.loads((part / "manifest.json").read_text())["shards"]
    assert len(listed) >= 3
    raw = bytearray((part / "shard-00001.kdtopk").read_bytes())
    raw[-1] ^= 1
    (part / "shard-00001.kdtopk").write_bytes(bytes(raw))
    (part / "shard-00002.kdtopk").unlink()
    offline.capture(Toy(), batches(data), part, k=5, shard_tokens=20, progress=False)
    assert _files(part) == _files(whole)
    # A complete capture is repaired the same way.
    (whole / "shard-00003.kdtopk").write_bytes(b"")
    offline.capture(Toy(), batches(data), whole, k=5, shard_tokens=20, progress=False)
    assert _files(part) == _files(whole)


def test_resume_with_other_batches_or_settings_is_an_error(tmp_path):
    data = items(12, seed=6)
    with pytest.raises(_Interrupted):
        offline.capture(
            Toy(), _interrupting(batches(data), 3), tmp_path, k=5, shard_tokens=20, progress=False
        )
    other = items(12, seed=7)
    with pytest.raises(ValueError, match="inputs of shard shard-00000.kdtopk differ"):
        offline.capture(Toy(), batches(other), tmp_path, k=5, shard_tokens=20, progress=False)
    with pytest.raises(ValueError, match="k: 5 there, 6 now"):
        offline.capture(Toy(), batches(data), tmp_path, k=6, shard_tokens=20, progress=False)
    with pytest.raises(ValueError, match="inputs end after"):
        offline.capture(Toy(), batches(data)[:1], tmp_path, k=5, shard_tokens=20, progress=False)
    offline.capture(Toy(), batches(data), tmp_path, k=5, shard_tokens=20, progress=False)
    # Complete: the same batches again are a no-op, more batches an error.
    before = _files(tmp_path)
    offline.capture(Toy(), batches(data), tmp_path, k=5, shard_tokens=20, progress=False)
    assert _files(tmp_path) == before
    with pytest.raises(ValueError, match="is complete"):
        offline.capture(
            Toy(), batches(data + other), tmp_path, k=5, shard_tokens=20, progress=False
        )


def test_capture_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="k must be a positive int"):
        offline.capture(Toy(), [], tmp_path, k=0)
    with pytest.raises(ValueError, match="larger than the teacher's vocabulary"):
        offline.capture(Toy(vocab=4), batches(items(2, vocab=4)), tmp_path, k=5, progress=False)
    with pytest.raises(ValueError, match="input_ids must be a"):
        offline.capture(Toy(), [{"input_ids": torch.arange(4)}], tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="has no tokens"):
        offline.capture(
            Toy(),
            [
                {
                    "input_ids": torch.ones(1, 3, dtype=torch.long),
                    "attention_mask": torch.zeros(1, 3),
                }
            ],
            tmp_path / "c",
            progress=False,
        )


# --- training from shards -------------------------------------------------------------


def _train(loader, seed=0, loss="span"):
    torch.manual_seed(seed)
    student = Toy(seed=11, scale=1.0)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    d = Distiller(
        student, None, opt, loss=loss, temperature=2.0, teacher_temperature=2.0, alpha=0.2
    )
    losses = [d.step(b)["loss"] for b in loader]
    return losses, [p.detach().clone() for p in student.parameters()]


def _in_memory(data, teacher, quantise):
    out = []
    for batch in batches(data):
        ids, lps = topk_logprobs(teacher(batch["input_ids"]), 5, temperature=2.0)
        if quantise:  # the same numbers the shards hold, in memory
            shape = ids.shape
            ids, lps = codec.decode(codec.encode(ids.reshape(-1, 5), lps.reshape(-1, 5), 50))
            ids, lps = ids.reshape(shape), lps.reshape(shape)
        out.append({**batch, "teacher_ids": ids, "teacher_logprobs": lps})
    return out


def test_distiller_from_shards_equals_the_in_memory_topk_teacher(tmp_path):
    data = items(18, seed=8, min_len=2)
    offline.capture(
        Toy(), batches(data), tmp_path, k=5, temperature=2.0, shard_tokens=25, progress=False
    )
    ds = offline.TopKDataset(tmp_path, vocab_size=50, k=5, temperature=2.0, inputs=data)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate)
    from_shards = _train(loader)
    same_numbers = _train(_in_memory(data, Toy(), quantise=True))
    assert from_shards[0] == same_numbers[0]
    for a, b in zip(from_shards[1], same_numbers[1], strict=True):
        assert torch.equal(a, b)
    exact = _train(_in_memory(data, Toy(), quantise=False))
    np.testing.assert_allclose(from_shards[0], exact[0], rtol=1e-3)


def test_fused_linear_loss_trains_from_a_collated_shard_batch(tmp_path):
    data = items(4, seed=9, min_len=3)
    offline.capture(Toy(), batches(data), tmp_path, k=5, progress=False)
    batch = collate([offline.TopKDataset(tmp_path, inputs=data)[i] for i in range(4)])
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(*batch["input_ids"].shape, 8, generator=g)[:, :-1]
    weight = torch.randn(50, 8, generator=g, requires_grad=True)
    labels = batch["labels"][:, 1:]
    topk = (batch["teacher_ids"][:, :-1], batch["teacher_logprobs"][:, :-1])
    fused = kdcore.fused_linear_distillation_loss(hidden, weight, teacher_topk=topk, labels=labels)
    logits = hidden.double() @ weight.double().T
    ref = kdcore.reference.sparse_kl_loss(logits, topk[0].long(), topk[1].double(), labels=labels)
    torch.testing.assert_close(fused.double(), ref, rtol=1e-4, atol=1e-5)


# --- serving-engine import --------------------------------------------------------------


class _Logprob:  # vLLM's per-token entry: an object with .logprob
    def __init__(self, logprob):
        self.logprob = logprob


def test_import_from_prompt_logprobs_equals_a_capture(tmp_path):
    data = items(7, seed=10)
    teacher = Toy()
    records = []
    for n, d in enumerate(data):
        tokens = d["input_ids"]
        lps = torch.log_softmax(teacher(tokens[None])[0].detach().float(), -1)
        positions = [None]
        for t in range(1, len(tokens)):
            row = lps[t - 1]
            top = row.topk(5).indices.tolist()
            if int(tokens[t]) not in top:
                top.append(int(tokens[t]))  # engines add the prompt token
            if n % 2:  # SGLang: (logprob, token_id, text) tuples
                positions.append([(float(row[i]), i, None) for i in top])
            else:  # vLLM: {token_id: Logprob}
                positions.append({i: _Logprob(float(row[i])) for i in top})
        records.append({"input_ids": tokens.tolist(), "prompt_logprobs": positions})
    offline.import_prompt_logprobs(records, tmp_path / "imp", k=5, vocab_size=50, progress=False)
    offline.capture(teacher, batches(data), tmp_path / "cap", k=5, progress=False)
    imported = offline.TopKDataset(tmp_path / "imp", vocab_size=50)
    captured = offline.TopKDataset(tmp_path / "cap")
    assert imported.manifest["source"] == "prompt_logprobs"
    for i in range(7):
        a, b = imported[i], captured[i]
        assert torch.equal(a["teacher_ids"], b["teacher_ids"])
        assert torch.equal(a["teacher_logprobs"], b["teacher_logprobs"])
    with pytest.raises(ValueError, match="fewer than k = 6"):
        offline.import_prompt_logprobs(records, tmp_path / "x", k=6, vocab_size=50, progress=False)
    bad = [{"input_ids": [1, 2, 3], "prompt_logprobs": [None, {1: -0.1}]}]
    with pytest.raises(ValueError, match="3 prompt tokens but 2 positions"):
        offline.import_prompt_logprobs(bad, tmp_path / "y", k=1, vocab_size=50, progress=False)


def test_bytes_per_entry_at_a_262144_vocabulary(tmp_path):
    g = torch.Generator().manual_seed(0)
    records = []
    for _ in range(16):
        length, k = 128, 64
        tokens = torch.randint(0, 262144, (length,), generator=g)
        positions = [None]
        for _ in range(1, length):
            start = int(torch.randint(0, 4096, (1,), generator=g))
            ids = start + 4096 * torch.randperm(k, generator=g)  # distinct, up to 262143
            lps = torch.log_softmax(torch.randn(k, generator=g) * 3, -1) - 0.05
            positions.append(dict(zip(ids.tolist(), lps.tolist(), strict=True)))
        records.append((tokens, positions))
    m = offline.import_prompt_logprobs(
        records, tmp_path, k=64, vocab_size=262144, shard_tokens=1024, progress=False
    )
    size = sum(p.stat().st_size for p in tmp_path.iterdir())
    entries = m["tokens"] * 64  # (token position, id, log-prob) entries described
    assert m["id_bits"] == 18 and m["value_bits"] == 14
    assert size / entries <= 4.0, size / entries


def test_tokenizer_fingerprint():
    tokenizers = pytest.importorskip("tokenizers")

    def make(vocab):
        return tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))

    a = make({"[UNK]": 0, "a": 1, "b": 2})
    assert offline.tokenizer_fingerprint(a) == offline.tokenizer_fingerprint(
        make({"b": 2, "a": 1, "[UNK]": 0})
    )
    assert offline.tokenizer_fingerprint(a) != offline.tokenizer_fingerprint(
        make({"[UNK]": 0, "a": 2, "b": 1})
    )
    assert offline.tokenizer_fingerprint(a).startswith("sha256:")
    with pytest.raises(TypeError, match="get_vocab"):
        offline.tokenizer_fingerprint(object())


def test_topk_dataset_keeps_a_bounded_number_of_shards_open(tmp_path, monkeypatch):
    from kdcore.offline import dataset

    monkeypatch.setattr(dataset, "MAX_OPEN_SHARDS", 2)
    data = items(10, seed=3)
    _capture(tmp_path, data)
    ds = offline.TopKDataset(tmp_path, inputs=data)
    assert len(ds.manifest["shards"]) == 3
    first = [ds[i] for i in range(10)]
    assert len(ds._open) == 2
    for i in reversed(range(10)):  # reopened shards give the same items
        assert torch.equal(ds[i]["teacher_logprobs"], first[i]["teacher_logprobs"])
    assert len(ds._open) == 2


def test_topk_dataset_pickles_for_loader_workers(tmp_path):
    import pickle

    _capture(tmp_path, items(5, seed=12))
    ds = offline.TopKDataset(tmp_path)
    first = ds[4]  # opens (and verifies) a shard
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._open == {}
    again = copy[4]
    assert torch.equal(again["teacher_ids"], first["teacher_ids"])
    assert torch.equal(again["teacher_logprobs"], first["teacher_logprobs"])
    with pytest.raises(IndexError, match="out of range for 5"):
        ds[5]
    assert torch.equal(ds[-1]["teacher_ids"], first["teacher_ids"])
