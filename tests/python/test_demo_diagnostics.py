"""The demo's diagnostics against values worked out independently of the code."""

from __future__ import annotations

import math

import pytest
import torch

from kdcore.demo.data import TOKENIZER, encode
from kdcore.demo.diagnostics import (
    ERROR_KINDS,
    first_error,
    first_error_counts,
    loss_scale,
    span_diagnostics,
    span_token_accuracy,
)
from kdcore.demo.model import ModelConfig, TinyLM
from kdcore.demo.task import Episode, Problem, correct_trajectories, oracle_trajectory
from kdcore.train import Distiller

# Written out by hand, so the tests do not depend on the problem generator.
PROBLEM = Problem(
    question="Kim has 10 eggs, buys 3 bags of 9 and gives away 29. How many eggs are left?",
    answer=8,
    steps=(("First the bags.", "3*9"), ("Add the 10.", "10+27"), ("Take away 29.", "37-29")),
    thought_options=(
        ("First the bags.", "Count the bags first."),
        ("Add the 10.", "Now add the 10."),
        ("Take away 29.", "Subtract the 29."),
    ),
)
HEAD = f"Question: {PROBLEM.question}\n"
STEP1 = "Thought: Count the bags first.\nAction: calc[3*9]\nObservation: 27\n"  # other phrasing
STEP2 = "Thought: Now add the 10.\nAction: calc[10+27]\nObservation: 37\n"
STEP3 = "Thought: Take away 29.\nAction: calc[37-29]\nObservation: 8\n"


def episode(text: str, answer: str | None = None) -> Episode:
    return Episode(PROBLEM, text=text, done=True, answer=answer)


def test_correct_trajectories_are_every_phrasing():
    texts = correct_trajectories(PROBLEM)
    assert len(texts) == 8 and len(set(texts)) == 8
    assert HEAD + STEP1 + STEP2 + STEP3 + "Action: finish[8]\n" in texts
    assert oracle_trajectory(PROBLEM) in texts
    with pytest.raises(ValueError, match="need 3 thoughts"):
        oracle_trajectory(PROBLEM, ["x"])


@pytest.mark.parametrize(
    "text, answer, kind",
    [
        # A solved episode (in the other phrasings) has no first error.
        (HEAD + STEP1 + STEP2 + STEP3 + "Action: finish[8]\n", "8", None),
        (HEAD + STEP1 + STEP2 + STEP3 + "Action: finish[9]\n", "9", "answer"),
        (HEAD + STEP1 + STEP2 + STEP3 + "Action: finish[8 ]\n", "8 x", "answer"),
        (HEAD + STEP1 + "Thought: Add the 11.\n", None, "reason"),
        (HEAD + "Thought: First the boxes.\n", None, "reason"),
        (HEAD + STEP1 + "Action: calc[10+27]\n", None, "reason"),  # skipped the thought
        (HEAD + "Thought: First the bags.\nAction: calc[4*9]\n", None, "action:operand1"),
        (HEAD + "Thought: First the bags.\nAction: calc[3+9]\n", None, "action:operator"),
        (HEAD + "Thought: First the bags.\nAction: calc[3*8]\n", None, "action:operand2"),
        (HEAD + "Thought: First the bags.\nAction: calc[3*99]\n", None, "action:operand2"),
        (HEAD + "Thought: First the bags.\nAction: calc[3*9)\n", None, "action:close"),
        (HEAD + "Thought: First the bags.\nAction: calx[3*9]\n", None, "action:tool"),
        (HEAD + STEP1 + STEP2 + "Action: finish[37]\n", "37", "reason"),
        (HEAD + STEP1 + STEP2 + STEP3 + "Action: calc[8]\n", None, "action:tool"),
        (HEAD + STEP1 + "Thought: Now add the 10.\nAction: calc[11+27]\n", None, "action:operand1"),
        (HEAD + STEP1 + "Thought: Now add the 10.\nAction: calc[10+28]\n", None, "action:operand2"),
        # Stopped (end of sequence) where an action should come.
        (HEAD + STEP1 + "Thought: Now add the 10.\n", None, "action:tool"),
    ],
)
def test_first_error_finds_the_first_wrong_token(text, answer, kind):
    assert first_error(episode(text, answer)) == kind


def test_first_error_counts_every_kind():
    episodes = [
        episode(HEAD + STEP1 + STEP2 + STEP3 + "Action: finish[8]\n", "8"),
        episode(HEAD + STEP1 + STEP2 + STEP3 + "Action: finish[9]\n", "9"),
        episode(HEAD + STEP1 + STEP2 + STEP3 + "Action: finish[7]\n", "7"),
        episode(HEAD + "Thought: First the bags.\nAction: calc[3*8]\n"),
    ]
    counts = first_error_counts(episodes)
    assert list(counts) == list(ERROR_KINDS)
    assert counts["answer"] == 2 and counts["action:operand2"] == 1
    assert sum(counts.values()) == 3  # one per failed episode


class PeekingModel(torch.nn.Module):
    """Predicts the true next token at positions t with t % 3 != 0 (it reads the
    input ahead) and token 0 elsewhere: its accuracy is known exactly."""

    def forward(self, input_ids, attention_mask=None):
        b, n = input_ids.shape
        logits = torch.zeros(b, n, TOKENIZER.vocab_size)
        logits[:, :, 0] = 1.0
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], 1)
        for t in range(n):
            if t % 3:
                logits[torch.arange(b), t, nxt[:, t]] = 5.0
        return logits


def _kinds_and_ids(text: str) -> tuple[list[str], list[int]]:
    """Per-token spans from the raw text, line by line (no token crosses a
    newline): a Thought line (newline included) is reasoning, an Action line
    is action, EOS belongs to the last (finish) line."""
    kinds, ids = ["prompt"], [TOKENIZER.bos_id]
    for line in text.splitlines(keepends=True):
        kind = (
            "reason"
            if line.startswith("Thought:")
            else "action"
            if line.startswith("Action:")
            else "other"
        )
        tokens = TOKENIZER.encode(line)
        kinds += [kind] * len(tokens)
        ids += tokens
    return [*kinds, "action"], [*ids, TOKENIZER.eos_id]


def _expected_accuracy(texts: list[str]) -> dict[str, float]:
    hits = {"reason": 0, "action": 0}
    total = {"reason": 0, "action": 0}
    for text in texts:
        kinds, ids = _kinds_and_ids(text)
        for t in range(len(ids) - 1):  # logits at t predict token t + 1
            kind = kinds[t + 1]
            if kind in hits:
                total[kind] += 1
                hits[kind] += t % 3 != 0 and ids[t + 1] != 0
    return {k: hits[k] / total[k] for k in hits}


def test_span_token_accuracy_matches_a_count_by_hand():
    texts = [
        HEAD + STEP1 + STEP2 + STEP3 + "Action: finish[8]\n",
        HEAD + STEP1 + "Thought: Add the 10.\nAction: calc[10+27]\nObservation: 37\n"
        "Action: finish[37]\n",
        "Question: short?\nThought: x.\nAction: finish[1]\n",
    ]
    got = span_token_accuracy(PeekingModel(), encode(texts), batch_size=2)  # padded batches
    want = _expected_accuracy(texts)
    assert got == pytest.approx(want, abs=0, rel=1e-12)
    assert 0.5 < got["reason"] < 0.8 and 0.5 < got["action"] < 0.8


class NoisyModel(torch.nn.Module):
    """Logits that depend only on the input token and the position (fixed by a seed)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.randn(TOKENIZER.vocab_size, TOKENIZER.vocab_size, generator=gen)
        self.pos = torch.randn(64, TOKENIZER.vocab_size, generator=gen)

    def forward(self, input_ids, attention_mask=None):
        return 2.0 * self.table[input_ids] + self.pos[: input_ids.shape[1]]


def test_span_teacher_kl_matches_categorical_kl_per_token():
    texts = [
        HEAD + STEP1 + "Action: finish[27]\n",
        "Question: short?\nThought: x.\nAction: finish[1]\n",
    ]
    student, teacher = NoisyModel(3), NoisyModel(4)
    got = span_diagnostics(student, encode(texts), teacher, batch_size=1)
    sums = {"reason": [], "action": []}
    for text in texts:
        kinds, ids = _kinds_and_ids(text)
        x = torch.tensor([ids])
        p = torch.distributions.Categorical(logits=teacher(x)[0].double())
        q = torch.distributions.Categorical(logits=student(x)[0].double())
        per_token = torch.distributions.kl_divergence(p, q)
        for t in range(len(ids) - 1):
            if kinds[t + 1] in sums:
                sums[kinds[t + 1]].append(float(per_token[t]))
    for span, values in sums.items():
        assert got[span]["teacher_kl"] == pytest.approx(sum(values) / len(values), rel=1e-9)
        assert got[span]["teacher_kl"] > 0.1
    same = span_diagnostics(teacher, encode(texts), teacher)
    assert same["action"]["teacher_kl"] == pytest.approx(0.0, abs=1e-12)
    assert "teacher_kl" not in span_diagnostics(student, encode(texts))["action"]


def _batch(texts: list[str], teacher_seed: int = 1):
    from kdcore.demo.data import collate_batch

    items = [e.to_dict() for e in encode(texts)]
    gen = torch.Generator().manual_seed(teacher_seed)
    for item in items:
        item["teacher_logits"] = torch.randn(
            len(item["input_ids"]), TOKENIZER.vocab_size, generator=gen
        )
    return collate_batch(items)


@pytest.mark.parametrize("mode", ["sft", "token", "span"])
def test_loss_scale_matches_float64_formulas(mode):
    texts = [HEAD + STEP1 + STEP2 + STEP3 + "Action: finish[8]\n", "Question: q?\nThought: t.\n"]
    texts[1] += "Action: calc[1+2]\nObservation: 3\nAction: finish[3]\n"
    batch = _batch(texts)
    torch.manual_seed(0)
    model = TinyLM(ModelConfig(d_model=32, n_layers=1, n_heads=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    got = loss_scale(model, Distiller(model, None, opt, loss=mode), batch)

    # Independently: float64 log-softmax, per-token KL / CE, span means by hand.
    model.zero_grad()
    logits = model(batch["input_ids"])[:, :-1].double()
    labels, spans = batch["labels"][:, 1:], batch["spans"][:, 1:]
    logp = logits.log_softmax(-1)
    if mode == "sft":
        valid = labels != -100
        rows = -logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
        loss = rows[valid].mean()
    else:
        q = batch["teacher_logits"][:, :-1].double().log_softmax(-1)
        kl = (q.exp() * (q - logp)).sum(-1)
        if mode == "token":
            loss = kl[labels != -100].mean()
        else:
            loss = sum(kl[(spans == s) & (labels != -100)].mean() for s in (1, 2))
    loss.backward()
    norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters()))
    assert got["loss"] == pytest.approx(float(loss.detach()), rel=1e-4)
    assert got["grad_norm"] == pytest.approx(norm, rel=1e-3)


def test_validation_problems_are_disjoint_from_training_and_held_out():
    from kdcore.demo.data import (
        held_out_problems,
        student_problems,
        teacher_problems,
        validation_problems,
    )

    train = student_problems(300)
    held = held_out_problems(200, exclude=train)
    val = validation_problems(100, exclude=train, held_out=200)
    assert len(val) == 100 and val == validation_problems(100, exclude=train, held_out=200)
    questions = {p.question for p in val}
    assert len(questions) == 100
    for other in (train, held, teacher_problems()):
        assert not questions & {p.question for p in other}


def test_tune_picks_the_best_mean_validation_success_per_student():
    import statistics

    from kdcore.demo.tune import summarise

    def run(model, lr, seed, success, action):
        return {
            "model": model,
            "lr": lr,
            "seed": seed,
            "validation_success": success,
            "action_token_accuracy": action,
        }

    runs = [
        run("sft", 1e-3, 0, 0.5, 0.9),
        run("sft", 1e-3, 1, 0.7, 0.9),
        run("sft", 3e-3, 0, 0.9, 0.99),
        run("sft", 3e-3, 1, 0.1, 0.95),  # mean 0.5 < 0.6 despite the best single run
        run("span_kd", 1e-3, 0, 0.4, 0.97),
        run("span_kd", 1e-3, 1, 0.4, 0.97),
        run("span_kd", 3e-3, 0, 0.4, 0.98),  # tie on success: higher action accuracy wins
        run("span_kd", 3e-3, 1, 0.4, 0.98),
    ]
    table, chosen = summarise(runs)
    cell = {(r["model"], r["lr"]): r for r in table}
    assert cell[("sft", 1e-3)]["success"] == pytest.approx(0.6)
    assert cell[("sft", 3e-3)]["success"] == pytest.approx(0.5)
    assert cell[("sft", 3e-3)]["sd"] == pytest.approx(statistics.stdev([0.9, 0.1]))
    assert chosen == {"sft": 1e-3, "span_kd": 3e-3}
