"""What the Distiller needs from torch.distributed: the rank and world size,
the wrapped student (DistributedDataParallel or FSDP2 ``fully_shard``), sums
over ranks that end with a clear error instead of a hang, and full state
dicts of a sharded student for rank-0 checkpoints.

Without an initialised process group every function is the one-process
identity (rank 0 of 1): nothing is imported from torch.distributed's
optional parts and nothing is communicated.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
from torch import nn

#: Seconds a Distiller's own collective (token counts, the step's log record)
#: waits for the other ranks before it fails.
DEFAULT_TIMEOUT_S = 600.0


def active() -> bool:
    """Whether a process group of more than one rank is initialised."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def is_fsdp2(model: nn.Module) -> bool:
    """A module sharded with ``torch.distributed.fsdp.fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def averages_gradients(model: nn.Module) -> bool:
    """DDP and FSDP2 average gradients over ranks (the Distiller scales the
    loss by the world size to turn the average into the sum it needs)."""
    return active() and (is_ddp(model) or is_fsdp2(model))


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DistributedDataParallel / DataParallel (FSDP2
    shards the module in place: it is its own model)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def check_student(model: nn.Module) -> None:
    """Under a process group the student's gradients must be synchronised."""
    if active() and not (is_ddp(model) or is_fsdp2(model)):
        raise ValueError(
            f"torch.distributed is initialised with {world_size()} ranks, but the student is "
            f"a plain {type(model).__name__}: its gradients would differ per rank. Wrap it in "
            "torch.nn.parallel.DistributedDataParallel or shard it with "
            "torch.distributed.fsdp.fully_shard"
        )


def all_reduce_sum(x: torch.Tensor, what: str, timeout_s: float) -> torch.Tensor:
    """Sum of ``x`` over ranks (in place; ``x`` itself without a group).

    Fails with a RuntimeError naming ``what`` when the other ranks do not
    join within ``timeout_s`` seconds (one died or stalled), never a hang.
    """
    if not active():
        return x
    dist = torch.distributed
    # NCCL reduces CUDA tensors only; gloo CPU ones.
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    y = x if on is None else x.to(on)
    try:
        work = dist.all_reduce(y, op=dist.ReduceOp.SUM, async_op=True)
        work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as exc:  # gloo: connection closed or timed out; NCCL: watchdog
        raise RuntimeError(
            f"rank {rank()} of {world_size()}: the all_reduce of {what} did not complete "
            f"within {timeout_s:g} s ({type(exc).__name__}: {exc}). Another rank has died or "
            "stalled; restart every rank (fit(resume=True) continues from the last checkpoint)"
        ) from exc
    return y if on is None else x.copy_(y)


def barrier(what: str, timeout_s: float) -> None:
    """All ranks reach this point (a one-element sum, so the timeout applies)."""
    if active():
        all_reduce_sum(torch.zeros(1), what, timeout_s)


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` without a group)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def model_state(model: nn.Module) -> dict[str, Any]:
    """The full (unsharded) state dict of the user's model, on the CPU for
    FSDP2 (a collective: every rank calls it; rank 0 receives it)."""
    if not is_fsdp2(model):
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    if not is_fsdp2(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_model_state(model: nn.Module, state: dict[str, Any]) -> None:
    if not is_fsdp2(model):
        unwrap(model).load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    if not is_fsdp2(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )
