"""kdcore.train.distiller: Distiller.step and fit against hand-written training
loops whose losses are computed independently in float64 (train_helpers), plus
accumulation, a frozen teacher, resumable checkpoints, the records of the JSONL
log, precomputed teacher logits, fit's progress and partial windows, and errors."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

from kdcore import DEFAULT_SPAN_WEIGHTS, Span
from kdcore.train import Distiller, load_checkpoint, model_logits
from train_helpers import (
    SPAN_WEIGHTS,
    D,
    PlainLM,
    T,
    TinyLM,
    V,
    assert_params_close,
    ce_rows,
    combine,
    dense_loss,
    equal_count_batch,
    hand_train,
    kd_rows,
    lambda_lr,
    make_batch,
    max_change,
    n_tokens,
    one_thread,  # noqa: F401 (autouse: one thread per test)
    read_log,
    resumable,
    sgd,
    shifted,
    strict_json,
)

# --- tiny models ---------------------------------------------------------------------


class HFOutput:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class HFLM(TinyLM):
    """Returns an object with ``.logits`` and records the mask it was given."""

    def __init__(self, seed: int, dropout: float = 0.0) -> None:
        super().__init__(seed, dropout)
        self.masks: list = []

    def forward(self, input_ids, attention_mask=None):
        self.masks.append(attention_mask)
        return HFOutput(super().forward(input_ids, attention_mask))


class Poisoned(TinyLM):
    """A student whose logits become NaN while ``poison`` is set."""

    poison = False

    def forward(self, input_ids, attention_mask=None):
        out = super().forward(input_ids, attention_mask)
        return out + float("nan") if self.poison else out


# --- data ----------------------------------------------------------------------------


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            ids = torch.randint(0, V, (length,), generator=g)
            labels = ids.clone()
            labels[torch.rand(length, generator=g) < 0.25] = -100
            spans = torch.randint(1, 3, (length,), generator=g)  # reason / act only
            self.items.append({"input_ids": ids, "labels": labels, "spans": spans})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def shuffled_loader(n: int = 10, batch_size: int = 2, seed: int | None = None):
    # seed=None: no generator, the order comes from torch's global random state;
    # else the DataLoader's own generator (a fresh one, as a new process makes).
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        ListDataset(n), batch_size=batch_size, shuffle=True, generator=g
    )


# --- the hand-written loop -----------------------------------------------------------------


def assert_same_state(a, b, where="") -> None:
    """Recursive exact equality of (optimizer / scheduler) state dicts."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a), set(b))
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


# --- Distiller.step equals a hand-written loop ---------------------------------------------


CASES = [("sft", 0.0), ("token", 0.0), ("token", 0.3), ("span", 0.0), ("span", 0.3)]


@pytest.mark.parametrize(("mode", "alpha"), CASES)
def test_step_equals_hand_written_loop(mode, alpha):
    student, teacher = TinyLM(1), TinyLM(2)
    hand = copy.deepcopy(student)
    start = copy.deepcopy(student)
    batches = [make_batch(s) for s in range(4)]
    opt = sgd(student)
    d = Distiller(
        student,
        None if mode == "sft" else teacher,
        opt,
        loss=mode,
        alpha=alpha,
        temperature=T,
        span_weights=SPAN_WEIGHTS,
        max_grad_norm=0.25,
        scheduler=lambda_lr(opt),
    )
    records = [d.step(b) for b in batches]
    log = hand_train(hand, batches, dense_loss(teacher, mode, alpha), max_norm=0.25)

    assert any(n > 0.25 for n in log["norms"]), "clipping never engaged: the check is void"
    assert max_change(start, hand) > 1e-2
    assert_params_close(student, hand)
    for i, (rec, b) in enumerate(zip(records, batches, strict=True)):
        assert rec["loss"] == pytest.approx(log["loss"][i], rel=1e-5, abs=1e-6)
        assert rec["tokens"] == n_tokens(b)
        assert rec["stepped"] is True and rec["step"] == i + 1
    assert d.state.step == 4 and d.state.micro == 4
    assert d.state.tokens == sum(n_tokens(b) for b in batches)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 / 5)  # the scheduler stepped 4 times
    assert all(p.grad is None or not p.grad.any() for p in student.parameters())


def test_hugging_face_style_model_gets_the_attention_mask():
    student, teacher = HFLM(1), HFLM(2)
    hand_s, hand_t = copy.deepcopy(student), copy.deepcopy(teacher)
    batches = [make_batch(s, mask=True) for s in range(3)]
    opt = sgd(student)
    d = Distiller(
        student, teacher, opt, loss="token", alpha=0.3, temperature=T, scheduler=lambda_lr(opt)
    )
    for b in batches:
        d.step(b)

    def fwd(m, b):
        return m(b["input_ids"], attention_mask=b["attention_mask"]).logits

    def loss_fn(logits, b):
        student_, labels = shifted(logits, b)
        with torch.no_grad():
            t = fwd(hand_t.eval(), b)[:, :-1]
        kd = kd_rows(student_, t, T)
        return combine(0.3 * ce_rows(student_, labels) + 0.7 * kd, kd, b, "token", {})

    hand_train(hand_s, batches, loss_fn, forward=fwd)
    assert_params_close(student, hand_s)
    assert len(student.masks) == len(teacher.masks) == 3
    for i, b in enumerate(batches):
        assert torch.equal(student.masks[i], b["attention_mask"])
        assert torch.equal(teacher.masks[i], b["attention_mask"])
    out = model_logits(student, batches[0])
    assert isinstance(out, torch.Tensor) and out.shape == (3, 12, V)


def test_autocast_runs_the_forward_passes_in_bfloat16():
    student, teacher = TinyLM(1), TinyLM(2)
    b = make_batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        s_logits, t_logits = student(b["input_ids"]), teacher(b["input_ids"])
    assert s_logits.dtype == torch.bfloat16
    loss_fn = dense_loss(None, "span", 0.3)
    expected, _ = loss_fn(s_logits, dict(b, teacher_logits=t_logits))
    fp32, _ = loss_fn(student(b["input_ids"]), dict(b, teacher_logits=teacher(b["input_ids"])))
    d = Distiller(
        student,
        teacher,
        sgd(student),
        loss="span",
        alpha=0.3,
        temperature=T,
        span_weights=SPAN_WEIGHTS,
        autocast=True,
    )
    rec = d.step(b)
    assert rec["loss"] == pytest.approx(expected.item(), rel=1e-4)
    assert rec["loss"] != pytest.approx(fp32.item(), rel=1e-5)  # autocast was in effect
    assert all(p.dtype == torch.float32 for p in student.parameters())


# --- gradient accumulation --------------------------------------------------------------


def test_gradient_accumulation_equals_one_step_on_the_concatenated_batch():
    k, rounds = 3, 2
    student, teacher = TinyLM(1), TinyLM(2)
    big = copy.deepcopy(student)
    micros = [equal_count_batch(s, labelled=11) for s in range(k * rounds)]
    assert {n_tokens(m) for m in micros} == {11}

    opt = sgd(student)
    d = Distiller(
        student,
        teacher,
        opt,
        loss="token",
        alpha=0.3,
        temperature=T,
        grad_accum_steps=k,
        max_grad_norm=0.1,  # below the gradient norms here: clipping acts on the sum
        scheduler=lambda_lr(opt),
    )
    opt_big = sgd(big)
    d_big = Distiller(
        big,
        teacher,
        opt_big,
        loss="token",
        alpha=0.3,
        temperature=T,
        max_grad_norm=0.1,
        scheduler=lambda_lr(opt_big),
    )

    before = copy.deepcopy(student)
    flags = []
    for r in range(rounds):
        for i in range(k):
            rec = d.step(micros[r * k + i])
            flags.append(rec["stepped"])
            if i < k - 1:  # nothing moves between optimizer steps
                assert rec["step"] == r and d.state.step == r
                assert max_change(before, student) == 0.0
        assert d.state.step == r + 1
        before = copy.deepcopy(student)
        cat = {key: torch.cat([m[key] for m in micros[r * k : (r + 1) * k]]) for key in micros[0]}
        d_big.step(cat)
    assert flags == [False, False, True] * rounds
    assert d.state.micro == k * rounds and d_big.state.step == rounds
    assert_params_close(student, big)


# --- the teacher is frozen ---------------------------------------------------------------


def test_teacher_is_frozen_in_eval_mode():
    student, teacher = TinyLM(1), TinyLM(2, dropout=0.5)
    x = make_batch(0)["input_ids"]
    probe = copy.deepcopy(teacher).train()
    assert not torch.equal(probe(x), probe(x)), "dropout inactive: eval mode would not matter"

    teacher.train()
    snapshot = copy.deepcopy(teacher.state_dict())
    d = Distiller(student, teacher, sgd(student), loss="span", temperature=T)
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())

    b = make_batch(1)
    hand = copy.deepcopy(student)
    loss_a, _ = d.compute_loss(b)
    loss_b, _ = d.compute_loss(b)
    assert loss_a.item() == loss_b.item()  # a teacher in train mode would differ (dropout)
    reference = dense_loss(copy.deepcopy(teacher), "span", 0.0, weights=DEFAULT_SPAN_WEIGHTS)
    expected, _ = reference(hand(b["input_ids"]), b)
    assert loss_a.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)

    d.fit([make_batch(s) for s in range(3)], progress=False)
    assert not teacher.training
    for name, p in teacher.named_parameters():
        assert torch.equal(p, snapshot[name]) and p.grad is None and not p.requires_grad


# --- resume equivalence ---------------------------------------------------------------------


def assert_same_training(a: Distiller, b: Distiller) -> None:
    for (name, x), (_, y) in zip(
        a.student.named_parameters(), b.student.named_parameters(), strict=True
    ):
        assert torch.equal(x, y), f"parameter {name} differs"
    assert_same_state(a.optimizer.state_dict(), b.optimizer.state_dict(), "optimizer")
    assert_same_state(a.scheduler.state_dict(), b.scheduler.state_dict(), "scheduler")
    # Everything but the wall-clock seconds trained.
    assert dataclasses.replace(a.state, seconds=0.0) == dataclasses.replace(b.state, seconds=0.0)


@pytest.mark.parametrize("loader_seed", [None, 7], ids=["global-rng", "own-generator"])
@pytest.mark.parametrize(
    ("accum", "m", "n", "every"),
    [
        (1, 3, 8, 1),  # mid-epoch 0, finishing in epoch 1
        (1, 5, 9, 5),  # exactly at the end of epoch 0
        (1, 7, 12, 1),  # resumed in a later epoch (epoch 1, 2 micro-batches in)
        (2, 3, 7, 3),  # accumulation; step 3 spans the epoch boundary
    ],
)
def test_resume_equals_straight_run(tmp_path, accum, m, n, every, loader_seed):
    def loader():  # 5 micro-batches per epoch; each run builds its own, like a new process
        return shuffled_loader(seed=loader_seed)

    teacher = TinyLM(99)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        straight = resumable(tmp_path / "a", 1, accum=accum, every=every, teacher=teacher)
        straight.fit(loader(), epochs=10, max_steps=n, progress=False)

        torch.manual_seed(1234)
        first = resumable(tmp_path / "b", 1, accum=accum, every=every, teacher=teacher)
        first.fit(loader(), epochs=10, max_steps=m, progress=False)
        assert first.state.step == m
        torch.rand(17)  # the process goes on: the global random state moves
        second = resumable(tmp_path / "b", 7, accum=accum, every=every, teacher=teacher)
        assert max_change(second.student, first.student) > 0.1  # a different init
        second.fit(loader(), epochs=10, max_steps=n, resume=True, progress=False)

        torch.manual_seed(4321)  # control: dropout (and a global-RNG order) depend on the RNG
        other = resumable(tmp_path / "c", 1, accum=accum, every=every, teacher=teacher)
        other.fit(loader(), epochs=10, max_steps=n, progress=False)

    assert straight.state.step == n and second.state.step == n
    assert_same_training(straight, second)
    assert max_change(other.student, straight.student) > 1e-4
    steps = [r["step"] for r in read_log(tmp_path / "b" / "log.jsonl")]
    assert steps == list(range(1, n + 1))
    # The final checkpoint holds the same training state.
    ckpt = load_checkpoint(tmp_path / "b" / "last.pt")
    assert ckpt["state"]["step"] == n
    for key, value in straight.student.state_dict().items():
        assert torch.equal(ckpt["student"][key], value)


class CrashingLoader:
    """Iterates a loader and raises at its ``crash_at``-th micro-batch (1-based, overall)."""

    def __init__(self, loader, crash_at: int) -> None:
        self.loader, self.crash_at, self.seen = loader, crash_at, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.seen += 1
            if self.seen == self.crash_at:
                raise RuntimeError("simulated crash")
            yield batch


def test_resume_after_a_crash_loses_no_finished_step(tmp_path):
    loader = shuffled_loader()
    teacher = TinyLM(99)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        straight = resumable(tmp_path / "a", 1, accum=2, every=2, teacher=teacher)
        straight.fit(loader, epochs=3, progress=False)

        torch.manual_seed(5)
        crashed = resumable(tmp_path / "b", 1, accum=2, every=2, teacher=teacher)
        with pytest.raises(RuntimeError, match="simulated crash"):
            crashed.fit(CrashingLoader(loader, crash_at=12), epochs=3, progress=False)
        assert crashed.state.step == 5  # 11 micro-batches ran; the checkpoint is at step 4
        assert load_checkpoint(tmp_path / "b" / "last.pt")["state"]["step"] == 4
        torch.rand(3)
        resumed = resumable(tmp_path / "b", 8, accum=2, every=2, teacher=teacher)
        resumed.fit(loader, epochs=3, resume=tmp_path / "b" / "last.pt", progress=False)
    assert straight.state.step == math.ceil(15 / 2)
    assert_same_training(straight, resumed)
    # The log is the straight run's: step 5, written before the crash, is
    # written again after the resume and its first record is set aside.
    straight_log, log = (
        read_log(tmp_path / "a" / "log.jsonl"),
        read_log(tmp_path / "b" / "log.jsonl"),
    )
    assert [r["step"] for r in log] == list(range(1, 9))
    for a, b in zip(straight_log, log, strict=True):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"], a["step"]
    assert [r["step"] for r in read_log(tmp_path / "b" / "log.jsonl.discarded")] == [5]
    elapsed = [r["elapsed_s"] for r in log]
    assert elapsed == sorted(elapsed)  # training time goes on across the resume


def test_checkpoints_only_at_optimizer_step_boundaries(tmp_path, monkeypatch):
    import kdcore.train.checkpointing as checkpointing

    saved = []
    real = checkpointing.atomic_save

    def spy(obj, path):
        saved.append(dict(obj["state"]))
        real(obj, path)

    monkeypatch.setattr(checkpointing, "atomic_save", spy)
    d = resumable(tmp_path, 1, accum=2, every=1)
    batches = [make_batch(s) for s in range(5)]
    d.fit(batches, epochs=2, progress=False)  # 10 micro-batches -> 5 steps
    assert [s["step"] for s in saved] == [1, 2, 3, 4, 5, 5]
    assert all(s["micro"] == 2 * s["step"] for s in saved)

    d2 = resumable(tmp_path / "x", 1, accum=2, every=0)
    assert d2.step(batches[0])["stepped"] is False
    with pytest.raises(RuntimeError, match="boundary"):
        d2.save()
    assert not (tmp_path / "x" / "last.pt").exists()


def test_fit_totals_count_from_the_start_of_training(tmp_path):
    batches = [make_batch(s) for s in range(3)]
    with torch.random.fork_rng():
        torch.manual_seed(3)
        twice = resumable(tmp_path / "a", 1, every=0)
        twice.fit(batches, epochs=1, progress=False)
        with pytest.raises(ValueError, match="nothing to train"):
            twice.fit(batches, epochs=1, progress=False)
        twice.fit(batches, epochs=2, progress=False)  # one more epoch
        torch.manual_seed(3)
        once = resumable(tmp_path / "b", 1, every=0)
        once.fit(batches, epochs=2, progress=False)
    assert twice.state.step == 6
    assert_same_training(once, twice)
    assert [r["step"] for r in read_log(tmp_path / "a" / "log.jsonl")] == list(range(1, 7))
    # A finished run resumed again has nothing to do, and says so by doing nothing.
    again = resumable(tmp_path / "a", 2, every=0)
    assert again.fit(batches, epochs=2, resume=True, progress=False)["steps"] == 6
    assert [r["step"] for r in read_log(tmp_path / "a" / "log.jsonl")] == list(range(1, 7))


def test_resume_from_a_save_after_fit_or_an_older_checkpoint(tmp_path):
    # A checkpoint saved after fit returned holds the loader's generator states
    # too; one without them (older kdcore) resumes with the loader as it is.
    def run(path, resume=None):
        with torch.random.fork_rng():
            torch.manual_seed(11)
            d = resumable(path, 1, every=0)
            d.fit(
                shuffled_loader(seed=3),
                epochs=2,
                max_steps=7 if resume is None else None,
                resume=resume or False,
                progress=False,
            )
        return d

    straight = run(tmp_path / "a")
    with torch.random.fork_rng():
        torch.manual_seed(11)
        first = resumable(tmp_path / "b", 1, every=0)
        first.fit(shuffled_loader(seed=3), epochs=1, progress=False)  # an epoch boundary
        first.save(tmp_path / "b" / "saved.pt")  # (the global RNG state of that moment)
    assert len(load_checkpoint(tmp_path / "b" / "saved.pt")["loader_rng"]) == 1
    resumed = resumable(tmp_path / "b", 5, every=0)
    resumed.fit(
        shuffled_loader(seed=3),
        epochs=2,
        max_steps=7,
        resume=tmp_path / "b" / "saved.pt",
        progress=False,
    )
    assert_same_training(straight, resumed)

    old = load_checkpoint(tmp_path / "b" / "saved.pt")
    old["epoch_rng"], old["loader_rng"] = old["epoch_rng"]["torch"], []  # the old format
    torch.save(old, tmp_path / "b" / "old.pt")
    again = resumable(tmp_path / "b", 5, every=0)
    again.fit(
        shuffled_loader(seed=3),
        epochs=2,
        max_steps=7,
        resume=tmp_path / "b" / "old.pt",
        progress=False,
    )
    assert again.state.step == 7


def test_resume_true_without_a_checkpoint_starts_fresh(tmp_path):
    d = resumable(tmp_path, 1)
    d.fit([make_batch(0), make_batch(1)], resume=True, progress=False)
    assert d.state.step == 2 and (tmp_path / "last.pt").exists()


def test_resume_with_the_wrong_loader_is_an_error(tmp_path):
    d = resumable(tmp_path, 1)
    d.fit([make_batch(s) for s in range(4)], max_steps=3, progress=False)
    fresh = resumable(tmp_path, 2)
    with pytest.raises(RuntimeError, match="loader"):
        fresh.fit([make_batch(0)], resume=True, progress=False)


# --- the JSONL log's records ----------------------------------------------------------------


def test_jsonl_log_records_every_step_with_per_span_divergences(tmp_path):
    student, teacher = TinyLM(1), TinyLM(2)
    hand = copy.deepcopy(student)
    batches = [make_batch(s) for s in range(3)]
    opt = sgd(student)
    d = Distiller(
        student,
        teacher,
        opt,
        loss="span",
        temperature=T,
        span_weights=SPAN_WEIGHTS,
        scheduler=lambda_lr(opt),
        log_path=tmp_path / "logs" / "train.jsonl",
    )
    result = d.fit(batches, progress=False)
    log = hand_train(hand, batches, dense_loss(teacher, "span", 0.0))
    assert_params_close(student, hand)

    lines = (tmp_path / "logs" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 3
    records = [strict_json(line) for line in lines]
    elapsed = 0.0
    for i, (rec, b) in enumerate(zip(records, batches, strict=True)):
        assert {"step", "loss", "tokens", "tokens_per_s", "lr", "elapsed_s"} <= set(rec)
        assert rec["step"] == i + 1
        assert rec["tokens"] == n_tokens(b)
        assert math.isfinite(rec["tokens_per_s"]) and rec["tokens_per_s"] > 0
        assert rec["elapsed_s"] >= elapsed
        elapsed = rec["elapsed_s"]
        # Computed before the optimizer step, on that step's own batch.
        assert rec["loss"] == pytest.approx(log["loss"][i], rel=1e-5, abs=1e-6)
        comps = log["comps"][i]
        assert rec["span_reason"] == pytest.approx(comps[Span.REASON], rel=1e-5, abs=1e-6)
        assert rec["span_act"] == pytest.approx(comps[Span.ACT], rel=1e-5, abs=1e-6)
        assert rec["loss"] == pytest.approx(
            comps[Span.REASON] + 0.5 * comps[Span.ACT], rel=1e-5, abs=1e-6
        )
        assert "span_prompt" not in rec and "span_observation" not in rec  # weight 0
    assert result["steps"] == 3
    assert result["loss"] == pytest.approx(log["loss"][-1], rel=1e-5, abs=1e-6)
    assert result["tokens"] == sum(n_tokens(b) for b in batches)


def test_jsonl_log_span_components_with_accumulation(tmp_path):
    # Micro-batch 1 has only ACT targets, micro-batch 2 only REASON ones: the
    # step's record has each span's value from the micro-batch that has it.
    student, teacher = TinyLM(1), TinyLM(2)
    batches = []
    for seed, span in ((0, Span.ACT), (1, Span.REASON)):
        b = make_batch(seed)
        b["spans"] = torch.full_like(b["spans"], int(span))
        batches.append(b)
    hand = dense_loss(teacher, "span", 0.0)
    expected = [hand(copy.deepcopy(student)(b["input_ids"]), b)[1] for b in batches]
    d = Distiller(
        student,
        teacher,
        sgd(student),
        loss="span",
        temperature=T,
        span_weights=SPAN_WEIGHTS,
        grad_accum_steps=2,
        log_path=tmp_path / "log.jsonl",
    )
    d.fit(batches, progress=False)
    (rec,) = read_log(tmp_path / "log.jsonl")
    assert rec["span_act"] == pytest.approx(expected[0][Span.ACT], rel=1e-5, abs=1e-6)
    assert rec["span_reason"] == pytest.approx(expected[1][Span.REASON], rel=1e-5, abs=1e-6)


def test_jsonl_log_lr_is_the_rate_the_step_used(tmp_path):
    # A record describes one optimizer step: its loss is computed before the step,
    # and its lr should be the learning rate that step applied.
    student = TinyLM(1)
    opt = sgd(student)
    d = Distiller(
        student, None, opt, loss="sft", scheduler=lambda_lr(opt), log_path=tmp_path / "log.jsonl"
    )
    d.fit([make_batch(s) for s in range(3)], progress=False)
    lrs = [r["lr"] for r in read_log(tmp_path / "log.jsonl")]
    assert lrs == pytest.approx([0.5, 0.5 / 2, 0.5 / 3])


# --- precomputed teacher logits ----------------------------------------------------------


@pytest.mark.parametrize("mode", ["token", "span"])
def test_teacher_logits_in_the_batch_equal_the_teacher_model(mode):
    student, teacher = TinyLM(1), TinyLM(2)
    other = copy.deepcopy(student)
    opt_a, opt_b = sgd(student), sgd(other)
    a = Distiller(
        student, teacher, opt_a, loss=mode, alpha=0.3, temperature=T, scheduler=lambda_lr(opt_a)
    )
    b = Distiller(
        other, None, opt_b, loss=mode, alpha=0.3, temperature=T, scheduler=lambda_lr(opt_b)
    )
    for s in range(3):
        batch = make_batch(s)
        with torch.no_grad():
            logits = teacher(batch["input_ids"])
        ra = a.step(batch)
        rb = b.step(dict(batch, teacher_logits=logits))
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)
    assert_params_close(student, other, rtol=1e-6, atol=1e-7)
    # and the stored logits are really used: other logits give another step
    c_s = copy.deepcopy(other)
    c = Distiller(c_s, None, sgd(c_s), loss=mode, temperature=T)
    batch = make_batch(9)
    r1 = c.compute_loss(dict(batch, teacher_logits=torch.zeros(3, 12, V)))[0].item()
    r2 = c.compute_loss(dict(batch, teacher_logits=TinyLM(3)(batch["input_ids"])))[0].item()
    assert r1 != pytest.approx(r2)


# --- errors ----------------------------------------------------------------------------


def test_constructor_errors(tmp_path):
    s = TinyLM(1)
    with pytest.raises(ValueError, match="optimizer"):
        Distiller(s, None)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="grad_accum_steps"):
            Distiller(s, None, sgd(s), grad_accum_steps=bad)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        Distiller(s, None, sgd(s), checkpoint_every=2)
    with pytest.raises(ValueError, match="max_grad_norm"):
        Distiller(s, None, sgd(s), max_grad_norm=0.0)
    with pytest.raises(ValueError, match="checkpoint_every"):
        Distiller(s, None, sgd(s), checkpoint_every=-1, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="loss"):
        Distiller(s, None, sgd(s), loss="hinge")
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            Distiller(s, TinyLM(2), sgd(s), alpha=bad)
    for name in ("temperature", "teacher_temperature"):
        for bad in (0.0, -1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match=f"^{name}: "):
                Distiller(s, TinyLM(2), sgd(s), **{name: bad})


def test_batch_errors():
    s, t = TinyLM(1), TinyLM(2)
    b = make_batch(0)
    d = Distiller(s, t, sgd(s), loss="span")
    with pytest.raises(KeyError, match="spans"):
        d.step({k: v for k, v in b.items() if k != "spans"})
    with pytest.raises(ValueError, match="must match input_ids"):
        d.step(dict(b, labels=b["labels"][:, :-1]))
    with pytest.raises(KeyError, match="labels"):
        d.step({"input_ids": b["input_ids"]})
    for mode in ("token", "span"):
        no_teacher = Distiller(s, None, sgd(s), loss=mode)
        with pytest.raises(ValueError, match="needs a teacher"):
            no_teacher.step(b)
    assert d.state.micro == 0 and d.state.step == 0


def test_fit_errors(tmp_path):
    s = TinyLM(1)
    d = Distiller(s, None, sgd(s), loss="sft", checkpoint_dir=tmp_path)
    with pytest.raises(FileNotFoundError):
        d.fit([make_batch(0)], resume=tmp_path / "missing.pt", progress=False)
    with pytest.raises(ValueError, match="epochs"):
        d.fit([make_batch(0)], epochs=0, progress=False)
    with pytest.raises(ValueError, match="max_steps"):
        d.fit([make_batch(0)], max_steps=0, progress=False)
    plain = Distiller(s, None, sgd(s), loss="sft")
    with pytest.raises(ValueError, match="checkpoint_dir"):
        plain.fit([make_batch(0)], resume=True, progress=False)
    with pytest.raises(ValueError, match="path"):
        plain.save()
    assert d.state.step == 0 and plain.state.step == 0


@pytest.mark.parametrize("mode", ["sft", "token"])
def test_non_finite_loss_raises_and_does_not_step(mode):
    student, teacher = Poisoned(1), TinyLM(2)
    opt = sgd(student)
    d = Distiller(student, teacher, opt, loss=mode, temperature=T)
    d.step(make_batch(0))  # a good step first: momentum exists
    snapshot = copy.deepcopy(student.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    student.poison = True
    with pytest.raises(FloatingPointError):
        d.step(make_batch(1))
    for name, p in student.named_parameters():
        assert torch.equal(p, snapshot[name]), name
        assert p.grad is None or not p.grad.any(), "a non-finite loss was backpropagated"
    assert_same_state(opt.state_dict(), opt_state, "optimizer")
    assert d.state.step == 1 and d.state.micro == 1
    student.poison = False
    assert d.step(make_batch(1))["step"] == 2


# --- fit: progress bar, max_steps, a last partial accumulation ------------------------------


def test_fit_progress_bar_and_max_steps(tmp_path, capsys):
    s = TinyLM(1)
    d = Distiller(s, None, sgd(s), loss="sft", log_path=tmp_path / "log.jsonl")
    batches = [make_batch(i) for i in range(4)]
    result = d.fit(batches, epochs=5, max_steps=6, progress=True, description="kd-run")
    err = capsys.readouterr().err
    assert "kd-run" in err and "6/6" in err
    assert result["steps"] == 6 and d.state.step == 6 and d.state.micro == 6
    assert d.state.epoch == 1 and d.state.micro_in_epoch == 2
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 6

    s2 = TinyLM(1)
    d2 = Distiller(s2, None, sgd(s2), loss="sft")
    d2.fit(batches, epochs=1, progress=False)
    assert capsys.readouterr().err == ""
    assert d2.state.step == 4 and d2.state.epoch == 1


def test_fit_flushes_a_last_partial_accumulation(tmp_path):
    batches = [equal_count_batch(i, labelled=9) for i in range(5)]
    student = TinyLM(1)
    start = copy.deepcopy(student)
    d = Distiller(
        student,
        None,
        sgd(student, lr=0.2),
        loss="sft",
        grad_accum_steps=2,
        log_path=tmp_path / "log.jsonl",
    )
    result = d.fit(batches, progress=False)
    assert result["steps"] == 3 and d.state.step == 3 and d.state.micro == 5
    records = read_log(tmp_path / "log.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["tokens"] for r in records] == [18, 18, 9]
    assert all(p.grad is None for p in student.parameters())

    # Without the flush the fifth micro-batch would not count: compare with 4 micro-batches.
    four = copy.deepcopy(start)
    d4 = Distiller(four, None, sgd(four, lr=0.2), loss="sft", grad_accum_steps=2)
    d4.fit(batches[:4], progress=False)
    assert d4.state.step == 2
    assert max_change(four, student) > 1e-4


def test_a_last_partial_window_steps_on_the_mean_of_its_micro_batches():
    # 3 micro-batches with k = 2: the third is stepped alone, with its own full
    # gradient (as if k were 1 for it), not half of it.
    batches = [equal_count_batch(i, labelled=9) for i in range(3)]
    student = TinyLM(4)
    expected = copy.deepcopy(student)
    d = Distiller(student, None, sgd(student, lr=0.2), loss="sft", grad_accum_steps=2)
    d.fit(batches, progress=False)

    def ce(logits, batch):
        s, labels = shifted(logits, batch)
        valid = labels != -100
        return ce_rows(s, labels.clamp_min(0))[valid].mean(), {}

    opt = sgd(expected, lr=0.2)
    for group in (batches[:2], batches[2:]):
        for batch in group:
            (ce(expected(batch["input_ids"]), batch)[0] / len(group)).backward()
        opt.step()
        opt.zero_grad()
    assert_params_close(student, expected)


def test_plain_modules_are_called_without_the_attention_mask():
    batch = make_batch(3, mask=True)
    assert "attention_mask" in batch
    student = PlainLM()
    d = Distiller(student, None, sgd(student), loss="sft")
    record = d.step(batch)
    assert math.isfinite(record["loss"]) and record["stepped"]
    seq = nn.Sequential(nn.Embedding(V, D), nn.Linear(D, V))
    d = Distiller(seq, None, sgd(seq), loss="sft")
    assert math.isfinite(d.step(batch)["loss"])


def test_bad_batches_are_clear_errors():
    d = Distiller(TinyLM(1), TinyLM(2), sgd(TinyLM(1)), loss="span")
    b = make_batch(0)
    with pytest.raises(TypeError, match="mapping"):
        d.step((b["input_ids"], b["labels"]))
    with pytest.raises(ValueError, match=r"\(batch, sequence\)"):
        d.step({k: v[0] for k, v in b.items()})  # one sequence without a batch dimension
    with pytest.raises(ValueError, match=r"spans \(3, 11\) must match input_ids \(3, 12\)"):
        d.step({**b, "spans": b["spans"][:, 1:]})


def test_reduce_lr_on_plateau_steps_on_the_mean_loss_of_each_step(tmp_path):
    seen = []

    class Plateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
        def step(self, metrics):
            seen.append(float(metrics))
            super().step(metrics)

    student = TinyLM(1)
    opt = sgd(student)
    d = Distiller(
        student,
        TinyLM(2),
        opt,
        loss="span",
        grad_accum_steps=2,
        scheduler=Plateau(opt, patience=0, factor=0.5),
        log_path=tmp_path / "log.jsonl",
    )
    d.fit([make_batch(s) for s in range(6)], progress=False)
    logged = [r["loss"] for r in read_log(tmp_path / "log.jsonl")]
    assert seen == pytest.approx(logged, rel=1e-6) and len(seen) == 3
