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
import itertools
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _validate
from ..spans import Span
from . import distributed as dist
from .batches import check_batch, loader_generators, model_logits, set_generator_states
from .checkpointing import Checkpointing, TrainState
from .io import JsonlLog
from .objective import LossFn, Objective
from .progress import StepWindow, progress_bar


def _component_name(key: Any) -> str:
    if isinstance(key, Span):
        return f"span_{key.name.lower()}"
    return f"span_{key}" if isinstance(key, int) else str(key)


class Distiller(Checkpointing):
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
        check_batch(batch)
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
            check_batch(batch)
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
        check_batch(batch)
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

    # --- checkpoints ----------------------------------------------------------

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
        bar = progress_bar(total, self.state.step, description, progress and main)
        started, window = time.perf_counter() - self.state.seconds, StepWindow()
        self._loader_gens = loader_generators(loader)
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
            set_generator_states(gens, self._epoch_rng["loaders"])
        else:
            if resumed_rng is not None:  # resumed at an epoch boundary
                set_generator_states(gens, resumed_rng)
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

    def _finish_step(
        self, window: StepWindow, log, bar, started: float, scale: float = 1.0
    ) -> None:
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


def _done(state: TrainState, max_steps: int | None) -> bool:
    return max_steps is not None and state.step >= max_steps
