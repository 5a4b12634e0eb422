"""How well a model acts: task success by execution, action-token accuracy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..agent import Encoded, collate
from ..spans import Span
from .data import TOKENIZER
from .model import TinyLM
from .rollout import run_agent
from .task import Episode, Problem


@dataclass(frozen=True)
class Evaluation:
    success_rate: float  # finish[answer] equal to the true answer, actions executed
    action_token_accuracy: float  # greedy next-token accuracy on ACT tokens (teacher-forced)
    mean_actions: float
    tool_errors: int  # actions the calculator could not parse or evaluate
    episodes: list[Episode]


@torch.no_grad()
def action_token_accuracy(model: TinyLM, items: list[Encoded], batch_size: int = 64) -> float:
    """Fraction of ACT tokens of reference trajectories the model predicts greedily."""
    model.eval()
    hits = total = 0
    for start in range(0, len(items), batch_size):
        batch = collate(items[start : start + batch_size], pad_id=TOKENIZER.pad_id)
        pred = model(batch["input_ids"])[:, :-1].argmax(-1)
        target, spans = batch["input_ids"][:, 1:], batch["spans"][:, 1:]
        act = (spans == Span.ACT) & batch["attention_mask"][:, 1:]
        hits += int(((pred == target) & act).sum())
        total += int(act.sum())
    return hits / total if total else float("nan")


def evaluate(
    model: TinyLM, problems: list[Problem], references: list[Encoded], *, batch_size: int = 256
) -> Evaluation:
    """Runs ``model`` as an agent on ``problems`` (greedy) and scores its actions."""
    episodes: list[Episode] = []
    for start in range(0, len(problems), batch_size):
        episodes += run_agent(model, problems[start : start + batch_size], tokenizer=TOKENIZER)
    n = max(1, len(episodes))
    return Evaluation(
        success_rate=sum(e.success for e in episodes) / n,
        action_token_accuracy=action_token_accuracy(model, references),
        mean_actions=sum(e.actions for e in episodes) / n,
        tool_errors=sum(len(e.errors) for e in episodes),
        episodes=episodes,
    )
