"""What the Distiller reads from a batch and a loader: checks, the model's logits,
the loader's random generators (restored on resume)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from . import distributed as dist


def takes_attention_mask(model: nn.Module) -> bool:
    # A DDP wrapper's forward(*inputs, **kwargs) says nothing: ask the model inside.
    try:
        params = inspect.signature(dist.unwrap(model).forward).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "attention_mask" or p.kind is p.VAR_KEYWORD for p in params)


def model_logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Logits of ``model`` on ``batch``: plain modules and Hugging Face models alike.

    ``attention_mask`` is passed only to models whose ``forward`` takes it.
    """
    mask = batch.get("attention_mask")
    ids = batch["input_ids"]
    if mask is None or not takes_attention_mask(model):
        out = model(ids)
    else:
        out = model(ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The random generators a DataLoader draws its order from, besides torch's
    global one (``DataLoader(generator=...)``, a sampler's own ``generator``)."""
    found: list[torch.Generator] = []
    for owner in (loader, getattr(loader, "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


def check_batch(batch: Any) -> None:
    if not isinstance(batch, Mapping):
        raise TypeError(
            "a batch is a mapping with 'input_ids' and 'labels' (and optionally 'spans', "
            f"'attention_mask', ...); got {type(batch).__name__}"
        )
    if "input_ids" not in batch or "labels" not in batch:
        raise KeyError(f"a batch needs 'input_ids' and 'labels'; got keys {sorted(batch)}")
    ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(
            f"input_ids must be a (batch, sequence) tensor; got {shape} "
            "(one sequence: add a batch dimension, or use kdcore.agent.collate)"
        )
    for key in ("labels", "spans", "attention_mask"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.shape != ids.shape:
            raise ValueError(
                f"{key} {tuple(value.shape)} must match input_ids {tuple(ids.shape)} "
                "(aligned; the shift happens inside)"
            )


def set_generator_states(generators: list[torch.Generator], states: list[torch.Tensor]) -> None:
    if not states:
        return  # a checkpoint without loader states (older kdcore): their current order
    if len(states) != len(generators):
        raise RuntimeError(
            f"the checkpoint holds {len(states)} loader random states, but this loader has "
            f"{len(generators)} generators: it is not the loader of the checkpoint"
        )
    for g, state in zip(generators, states, strict=True):
        g.set_state(state)
