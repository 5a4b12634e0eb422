"""Helpers shared by the test_train_*.py files: tiny models, batches, losses
computed independently in float64 (shifted logits, T²·KL, per-span means) and the
hand-written training loop the Distiller is checked against."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import kdcore
from kdcore import Span
from kdcore.train import Distiller

V = 40  # vocabulary
D = 16  # hidden size
T = 2.0  # distillation temperature
SPAN_WEIGHTS = {Span.PROMPT: 0.0, Span.REASON: 1.0, Span.ACT: 0.5, Span.OBSERVATION: 0.0}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread each for torch and kdcore (no spinning on a shared CPU)."""
    torch_threads, kd_threads = torch.get_num_threads(), kdcore.get_num_threads()
    torch.set_num_threads(1)
    kdcore.set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    kdcore.set_num_threads(kd_threads)


# --- tiny models ---------------------------------------------------------------------


class TinyLM(nn.Module):
    """Embedding -> tanh -> (dropout) -> linear: logits (B, L, V)."""

    def __init__(self, seed: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(D, V)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.6)

    def hidden(self, input_ids, attention_mask=None):
        h = torch.tanh(self.emb(input_ids))
        if attention_mask is not None:  # a mask that changes the logits
            h = h * (0.25 + attention_mask.unsqueeze(-1).to(h.dtype))
        return self.drop(h)

    def forward(self, input_ids, attention_mask=None):
        return self.out(self.hidden(input_ids, attention_mask))


# --- data ----------------------------------------------------------------------------


def make_batch(seed: int, b: int = 3, length: int = 12, mask: bool = False) -> dict:
    """Random tokens; labels aligned with input_ids (-100 on ~25%); random span ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, length), generator=g)
    labels = ids.clone()
    labels[torch.rand(b, length, generator=g) < 0.25] = -100
    spans = torch.randint(0, 4, (b, length), generator=g)
    batch = {"input_ids": ids, "labels": labels, "spans": spans}
    if mask:
        am = torch.ones(b, length, dtype=torch.long)
        am[0, -3:] = 0
        batch["attention_mask"] = am
    valid = labels[:, 1:] != -100
    for k in (Span.REASON, Span.ACT):  # every weighted span is present after the shift
        assert bool((valid & (spans[:, 1:] == k)).any())
    return batch


# --- independent float64 losses ---------------------------------------------------------


def shifted(logits: torch.Tensor, batch: dict):
    return logits[:, :-1].double(), batch["labels"][:, 1:]


def ce_rows(student: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logq = torch.log_softmax(student, dim=-1)
    return -logq.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)


def kd_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(P_t ‖ P_s) per position, P = softmax(z / T), float64."""
    logp = torch.log_softmax(teacher.double() / temperature, dim=-1)
    logq = torch.log_softmax(student / temperature, dim=-1)
    return temperature**2 * (logp.exp() * (logp - logq)).sum(-1)


def combine(rows, kd, batch, mode, weights):
    """token: mean over labelled tokens; span: Σ_k w_k · mean over labelled tokens of span k."""
    labels = batch["labels"][:, 1:]
    valid = labels != -100
    if mode == "token":
        return rows[valid].mean(), {}
    spans = batch["spans"][:, 1:]
    loss, comps = rows.new_zeros(()), {}
    for k, w in weights.items():
        sel = valid & (spans == k)
        if w > 0 and bool(sel.any()):
            loss = loss + w * rows[sel].mean()
            comps[k] = kd[sel].mean().item()
    return loss, comps


def dense_loss(teacher, mode, alpha, weights=SPAN_WEIGHTS, temperature=T):
    """loss_fn(student_logits, batch) of a hand loop, the teacher a module or None."""

    def fn(logits, batch):
        student, labels = shifted(logits, batch)
        ce = ce_rows(student, labels)
        if mode == "sft":
            return ce[labels != -100].mean(), {}
        if teacher is None:
            t_logits = batch["teacher_logits"]
        else:
            teacher.eval()
            with torch.no_grad():
                t_logits = teacher(batch["input_ids"])
        kd = kd_rows(student, t_logits[:, :-1], temperature)
        return combine(alpha * ce + (1.0 - alpha) * kd, kd, batch, mode, weights)

    return fn


# --- the hand-written loop -----------------------------------------------------------------


def sgd(model, lr=0.5):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def lambda_lr(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s))


def hand_clip(params, max_norm: float) -> float:
    """Scales the gradients to total L2 norm <= max_norm (as clip_grad_norm_ defines it)."""
    grads = [p.grad for p in params if p.grad is not None]
    total = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    coef = min(1.0, max_norm / (total + 1e-6))
    for g in grads:
        g.mul_(coef)
    return total


def hand_train(model, batches, loss_fn, *, lr=0.5, max_norm=None, accum=1, forward=None):
    """SGD(momentum 0.9) + LambdaLR(1 / (1 + s)): the loop a user would write."""
    forward = forward or (lambda m, b: m(b["input_ids"]))
    opt = sgd(model, lr)
    sched = lambda_lr(opt)
    log = {"loss": [], "comps": [], "lr": [], "norms": []}
    micro_losses: list[float] = []
    for i, batch in enumerate(batches, start=1):
        model.train()
        loss, comps = loss_fn(forward(model, batch), batch)
        (loss / accum).backward()
        micro_losses.append(loss.item())
        if i % accum == 0:
            if max_norm is not None:
                log["norms"].append(hand_clip(list(model.parameters()), max_norm))
            log["lr"].append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            opt.zero_grad()
            log["loss"].append(sum(micro_losses) / len(micro_losses))
            log["comps"].append(comps)
            micro_losses = []
    return log


def assert_params_close(a: nn.Module, b: nn.Module, rtol=1e-5, atol=2e-6) -> None:
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=f"parameter {name}")


def read_log(path) -> list[dict]:
    return [strict_json(line) for line in path.read_text().splitlines()]


def strict_json(line: str) -> dict:
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(line, parse_constant=reject)


# --- a resumable run (Adam, StepLR, checkpoints, JSONL log) -------------------------


def resumable(tmp, seed, *, accum=1, every=1, teacher=None):
    student = TinyLM(seed, dropout=0.2)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return Distiller(
        student,
        teacher or TinyLM(99),
        opt,
        loss="span",
        alpha=0.3,
        temperature=T,
        grad_accum_steps=accum,
        scheduler=sched,
        checkpoint_dir=tmp,
        checkpoint_every=every,
        log_path=tmp / "log.jsonl",
    )


def sparse_loss(mode, alpha, weights=SPAN_WEIGHTS, teacher_temperature=1.0):
    def fn(logits, batch):
        student, labels = shifted(logits, batch)
        ids = batch["teacher_ids"][:, :-1]
        lps = batch["teacher_logprobs"][:, :-1]
        kd = sparse_bucket_rows(student, ids, lps, T, teacher_temperature)
        ce = ce_rows(student, labels)
        return combine(alpha * ce + (1.0 - alpha) * kd, kd, batch, mode, weights)

    return fn


def with_top_k(batch: dict, teacher: nn.Module, k: int, teacher_temperature: float = 1.0):
    """The batch plus a stored teacher: top-k of its log_softmax, aligned with the logits."""
    with torch.no_grad():
        logits = teacher.eval()(batch["input_ids"]).double()
    top = torch.log_softmax(logits / teacher_temperature, dim=-1).topk(k, dim=-1)
    return dict(batch, teacher_ids=top.indices, teacher_logprobs=top.values.float())


def equal_count_batch(seed: int, labelled: int, b: int = 2, length: int = 10) -> dict:
    """A micro-batch with exactly ``labelled`` scored tokens (labels[:, 1:] != -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, length), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 0] = ids[:, 0]  # position 0 is never scored (the shift drops it)
    flat = torch.randperm(b * (length - 1), generator=g)[:labelled]
    scored = labels[:, 1:].reshape(-1)
    scored[flat] = ids[:, 1:].reshape(-1)[flat]
    labels[:, 1:] = scored.reshape(b, length - 1)
    spans = torch.randint(0, 4, (b, length), generator=g)
    return {"input_ids": ids, "labels": labels, "spans": spans}


def n_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def max_change(a: nn.Module, b: nn.Module) -> float:
    return max(
        (x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters(), strict=True)
    )


class PlainLM(nn.Module):
    """forward(input_ids) only, like nn.Sequential: no attention_mask argument."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Embedding(V, D), nn.Linear(D, V))

    def forward(self, input_ids):
        return self.net(input_ids)


def sparse_bucket_rows(student, ids, logprobs, temperature, teacher_temperature):
    """T² · KL over the k ids plus one tail bucket, teacher re-tempered by T0 / T, float64."""
    ratio = teacher_temperature / temperature
    p = logprobs.double().exp()
    tail = (1.0 - p.sum(-1)).clamp_min(0.0)
    pw, tw = p**ratio, tail**ratio
    z = pw.sum(-1) + tw
    p, tail = pw / z.unsqueeze(-1), tw / z
    q = torch.softmax(student / temperature, dim=-1)
    q_ids = q.gather(-1, ids)
    q_tail = 1.0 - q_ids.sum(-1)
    rows = (p * (p.log() - q_ids.log())).sum(-1) + tail * (tail.log() - q_tail.log())
    return temperature**2 * rows
