"""The Distiller on 2 processes (gloo, 127.0.0.1): a DDP or FSDP2 student
takes the step one process takes on the global batch — checked against a
hand-written float64 loop over the concatenated batch — when the ranks and
micro-batches hold different numbers of labelled tokens; rank-0 checkpoints
and logs; a rank that dies ends the others with a clear error, not a hang."""

from __future__ import annotations

import copy
import os
import time

import pytest
import torch

from dist_harness import run, values
from kdcore.train import Distiller
from train_helpers import (
    SPAN_WEIGHTS,
    PlainLM,
    T,
    TinyLM,
    assert_params_close,
    dense_loss,
    equal_count_batch,
    hand_train,
    lambda_lr,
    max_change,
    n_tokens,
    read_log,
    sgd,
    sparse_loss,
    with_top_k,
)

WORLD, ACCUM, STEPS = 2, 2, 2
#: Labelled tokens of each rank's micro-batches (2 sequences of 10 tokens):
#: rank 0 holds few, rank 1 many, so a per-rank mean is far from the global one.
LABELLED = {0: [2, 5, 3, 4], 1: [14, 9, 16, 11]}
TOPK = 5
MAX_NORM = 0.25  # below the gradient norms here: clipping acts on the global gradient


def rank_batches(rank: int, topk: bool) -> list[dict]:
    """Rank ``rank``'s micro-batches, in order (STEPS × ACCUM of them)."""
    out = [equal_count_batch(100 * rank + i, labelled=n) for i, n in enumerate(LABELLED[rank])]
    if topk:
        out = [with_top_k(b, TinyLM(2), TOPK) for b in out]
    return out


def global_batches(topk: bool) -> list[dict]:
    """One batch per optimizer step: every rank's micro-batches of that step, concatenated."""
    per_rank = [rank_batches(r, topk) for r in range(WORLD)]
    steps = []
    for s in range(STEPS):
        parts = [b for r in range(WORLD) for b in per_rank[r][s * ACCUM : (s + 1) * ACCUM]]
        steps.append({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
    return steps


def _wrap(model, how: str):
    if how == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model)


def _train_on_ranks(rank, world, mode, alpha, topk, how, tmp):
    from kdcore.train import distributed as dist

    student = _wrap(TinyLM(1), how)
    opt = sgd(student)
    d = Distiller(
        student,
        None if topk else TinyLM(2),
        opt,
        loss=mode,
        alpha=alpha,
        temperature=T,
        span_weights=SPAN_WEIGHTS,
        grad_accum_steps=ACCUM,
        scheduler=lambda_lr(opt),
        max_grad_norm=MAX_NORM,
        log_path=os.path.join(tmp, "train.jsonl"),
        checkpoint_dir=os.path.join(tmp, "ckpt"),
    )
    d.fit(rank_batches(rank, topk), progress=False)
    trained = {k: v.detach().clone() for k, v in dist.model_state(student).items()}
    # Resume on every rank from rank 0's file into a differently initialised student.
    fresh = _wrap(TinyLM(7), how)
    opt2 = sgd(fresh)
    d2 = Distiller(
        fresh,
        None if topk else TinyLM(2),
        opt2,
        loss=mode,
        alpha=alpha,
        temperature=T,
        span_weights=SPAN_WEIGHTS,
        grad_accum_steps=ACCUM,
        scheduler=lambda_lr(opt2),
    )
    d2.load(os.path.join(tmp, "ckpt", "last.pt"))
    resumed = {k: v.detach().clone() for k, v in dist.model_state(fresh).items()}
    same = all(torch.equal(trained[k], resumed[k]) for k in trained)
    return {"params": trained if rank == 0 else None, "resumed_equal": same, "step": d2.state.step}


CASES = [
    ("token", 0.3, False, "ddp"),
    ("span", 0.3, False, "ddp"),
    ("span", 0.0, True, "ddp"),  # a stored top-k teacher, span-normalised
    ("span", 0.3, False, "fsdp"),
]


def _every_case(rank, world, tmp):
    """All CASES in one pair of processes (starting processes is the slow part)."""
    return [
        _train_on_ranks(rank, world, *case, os.path.join(tmp, str(i)))
        for i, case in enumerate(CASES)
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ranks")
    return tmp, values(run(_every_case, WORLD, tmp, str(tmp), timeout_s=240))


@pytest.mark.parametrize("index", range(len(CASES)), ids=["-".join(map(str, c)) for c in CASES])
def test_two_ranks_take_the_step_of_one_process_on_the_global_batch(trained, index):
    mode, alpha, topk, _ = CASES[index]
    tmp, outs = trained
    tmp = tmp / str(index)
    results = [out[index] for out in outs]
    steps = global_batches(topk)
    reference = TinyLM(1)
    start = copy.deepcopy(reference)
    loss_fn = sparse_loss(mode, alpha) if topk else dense_loss(TinyLM(2), mode, alpha)
    # float64 loss on the concatenated batch
    log = hand_train(reference, steps, loss_fn, max_norm=MAX_NORM)
    assert max_change(start, reference) > 1e-2
    assert any(n > MAX_NORM for n in log["norms"]), "clipping never engaged: the check is void"

    got = TinyLM(0)
    got.load_state_dict(results[0]["params"])
    assert_params_close(got, reference)
    assert all(r["resumed_equal"] and r["step"] == STEPS for r in results)
    files = os.listdir(tmp / "ckpt")
    assert files == ["last.pt"], files
    # One log, written by rank 0, with the global step's loss and tokens.
    records = read_log(tmp / "train.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for rec, batch, loss in zip(records, steps, log["loss"], strict=True):
        assert rec["tokens"] == n_tokens(batch)
        assert rec["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)


def _wrapper_checks(rank, world):
    out = {}
    # A DDP student whose own forward takes no attention_mask.
    student = torch.nn.parallel.DistributedDataParallel(PlainLM())
    d = Distiller(student, None, sgd(student), loss="sft")
    batch = equal_count_batch(rank, labelled=6)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    out["plain_ddp_loss"] = d.step(batch)["loss"]
    # A plain student under a process group: its gradients would diverge.
    try:
        Distiller(TinyLM(1), None, sgd(TinyLM(1)), loss="sft")
        out["plain_error"] = None
    except ValueError as exc:
        out["plain_error"] = str(exc)
    return out


def test_ddp_student_without_attention_mask_and_unwrapped_students(tmp_path):
    for out in values(run(_wrapper_checks, WORLD, tmp_path)):
        assert out["plain_ddp_loss"] == out["plain_ddp_loss"]  # finite, no TypeError
        assert "DistributedDataParallel" in out["plain_error"]
        assert "fully_shard" in out["plain_error"]


def _dead_rank(rank, world):
    student = torch.nn.parallel.DistributedDataParallel(TinyLM(1))
    d = Distiller(student, TinyLM(2), sgd(student), loss="token", collective_timeout=5.0)
    torch.distributed.barrier()
    if rank == 1:
        os._exit(3)  # dies without a word to the group
    time.sleep(0.5)
    start = time.monotonic()
    try:
        d.step(equal_count_batch(0, labelled=5))
    except RuntimeError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def test_a_dead_rank_ends_the_survivor_with_a_clear_error(tmp_path):
    results = run(_dead_rank, WORLD, tmp_path, timeout_s=90)
    assert results[1]["exitcode"] == 3
    assert results[0]["ok"], results[0]
    out = results[0]["value"]
    assert out["error"] is not None, "the step completed without the other rank"
    assert "did not complete" in out["error"] and "died" in out["error"], out["error"]
    assert out["seconds"] < 30


@pytest.mark.parametrize(("mode", "alpha"), [("token", 0.3), ("span", 0.3), ("sft", 0.0)])
def test_one_process_accumulation_normalises_over_the_whole_step(mode, alpha):
    # fit reads each step's micro-batches ahead: with uneven labelled tokens the
    # step is the one on their concatenation, not the mean of per-batch means.
    micros = rank_batches(1, False) + rank_batches(0, False)
    student, teacher = TinyLM(1), TinyLM(2)
    opt = sgd(student)
    d = Distiller(
        student,
        teacher,
        opt,
        loss=mode,
        alpha=alpha,
        temperature=T,
        span_weights=SPAN_WEIGHTS,
        grad_accum_steps=4,
        scheduler=lambda_lr(opt),
    )
    d.fit(micros, progress=False)
    steps = [{k: torch.cat([m[k] for m in micros[i : i + 4]]) for k in micros[0]} for i in (0, 4)]
    reference = TinyLM(1)
    hand_train(reference, steps, dense_loss(teacher, mode, alpha))
    assert_params_close(student, reference)
    if mode == "token":  # the mean of per-micro-batch means is a different step here
        means = TinyLM(1)
        hand_train(means, micros, dense_loss(teacher, mode, alpha), accum=4)
        assert max_change(means, reference) > 1e-3


def test_distributed_sampler_epochs_and_timeout_argument():
    class Sampler:
        def __init__(self) -> None:
            self.epochs: list[int] = []

        def set_epoch(self, epoch: int) -> None:
            self.epochs.append(epoch)

    class Loader(list):
        sampler = Sampler()

    loader = Loader(rank_batches(0, False)[:2])
    student = TinyLM(1)
    d = Distiller(student, None, sgd(student), loss="sft")
    d.fit(loader, epochs=3, progress=False)
    assert loader.sampler.epochs == [0, 1, 2]  # each epoch's order, as DistributedSampler needs
    with pytest.raises(ValueError, match="collective_timeout"):
        Distiller(student, None, sgd(student), loss="sft", collective_timeout=0)
