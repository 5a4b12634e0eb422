"""How well a model acts: task success by execution, action-token accuracy."""

from __future__ import annotations

from dataclasses import dataclass

from ..agent import Encoded
from .data import TOKENIZER
from .diagnostics import span_diagnostics, span_token_accuracy
from .model import TinyLM
from .rollout import run_agent
from .task import Episode, Problem


@dataclass(frozen=True)
class Evaluation:
    success_rate: float  # finish[answer] equal to the true answer, actions executed
    action_token_accuracy: float  # greedy next-token accuracy on ACT tokens (teacher-forced)
    reason_token_accuracy: float  # the same on REASON tokens
    mean_actions: float
    tool_errors: int  # actions the calculator could not parse or evaluate
    episodes: list[Episode]
    spans: dict[str, dict[str, float]]  # per span: token accuracy, KL from the teacher


def action_token_accuracy(model: TinyLM, items: list[Encoded], batch_size: int = 64) -> float:
    """Fraction of ACT tokens of reference trajectories the model predicts greedily."""
    return span_token_accuracy(model, items, batch_size)["action"]


def evaluate(
    model: TinyLM,
    problems: list[Problem],
    references: list[Encoded],
    *,
    teacher: TinyLM | None = None,
    batch_size: int = 256,
) -> Evaluation:
    """Runs ``model`` as an agent on ``problems`` (greedy) and scores its actions;
    with ``teacher``, the per-span KL from it on the references too."""
    episodes: list[Episode] = []
    for start in range(0, len(problems), batch_size):
        episodes += run_agent(model, problems[start : start + batch_size], tokenizer=TOKENIZER)
    n = max(1, len(episodes))
    spans = span_diagnostics(model, references, teacher)
    return Evaluation(
        success_rate=sum(e.success for e in episodes) / n,
        action_token_accuracy=spans["action"]["token_accuracy"],
        reason_token_accuracy=spans["reason"]["token_accuracy"],
        mean_actions=sum(e.actions for e in episodes) / n,
        tool_errors=sum(len(e.errors) for e in episodes),
        episodes=episodes,
        spans=spans,
    )
