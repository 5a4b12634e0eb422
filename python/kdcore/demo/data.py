"""Problem sets and token batches for the demo.

Four disjoint streams of problems: the teacher's training problems (oracle
trajectories), the students' problems (the teacher acts on them and its
trajectories are what the students learn from), the validation problems
(never trained on; the learning rates are chosen on them) and the held-out
problems (never trained on nor tuned on; the reported results).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..agent import Encoded, collate, encode_react
from ..spans import Span
from .task import Problem, make_problems
from .tokenizer import DemoTokenizer

TEACHER_SEED, STUDENT_SEED, HELD_OUT_SEED, VALIDATION_SEED = 1, 2, 3, 4
TEACHER_PROBLEMS = 6000
TOKENIZER = DemoTokenizer()

#: Token-level KD learns every token after the prompt, observations included.
ALL_AFTER_PROMPT = {Span.PROMPT: 0.0, Span.REASON: 1.0, Span.ACT: 1.0, Span.OBSERVATION: 1.0}


def teacher_problems(count: int = TEACHER_PROBLEMS) -> list[Problem]:
    return make_problems(count, TEACHER_SEED)


def student_problems(count: int) -> list[Problem]:
    return make_problems(count, STUDENT_SEED)


def held_out_problems(count: int, *, exclude: Sequence[Problem] = ()) -> list[Problem]:
    """``count`` problems whose questions occur in no training stream."""
    return _fresh_problems(count, HELD_OUT_SEED, exclude)


def validation_problems(
    count: int, *, exclude: Sequence[Problem] = (), held_out: int = 0
) -> list[Problem]:
    """``count`` problems in no training stream and not among the first
    ``held_out`` held-out problems (what the learning rates are chosen on)."""
    excluded = [*exclude, *held_out_problems(held_out, exclude=exclude)] if held_out else exclude
    return _fresh_problems(count, VALIDATION_SEED, excluded)


def _fresh_problems(count: int, seed: int, exclude: Sequence[Problem]) -> list[Problem]:
    seen = {p.question for p in teacher_problems()} | {p.question for p in exclude}
    out: list[Problem] = []
    batch = 0
    while len(out) < count:
        for p in make_problems(max(count, 64), seed + 1000 * batch):
            if p.question not in seen and len(out) < count:
                seen.add(p.question)
                out.append(p)
        batch += 1
    return out


def encode(texts: Sequence[str], span_weights: Mapping[int, float] | None = None) -> list[Encoded]:
    return [encode_react(t, TOKENIZER, span_weights=span_weights) for t in texts]


class TrajectoryDataset(Dataset):
    """Encoded trajectories, optionally with the teacher's logits per token."""

    def __init__(self, items: list[Encoded], teacher_logits: list[torch.Tensor] | None = None):
        if teacher_logits is not None and len(teacher_logits) != len(items):
            raise ValueError("one teacher logits tensor per trajectory")
        self.items, self.teacher_logits = items, teacher_logits

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.items[i].to_dict()
        if self.teacher_logits is not None:
            item["teacher_logits"] = self.teacher_logits[i]
        return item


def collate_batch(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    batch = collate(items, pad_id=TOKENIZER.pad_id)
    if "teacher_logits" in items[0]:
        length, vocab = batch["input_ids"].shape[1], items[0]["teacher_logits"].shape[-1]
        logits = items[0]["teacher_logits"].new_zeros(len(items), length, vocab)
        for row, item in enumerate(items):
            logits[row, : item["teacher_logits"].shape[0]] = item["teacher_logits"]
        batch["teacher_logits"] = logits  # padded rows carry label -100: never scored
    return batch


def loader(dataset: Dataset, batch_size: int, seed: int) -> DataLoader:
    """Shuffled batches in an order fixed by ``seed`` (the same for every student)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate_batch,
        generator=torch.Generator().manual_seed(seed),
    )


@torch.no_grad()
def teacher_logits(
    model: torch.nn.Module,
    items: list[Encoded],
    *,
    device=None,
    dtype=torch.bfloat16,
    batch_size: int = 64,
) -> list[torch.Tensor]:
    """The teacher's logits on each trajectory, computed once, kept on the CPU in ``dtype``."""
    model.eval()
    out: list[torch.Tensor] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = collate([e.to_dict() for e in chunk], pad_id=TOKENIZER.pad_id)
        logits = model(batch["input_ids"].to(device)).to("cpu", dtype)
        out.extend(logits[i, : len(e)].clone() for i, e in enumerate(chunk))
    return out
