"""Why an agent fails: per-span token accuracy and where a failed episode goes wrong.

- :func:`span_diagnostics`: greedy next-token accuracy and the KL from the
  teacher, on the reasoning and on the action tokens of reference
  trajectories (teacher-forced).
- :func:`first_error`: for a failed episode, the kind of the first token at
  which its text leaves every correct trajectory of its problem (the oracle's
  plan under any of its thought phrasings). Observations are written by the
  tool, so the first wrong token is always one the model chose.
- :func:`loss_scale`: each objective's loss and gradient norm on one batch at
  the students' common initial weights (what the optimizer sees first).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch

from ..agent import Encoded, collate
from ..spans import Span
from .data import TOKENIZER
from .task import Episode, correct_trajectories

#: The kinds :func:`first_error` returns, in the order a trajectory meets them.
ERROR_KINDS = (
    "reason",  # a Thought line (its wording or a number in it)
    "action:tool",  # "Action: calc[" / "Action: finish[" (line type, tool name)
    "action:operand1",  # the calculator expression's first number
    "action:operator",  # + - * /
    "action:operand2",  # the second number
    "action:close",  # "]" and the newline after the expression
    "answer",  # the number in finish[...] or what follows it
    "other",  # a line of no kind above (should not occur: observations are forced)
)
_CALC, _FINISH = "Action: calc[", "Action: finish["


_SPANS = (("reason", Span.REASON), ("action", Span.ACT))


@torch.no_grad()
def span_diagnostics(
    model: torch.nn.Module,
    items: list[Encoded],
    teacher: torch.nn.Module | None = None,
    batch_size: int = 64,
) -> dict[str, dict[str, float]]:
    """Per span of reference trajectories (teacher-forced), ``{"reason": {...},
    "action": {...}}`` with ``token_accuracy`` (greedy next-token accuracy) and,
    given the ``teacher`` model, ``teacher_kl``: the mean KL(teacher || model)
    per token in nats, computed in float64 (how closely the student matches the
    teacher's distribution, which success alone does not show). NaN where
    there is no such token."""
    model.eval()
    hits = dict.fromkeys(dict(_SPANS).values(), 0)
    total = dict.fromkeys(hits, 0)
    kl = dict.fromkeys(hits, 0.0)
    for start in range(0, len(items), batch_size):
        batch = collate(items[start : start + batch_size], pad_id=TOKENIZER.pad_id)
        logits = model(batch["input_ids"])[:, :-1]
        target, spans = batch["input_ids"][:, 1:], batch["spans"][:, 1:]
        real = batch["attention_mask"][:, 1:].bool()
        per_token = None
        if teacher is not None:
            log_q = torch.log_softmax(logits.double(), -1)
            log_p = torch.log_softmax(teacher(batch["input_ids"])[:, :-1].double(), -1)
            per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
        for span in hits:
            where = (spans == span) & real
            hits[span] += int(((logits.argmax(-1) == target) & where).sum())
            total[span] += int(where.sum())
            if per_token is not None:
                kl[span] += float(per_token[where].sum())
    out = {}
    for name, span in _SPANS:
        n = total[span]
        out[name] = {"token_accuracy": hits[span] / n if n else float("nan")}
        if teacher is not None:
            out[name]["teacher_kl"] = kl[span] / n if n else float("nan")
    return out


def span_token_accuracy(
    model: torch.nn.Module, items: list[Encoded], batch_size: int = 64
) -> dict[str, float]:
    """Greedy next-token accuracy per span of reference trajectories:
    ``{"reason": ..., "action": ...}`` (NaN where there is no such token)."""
    spans = span_diagnostics(model, items, batch_size=batch_size)
    return {name: value["token_accuracy"] for name, value in spans.items()}


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _kind_at(reference: str, pos: int) -> str:
    """The kind of the character at ``pos`` of a correct trajectory."""
    start = reference.rfind("\n", 0, pos) + 1
    end = reference.find("\n", pos)
    line = reference[start : end + 1 if end >= 0 else len(reference)]
    col = pos - start
    if line.startswith("Thought:"):
        return "reason"
    if line.startswith(_FINISH):
        return "action:tool" if col < len(_FINISH) else "answer"
    if line.startswith(_CALC):
        if col < len(_CALC):
            return "action:tool"
        expression = line[len(_CALC) : line.rindex("]")]
        # The operator is the first + - * / after the first character (a number).
        op = next(i for i, ch in enumerate(expression) if i > 0 and ch in "+-*/")
        inner = col - len(_CALC)
        if inner < op:
            return "action:operand1"
        if inner == op:
            return "action:operator"
        return "action:operand2" if inner < len(expression) else "action:close"
    return "other"


def first_error(episode: Episode) -> str | None:
    """Where a failed episode first goes wrong (one of :data:`ERROR_KINDS`);
    None for a solved one.

    The episode's text is matched against every correct trajectory of its
    problem; the first character past the longest common prefix is the first
    wrong token (the first character that differs lies in it). An episode that
    stopped early (end of sequence) is wrong where the correct text goes on; a
    number written with a digit too many is wrong in that number.
    """
    if episode.success:
        return None
    text = episode.text
    best, best_len = "", -1
    for reference in correct_trajectories(episode.problem):
        n = _common_prefix(text, reference)
        if n > best_len:
            best, best_len = reference, n
    if best_len >= len(best):  # the whole correct text, then more: cannot fail
        return "other"
    pos = best_len
    if pos < len(text) and text[pos].isdigit() and best[pos - 1].isdigit():
        pos -= 1  # a digit too many: the number being written is wrong, not what follows it
    return _kind_at(best, pos)


def first_error_counts(episodes: Iterable[Episode]) -> dict[str, int]:
    """How many failed episodes first go wrong at each kind (every kind listed)."""
    counts = Counter(k for k in map(first_error, episodes) if k is not None)
    return {kind: counts.get(kind, 0) for kind in ERROR_KINDS}


def loss_scale(student: torch.nn.Module, distiller, batch: dict) -> dict[str, float]:
    """The objective's loss and the gradient's global norm on ``batch`` (no update;
    the gradient is cleared again)."""
    student.train()
    student.zero_grad(set_to_none=True)
    logits = student(batch["input_ids"])
    teacher = batch.get("teacher_logits")
    loss, _ = distiller.objective(logits, None if teacher is None else teacher.float(), batch)
    loss.backward()
    norm = torch.sqrt(
        sum((p.grad.double() ** 2).sum() for p in student.parameters() if p.grad is not None)
    )
    student.zero_grad(set_to_none=True)
    return {"loss": float(loss.detach()), "grad_norm": float(norm)}
