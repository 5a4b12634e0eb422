"""Runs a model as a ReAct agent against the calculator environment.

All episodes advance in lockstep, one token per step, so one key/value cache
of a single length serves the whole batch: at each step a sequence either
consumes a token the environment forces (its prompt, then each observation)
or, when nothing is pending, the token the model predicts. When the model
ends a line with an ``Action:``, the environment answers and the answer's
tokens become pending.
"""

from __future__ import annotations

from collections import deque

import torch

from .model import TinyLM
from .task import Episode, Problem, prompt, react_to_line


@torch.no_grad()
def run_agent(
    model: TinyLM,
    problems: list[Problem],
    *,
    tokenizer,
    max_actions: int = 6,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[Episode]:
    """One episode per problem. ``temperature=0`` decodes greedily."""
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    batch = len(problems)
    episodes = [Episode(p) for p in problems]
    pending = [deque([tokenizer.bos_id, *tokenizer.encode(prompt(p))]) for p in problems]
    produced: list[list[int]] = [[] for _ in problems]  # every token after BOS
    line: list[list[int]] = [[] for _ in problems]  # the model's current line
    cache = model.new_cache(batch)
    feed = [pending[b].popleft() for b in range(batch)]
    try:
        for pos in range(model.cfg.max_len - 1):
            logits = model.decode_step(torch.tensor(feed, device=device), cache, pos)
            choice = _choose(logits, temperature, generator).tolist()
            for b, episode in enumerate(episodes):
                if episode.done:
                    feed[b] = tokenizer.pad_id
                    continue
                if pending[b]:
                    feed[b] = pending[b].popleft()
                    produced[b].append(feed[b])
                    continue
                token = feed[b] = choice[b]
                produced[b].append(token)
                if tokenizer.is_special(token):  # EOS, BOS or PAD: the agent stopped
                    episode.done = True
                    continue
                line[b].append(token)
                if token == tokenizer.newline_id:
                    text = tokenizer.decode(line[b])
                    line[b].clear()
                    reply = react_to_line(episode, text, max_actions=max_actions)
                    pending[b].extend(tokenizer.encode(reply))
            if all(e.done for e in episodes):
                break
    finally:
        model.train(was_training)
    for episode, tokens in zip(episodes, produced, strict=True):
        episode.done = True
        episode.text = tokenizer.decode(tokens)
    return episodes


def _choose(logits: torch.Tensor, temperature: float, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
