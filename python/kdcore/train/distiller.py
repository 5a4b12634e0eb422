"""Distiller: a thin training loop around kdcore's losses.

``step(batch)`` is one micro-batch (forward, loss, backward; the optimizer
steps every ``grad_accum_steps`` calls) for people who keep their own loop;
``fit(loader)`` adds epochs, a progress bar, a JSONL log and resumable
checkpoints. The teacher is frozen (eval mode, no gradients). On CUDA the
forward passes run under autocast (bf16 by default); the losses take the
logits in whatever dtype they come and accumulate in fp32.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import os
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _validate
from ..spans import Span
from . import distributed as dist
from .io import CheckpointError, JsonlLog, atomic_save, load_checkpoint
from .objective import LossFn, Objective

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


def _takes_attention_mask(model: nn.Module) -> bool:
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
    if mask is None or not _takes_attention_mask(model):
        out = model(ids)
    else:
        out = model(ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out


def _loader_generators(loader: Any) -> list[torch.Generator]:
    """The random generators a DataLoader draws its order from, besides torch's
    global one (``DataLoader(generator=...)``, a sampler's own ``generator``)."""
    found: list[torch.Generator] = []
    for owner in (loader, getattr(loader, "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


def _check_batch(batch: Any) -> None:
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


def _component_name(key: Any) -> str:
    if isinstance(key, Span):
        return f"span_{key.name.lower()}"
    return f"span_{key}" if isinstance(key, int) else str(key)


class Distiller:
    """Distils ``teacher`` into ``student`` with one of kdcore's losses.

    ``loss``: ``"span"`` (default; span-weighted, per-span normalised — needs
    ``batch["spans"]``), ``"token"`` (every labelled token alike), ``"sft"``
    (hard labels only) or a callable, see :class:`kdcore.train.Objective`.
    ``alpha``, ``temperature``, ``divergence``, ``beta``, ``span_weights``,
    ``normalize`` are the arguments of :func:`kdcore.distillation_loss`;
    ``tail`` and ``teacher_temperature`` those of
    :func:`kdcore.sparse_kl_loss` for batches that carry a stored top-k
    teacher (``teacher_ids``, ``teacher_logprobs``) instead of a teacher model.

    Batches are mappings with ``input_ids`` and ``labels`` (aligned, shifted
    inside), optionally ``attention_mask``, ``spans``, ``teacher_logits``.

    The loss of an optimizer step is normalised by the labelled tokens (per
    span type for span normalisation) of all its micro-batches on all ranks.
    Under ``torch.distributed`` the student is wrapped in
    DistributedDataParallel or sharded with ``fully_shard`` (FSDP2); rank 0
    writes checkpoints and logs; the Distiller's own collectives fail after
    ``collective_timeout`` seconds (docs/scaling.md).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        loss: str | LossFn = "span",
        alpha: float = 0.0,
        temperature: float = 1.0,
        divergence: str = "kl",
        beta: float = 0.5,
        span_weights: Mapping[int, float] | None = None,
        normalize: str = "span",
        ignore_index: int = -100,
        tail: str = "bucket",
        teacher_temperature: float = 1.0,
        grad_accum_steps: int = 1,
        max_grad_norm: float | None = None,
        scheduler: Any = None,
        autocast: bool | None = None,
        autocast_dtype: torch.dtype = torch.bfloat16,
        log_path: str | os.PathLike | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
        collective_timeout: float = dist.DEFAULT_TIMEOUT_S,
    ) -> None:
        if optimizer is None:
            raise ValueError("Distiller needs an optimizer over the student's parameters")
        if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be an int >= 1; got {grad_accum_steps!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None; got {max_grad_norm!r}")
        if checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0; got {checkpoint_every}")
        if checkpoint_every and checkpoint_dir is None:
            raise ValueError("checkpoint_every needs a checkpoint_dir")
        if not collective_timeout > 0:
            raise ValueError(f"collective_timeout must be > 0 seconds; got {collective_timeout!r}")
        dist.check_student(student)
        self.objective = Objective(
            mode=loss,
            alpha=alpha,
            temperature=temperature,
            divergence=divergence,
            beta=beta,
            span_weights=span_weights,
            normalize=normalize,
            ignore_index=ignore_index,
            tail=tail,
            teacher_temperature=teacher_temperature,
        )
        self.student, self.teacher = student, teacher
        self.optimizer, self.scheduler = optimizer, scheduler
        self.grad_accum_steps, self.max_grad_norm = grad_accum_steps, max_grad_norm
        self.device = next(student.parameters()).device
        self.autocast = self.device.type == "cuda" if autocast is None else bool(autocast)
        self.autocast_dtype = autocast_dtype
        self.log_path = None if log_path is None else Path(log_path)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every = checkpoint_every
        self.collective_timeout = float(collective_timeout)
        # DDP and FSDP2 average gradients over ranks; the loss is this rank's
        # share of the global sum, so it is scaled back to a sum.
        self._rank_factor = dist.world_size() if dist.averages_gradients(student) else 1
        self.state = TrainState()
        self._pending = 0  # micro-batches accumulated since the last optimizer step
        self._window_loss = 0.0  # their summed losses (ReduceLROnPlateau's metric)
        # Random states at the start of the current epoch: torch's global one
        # ("torch") and the loader's own generators ("loaders").
        self._epoch_rng: dict[str, Any] | None = None
        # The generators of the loader fit last ran on (their states go into
        # checkpoints), and states from a loaded checkpoint, applied at the next
        # epoch start.
        self._loader_gens: list[torch.Generator] = []
        self._resumed_loader_rng: list[torch.Tensor] | None = None
        self._last_lr = float("nan")
        # The largest micro-batch seen (checkpointed), and the one a resumed run
        # compares its first batch with.
        self._batch_size = 0
        self._resumed_batch_size: int | None = None
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)

    # --- one micro-batch ----------------------------------------------------

    def _autocast(self):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {
            k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
        }

    def _teacher_logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        if "teacher_logits" in batch:
            return batch["teacher_logits"]
        if not self.objective.needs_teacher or "teacher_ids" in batch or self.teacher is None:
            return None
        with torch.no_grad(), self._autocast():
            return model_logits(self.teacher, batch)

    def compute_loss(
        self, batch: Mapping[str, Any], totals: torch.Tensor | None = None, scale: float = 1.0
    ) -> tuple[torch.Tensor, dict]:
        """The loss and its detached components on one batch (no backward).

        ``totals``: the denominators of the optimizer step (see
        :meth:`step_totals`); None normalises over this batch alone.
        ``scale`` multiplies the loss (not the components).
        """
        _check_batch(batch)
        batch = self._to_device(batch)
        teacher = self._teacher_logits(batch)
        with self._autocast():
            logits = model_logits(self.student, batch)
        return self.objective(logits, teacher, batch, totals, scale)

    def step_totals(self, batches: Iterable[Mapping[str, Any]]) -> torch.Tensor | None:
        """The loss's denominators over ``batches`` on every rank: labelled
        tokens (per span type with ``loss="span"``), summed over the batches
        and all-reduced over the process group (None for a callable loss)."""
        counts = None
        for batch in batches:
            _check_batch(batch)
            c = self.objective.counts(batch)
            if c is None:
                return None
            counts = c.cpu() if counts is None else counts + c.cpu()
        if counts is None:
            raise ValueError("step_totals needs at least one batch")
        return dist.all_reduce_sum(counts, "the step's token counts", self.collective_timeout)

    def step(
        self, batch: Mapping[str, Any], *, totals: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """Forward, loss and backward on one micro-batch; optimizer step when due.

        The loss is normalised by ``totals`` — by default this micro-batch's
        labelled tokens over all ranks, each of the ``grad_accum_steps``
        micro-batches then weighing ``1 / grad_accum_steps``. Pass
        ``totals=distiller.step_totals(window)`` for each micro-batch of a
        ``window`` (the step's micro-batches on this rank) to normalise over
        the whole step, as ``fit`` does.

        Returns ``{"loss", <components>, "tokens", "stepped", "step"}`` as
        Python numbers (one host sync per call, for logging): ``loss`` and
        the components are this micro-batch's share of the step's values on
        this rank (with one process and no accumulation: the batch's loss).
        """
        _check_batch(batch)
        if totals is None:
            totals = self.step_totals([batch])
            return self._step(batch, totals, 1.0 / self.grad_accum_steps)
        return self._step(batch, totals, 1.0)

    def _step(self, batch, totals: torch.Tensor | None, fraction: float) -> dict[str, Any]:
        """One micro-batch whose loss weighs ``fraction`` of a step normalised by ``totals``."""
        self.student.train()
        self._note_batch_size(batch)
        if totals is None:  # a callable's own mean per micro-batch; DDP averages it over ranks
            fraction = factor = 1.0 / self.grad_accum_steps
        else:  # the factor goes into the row weights: no extra pass over the gradients
            factor = fraction * self._rank_factor
        loss, comps = self.compute_loss(batch, totals, factor)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss {loss.item()} at micro-batch {self.state.micro}; "
                "the optimizer was not stepped"
            )
        loss.backward()
        labels = _validate.comparable_labels(batch["labels"][:, 1:])
        tokens = int((labels != self.objective.ignore_index).sum())
        self.state.micro += 1
        self.state.tokens += tokens
        self._pending += 1
        share = loss.item() / factor * fraction  # this micro-batch's share of the step's loss
        self._window_loss += share
        stepped = self._pending == self.grad_accum_steps
        if stepped:
            self._optimizer_step()
        record = {
            "loss": share,
            "tokens": tokens,
            "stepped": stepped,
            "step": self.state.step,
        }
        record.update({_component_name(k): float(v) * fraction for k, v in comps.items()})
        return record

    def _rescale_partial_window(self) -> float:
        """Gradients of an incomplete window become its full step (each
        micro-batch weighed 1 / grad_accum_steps, not 1 / the micro-batches there)."""
        factor = self.grad_accum_steps / self._pending
        for p in self.student.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)
        self._window_loss *= factor
        return factor

    def _optimizer_step(self) -> None:
        self._last_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        if self.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.student.parameters(), self.max_grad_norm)
        self.optimizer.step()
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # The step's loss over every rank: all ranks step their schedulers alike.
            metric = torch.tensor([self._window_loss], dtype=torch.float64)
            metric = dist.all_reduce_sum(metric, "the step's loss", self.collective_timeout)
            self.scheduler.step(float(metric))
        elif self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._pending, self._window_loss = 0, 0.0
        self.state.step += 1

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

    # --- checkpoints ----------------------------------------------------------

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

    # --- the loop ---------------------------------------------------------------

    def fit(
        self,
        loader: Iterable[Mapping[str, Any]],
        *,
        epochs: int = 1,
        max_steps: int | None = None,
        resume: bool | str | os.PathLike = False,
        progress: bool = True,
        description: str = "distill",
    ) -> dict[str, Any]:
        """Trains until ``epochs`` passes over ``loader`` or ``max_steps``
        optimizer steps, counted from the start of training (totals, not
        increments: after ``fit(epochs=1)``, ``fit(epochs=2)`` trains one more
        epoch; a call with nothing left to do is an error unless it resumed
        a finished run).

        ``resume=True`` continues from ``checkpoint_dir/last.pt`` when it
        exists (a path resumes from that file): the loader is replayed from
        its epoch start with the same random states — torch's global one and
        the DataLoader's own ``generator`` — and the micro-batches already
        consumed are skipped, so a resumed run takes the same steps as an
        uninterrupted one (any other source of randomness in the loader is
        the caller's to restore). Checkpoints are written every
        ``checkpoint_every`` steps and at the end; a failure never leaves a
        half-written file. The JSONL log is kept consistent with the state:
        records of steps after it (from a run that went on past the
        checkpoint, or an older run in the same file) move to
        ``<log>.discarded``.
        """
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1; got {epochs}")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None; got {max_steps}")
        resumed = self._maybe_resume(resume)
        if not resumed and (self.state.epoch >= epochs or _done(self.state, max_steps)):
            raise ValueError(
                f"nothing to train: this Distiller is at epoch {self.state.epoch}, step "
                f"{self.state.step}, and epochs={epochs}, max_steps={max_steps} count from the "
                "start of training (pass larger totals to train more)"
            )
        total = max_steps
        if total is None and hasattr(loader, "__len__"):
            total = math.ceil(len(loader) * epochs / self.grad_accum_steps)  # type: ignore[arg-type]
        log = None
        main = dist.rank() == 0  # the log and the progress bar are rank 0's
        if self.log_path is not None and main:
            log = JsonlLog(self.log_path, after_step=self.state.step)
        bar = _progress(total, self.state.step, description, progress and main)
        started, window = time.perf_counter() - self.state.seconds, _Window()
        self._loader_gens = _loader_generators(loader)
        try:
            while self.state.epoch < epochs and not _done(self.state, max_steps):
                batches = self._epoch_batches(loader)
                while part := list(
                    itertools.islice(batches, self.grad_accum_steps - self._pending)
                ):
                    # The loss is normalised over the step's micro-batches on every
                    # rank, read ahead; a step across an epoch boundary weighs its
                    # two parts by their micro-batches.
                    totals = self.step_totals(part)
                    for batch in part:
                        record = self._step(batch, totals, len(part) / self.grad_accum_steps)
                        self.state.micro_in_epoch += 1
                        window.add(record)
                        if record["stepped"]:
                            self._finish_step(window, log, bar, started)
                    if _done(self.state, max_steps):
                        break
                else:
                    self.state.epoch += 1
                    self.state.micro_in_epoch = 0
            if self._pending:  # the loader ended inside an accumulation window
                scale = self._rescale_partial_window()
                self._optimizer_step()
                self._finish_step(window, log, bar, started, scale)
            if self.checkpoint_dir is not None:
                self.save()
        finally:
            bar.close()
            if log is not None:
                log.close()
        return {
            "steps": self.state.step,
            "tokens": self.state.tokens,
            "seconds": time.perf_counter() - started,
            "loss": window.last_loss,
        }

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

    def _epoch_batches(self, loader: Iterable) -> Iterable:
        """The loader's batches for the current epoch, resumed mid-epoch if needed."""
        sampler = getattr(loader, "sampler", None)
        if callable(getattr(sampler, "set_epoch", None)):  # DistributedSampler: this epoch's order
            sampler.set_epoch(self.state.epoch)
        skip, gens = self.state.micro_in_epoch, self._loader_gens
        resumed_rng, self._resumed_loader_rng = self._resumed_loader_rng, None
        replay = skip and self._epoch_rng is not None
        if replay:  # the order the interrupted epoch had
            now = torch.get_rng_state()
            torch.set_rng_state(self._epoch_rng["torch"])
            _set_states(gens, self._epoch_rng["loaders"])
        else:
            if resumed_rng is not None:  # resumed at an epoch boundary
                _set_states(gens, resumed_rng)
            self._epoch_rng = {
                "torch": torch.get_rng_state(),
                "loaders": [g.get_state() for g in gens],
            }
        iterator = iter(loader)
        for i in range(skip):
            if next(iterator, None) is None:
                raise RuntimeError(
                    f"resuming at micro-batch {skip} of epoch {self.state.epoch}, but the "
                    f"loader yields only {i} batches: it is not the loader of the checkpoint"
                )
        if replay:
            torch.set_rng_state(now)
        return iterator

    def _finish_step(self, window: _Window, log, bar, started: float, scale: float = 1.0) -> None:
        record = window.flush(scale, self.collective_timeout)
        self.state.seconds = time.perf_counter() - started
        record.update(
            step=self.state.step,
            epoch=self.state.epoch,
            lr=self._last_lr,
            elapsed_s=self.state.seconds,
        )
        if log is not None:
            log.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if self.checkpoint_every and self.state.step % self.checkpoint_every == 0:
            self.save()


def _set_states(generators: list[torch.Generator], states: list[torch.Tensor]) -> None:
    if not states:
        return  # a checkpoint without loader states (older kdcore): their current order
    if len(states) != len(generators):
        raise RuntimeError(
            f"the checkpoint holds {len(states)} loader random states, but this loader has "
            f"{len(generators)} generators: it is not the loader of the checkpoint"
        )
    for g, state in zip(generators, states, strict=True):
        g.set_state(state)


def _done(state: TrainState, max_steps: int | None) -> bool:
    return max_steps is not None and state.step >= max_steps


class _Window:
    """Averages the micro-batch records of one optimizer step."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.start = time.perf_counter()
        self.last_loss = float("nan")

    def add(self, record: dict) -> None:
        self.records.append(record)

    def flush(
        self, scale: float = 1.0, timeout_s: float = dist.DEFAULT_TIMEOUT_S
    ) -> dict[str, Any]:
        """The step's record: the micro-batches' shares summed (times ``scale``)
        and, under a process group, summed over ranks (every rank calls it)."""
        skip = ("stepped", "step", "tokens")
        keys = list(dict.fromkeys(k for r in self.records for k in r if k not in skip))
        # A span component is NaN in a micro-batch of a step without that span:
        # the sum is over the micro-batches that have it (NaN only if none has).
        values = [_sum_of_present([r.get(k, math.nan) for r in self.records]) * scale for k in keys]
        values.append(float(sum(r["tokens"] for r in self.records)))
        summed = torch.tensor(values, dtype=torch.float64)
        summed = dist.all_reduce_sum(summed, "the step's log record", timeout_s).tolist()
        now = time.perf_counter()
        out: dict[str, Any] = dict(zip(keys, summed[:-1], strict=True))
        tokens = int(summed[-1])
        out["tokens"] = tokens
        out["tokens_per_s"] = tokens / max(now - self.start, 1e-9)
        self.last_loss = out["loss"]
        self.records, self.start = [], now
        return out


def _sum_of_present(values: list[float]) -> float:
    present = [v for v in values if not math.isnan(v)]
    return sum(present) if present else float("nan")


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int | None, initial: int, description: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=description,
        unit="step",
        dynamic_ncols=True,
        mininterval=0.5,
    )
