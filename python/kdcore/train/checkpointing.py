"""The Distiller's checkpoints: what they hold, how they are written and read
back, and the warnings when a run resumes under other settings.

Written atomically and checksummed (``io.atomic_save``); under a process group
rank 0 writes the file and every rank resumes from it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import distributed as dist
from .io import CheckpointError, atomic_save, load_checkpoint

CHECKPOINT_NAME = "last.pt"
#: What a checkpoint cannot resume without.
_REQUIRED_KEYS = ("student", "optimizer", "state", "rng")


@dataclass
class TrainState:
    """Where training is: optimizer steps, micro-batches, epoch position, tokens,
    and the seconds ``fit`` has trained (across resumes)."""

    step: int = 0
    micro: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0
    tokens: int = 0
    seconds: float = 0.0


class Checkpointing:
    """Checkpoint methods of :class:`kdcore.train.Distiller` (a mixin: it uses the
    Distiller's student, optimizer, scheduler, objective and state)."""

    def _note_batch_size(self, batch: Mapping[str, Any]) -> None:
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return  # compute_loss says what is wrong
        size = ids.shape[0]
        resumed, self._resumed_batch_size = self._resumed_batch_size, None
        if resumed and size != resumed:
            warnings.warn(
                f"resumed with micro-batches of {size} sequences, the checkpoint's run used "
                f"{resumed}: the loss scale per step and the data order differ from that run",
                stacklevel=3,
            )
        self._batch_size = max(self._batch_size, size)

    def config(self) -> dict[str, Any]:
        """The settings that shape training, as stored in checkpoints (a resume
        under other settings warns, naming what changed)."""
        o = self.objective
        mode = o.mode if isinstance(o.mode, str) else getattr(o.mode, "__qualname__", "callable")
        weights = o.span_weights
        if weights is not None:
            weights = {int(k): float(v) for k, v in weights.items()}
        return {
            "loss": mode,
            "alpha": float(o.alpha),
            "temperature": float(o.temperature),
            "divergence": o.divergence,
            "beta": float(o.beta),
            "span_weights": weights,
            "normalize": o.normalize,
            "ignore_index": o.ignore_index,
            "tail": o.tail,
            "teacher_temperature": float(o.teacher_temperature),
            "grad_accum_steps": self.grad_accum_steps,
            "max_grad_norm": self.max_grad_norm,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (taken at an optimizer-step boundary)."""
        if self._pending:
            raise RuntimeError(
                f"{self._pending} micro-batches are accumulated but not stepped; "
                "checkpoint at an optimizer-step boundary"
            )
        # Under a process group: a collective (every rank calls it); the
        # student's full state without DDP's "module." prefix, gathered for FSDP2.
        state = {
            "student": dist.model_state(self.student),
            "optimizer": dist.optimizer_state(self.student, self.optimizer),
            "state": asdict(self.state),
            "rng": torch.get_rng_state(),
            "epoch_rng": self._epoch_rng,
            "loader_rng": [g.get_state() for g in self._loader_gens],
            "config": self.config(),
            "batch_size": self._batch_size,
        }
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if torch.cuda.is_available() and self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if dist.active():  # every rank's random state (dropout differs per rank)
            state["rank_rng"] = dist.gather_objects(torch.get_rng_state())
        return state

    def load_state_dict(self, state: Mapping[str, Any], *, source: str = "the state") -> None:
        """Restores a :meth:`state_dict`; warns when it was taken under another
        configuration (``source`` names it in messages)."""
        missing = [k for k in _REQUIRED_KEYS if k not in state]
        if missing:
            raise CheckpointError(
                f"{source} is not a Distiller checkpoint: it lacks {missing} "
                f"(has {sorted(map(str, state))})"
            )
        self._warn_config_changes(state.get("config"), source)
        dist.load_model_state(self.student, state["student"])
        dist.load_optimizer_state(self.student, self.optimizer, state["optimizer"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        self.state = TrainState(**state["state"])
        epoch_rng = state.get("epoch_rng")
        if isinstance(epoch_rng, torch.Tensor):  # checkpoints of kdcore <= 0.1: global RNG only
            epoch_rng = {"torch": epoch_rng, "loaders": []}
        self._epoch_rng = epoch_rng
        self._resumed_loader_rng = state.get("loader_rng")
        rank_rng = state.get("rank_rng")
        same_world = isinstance(rank_rng, list) and len(rank_rng) == dist.world_size()
        torch.set_rng_state(rank_rng[dist.rank()] if same_world else state["rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self._pending, self._window_loss = 0, 0.0
        self._batch_size = int(state.get("batch_size", 0))
        self._resumed_batch_size = self._batch_size or None

    def _warn_config_changes(self, saved: Any, source: str) -> None:
        if not isinstance(saved, Mapping):
            return  # a checkpoint of kdcore <= 0.1: no configuration stored
        now = self.config()
        changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items() if saved.get(k, v) != v]
        if changed:
            warnings.warn(
                f"resuming from {source}, written under another configuration: "
                + ", ".join(changed)
                + "; the resumed run will not continue the same training",
                stacklevel=3,
            )

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Writes a checkpoint atomically (default ``checkpoint_dir/last.pt``).

        Under a process group every rank calls it; rank 0 writes the file and
        the others wait until it is there."""
        if path is None:
            if self.checkpoint_dir is None:
                raise ValueError("save() needs a path or a checkpoint_dir")
            path = self.checkpoint_dir / CHECKPOINT_NAME
        state = self.state_dict()
        if dist.rank() == 0:
            atomic_save(state, path)
        dist.barrier("the checkpoint write", self.collective_timeout)
        return Path(path)

    def load(self, path: str | os.PathLike) -> None:
        """Restores a checkpoint written by :meth:`save` (its SHA-256 checked first).

        Raises :class:`kdcore.train.CheckpointError` naming the file when it is
        corrupted, truncated, not a Distiller checkpoint, or does not fit the
        student / optimizer.
        """
        state = load_checkpoint(path, map_location="cpu")
        try:
            self.load_state_dict(state, source=f"checkpoint {path}")
        except CheckpointError:
            raise
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint {path} does not fit this Distiller ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}); "
                "was it written for another student or optimizer?"
            ) from exc

    def _maybe_resume(self, resume: bool | str | os.PathLike) -> bool:
        """Loads the checkpoint ``resume`` names, if any; whether one was loaded."""
        if resume is False:
            return False
        if resume is True:
            if self.checkpoint_dir is None:
                raise ValueError("resume=True needs a checkpoint_dir (or pass a checkpoint path)")
            path = self.checkpoint_dir / CHECKPOINT_NAME
            if not path.exists():
                return False  # nothing to resume: a fresh start
        else:
            path = Path(resume)
            if not path.exists():
                raise FileNotFoundError(f"resume checkpoint {path} does not exist")
        self.load(path)
        return True
