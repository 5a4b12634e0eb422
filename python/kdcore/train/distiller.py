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
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..spans import Span
from .io import JsonlLog, atomic_save, load_checkpoint
from .objective import LossFn, Objective

CHECKPOINT_NAME = "last.pt"


@dataclass
class TrainState:
    """Where training is: optimizer steps, micro-batches, epoch position, tokens."""

    step: int = 0
    micro: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0
    tokens: int = 0


def _takes_attention_mask(model: nn.Module) -> bool:
    try:
        params = inspect.signature(model.forward).parameters.values()
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
        self.objective = Objective(
            mode=loss, alpha=alpha, temperature=temperature, divergence=divergence, beta=beta,
            span_weights=span_weights, normalize=normalize, ignore_index=ignore_index,
            tail=tail, teacher_temperature=teacher_temperature,
        )  # fmt: skip
        self.student, self.teacher = student, teacher
        self.optimizer, self.scheduler = optimizer, scheduler
        self.grad_accum_steps, self.max_grad_norm = grad_accum_steps, max_grad_norm
        self.device = next(student.parameters()).device
        self.autocast = self.device.type == "cuda" if autocast is None else bool(autocast)
        self.autocast_dtype = autocast_dtype
        self.log_path = None if log_path is None else Path(log_path)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every = checkpoint_every
        self.state = TrainState()
        self._pending = 0  # micro-batches accumulated since the last optimizer step
        self._epoch_rng: torch.Tensor | None = None
        self._last_lr = float("nan")
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

    def compute_loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict]:
        """The loss and its detached components on one batch (no backward)."""
        batch = self._to_device(batch)
        if "input_ids" not in batch or "labels" not in batch:
            raise KeyError(f"a batch needs 'input_ids' and 'labels'; got keys {sorted(batch)}")
        if batch["labels"].shape != batch["input_ids"].shape:
            raise ValueError(
                f"labels {tuple(batch['labels'].shape)} must match input_ids "
                f"{tuple(batch['input_ids'].shape)} (aligned; the shift happens inside)"
            )
        teacher = self._teacher_logits(batch)
        with self._autocast():
            logits = model_logits(self.student, batch)
        return self.objective(logits, teacher, batch)

    def step(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Forward, loss and backward on one micro-batch; optimizer step when due.

        Returns ``{"loss", <components>, "tokens", "stepped", "step"}`` as
        Python numbers (one host sync per call, for logging).
        """
        self.student.train()
        loss, comps = self.compute_loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss {loss.item()} at micro-batch {self.state.micro}; "
                "the optimizer was not stepped"
            )
        (loss / self.grad_accum_steps).backward()
        tokens = int((batch["labels"][:, 1:] != self.objective.ignore_index).sum())
        self.state.micro += 1
        self.state.tokens += tokens
        self._pending += 1
        stepped = self._pending == self.grad_accum_steps
        if stepped:
            self._optimizer_step()
        record = {
            "loss": loss.item(),
            "tokens": tokens,
            "stepped": stepped,
            "step": self.state.step,
        }
        record.update({_component_name(k): float(v) for k, v in comps.items()})
        return record

    def _rescale_partial_window(self) -> None:
        """Gradients of an incomplete window become the mean over its micro-batches
        (each loss was divided by grad_accum_steps, not by the micro-batches there)."""
        factor = self.grad_accum_steps / self._pending
        for p in self.student.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)

    def _optimizer_step(self) -> None:
        self._last_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        if self.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.student.parameters(), self.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._pending = 0
        self.state.step += 1

    # --- checkpoints ----------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (taken at an optimizer-step boundary)."""
        if self._pending:
            raise RuntimeError(
                f"{self._pending} micro-batches are accumulated but not stepped; "
                "checkpoint at an optimizer-step boundary"
            )
        state = {
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": asdict(self.state),
            "rng": torch.get_rng_state(),
            "epoch_rng": self._epoch_rng,
        }
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if torch.cuda.is_available() and self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        self.state = TrainState(**state["state"])
        self._epoch_rng = state.get("epoch_rng")
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self._pending = 0

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Writes a checkpoint atomically (default ``checkpoint_dir/last.pt``)."""
        if path is None:
            if self.checkpoint_dir is None:
                raise ValueError("save() needs a path or a checkpoint_dir")
            path = self.checkpoint_dir / CHECKPOINT_NAME
        atomic_save(self.state_dict(), path)
        return Path(path)

    def load(self, path: str | os.PathLike) -> None:
        self.load_state_dict(load_checkpoint(path, map_location="cpu"))

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
        """Trains for ``epochs`` passes over ``loader`` or ``max_steps`` optimizer steps.

        ``resume=True`` continues from ``checkpoint_dir/last.pt`` when it
        exists (a path resumes from that file): the loader is replayed from
        its epoch start with the same random state and the micro-batches
        already consumed are skipped, so a resumed run takes the same steps
        as an uninterrupted one (given a loader whose order depends only on
        torch's global random state, like a DataLoader without its own
        generator). Checkpoints are written every ``checkpoint_every`` steps
        and at the end; a failure never leaves a half-written file.
        """
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1; got {epochs}")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None; got {max_steps}")
        self._maybe_resume(resume)
        total = max_steps
        if total is None and hasattr(loader, "__len__"):
            total = math.ceil(len(loader) * epochs / self.grad_accum_steps)  # type: ignore[arg-type]
        log = JsonlLog(self.log_path) if self.log_path is not None else None
        bar = _progress(total, self.state.step, description, progress)
        started, window = time.perf_counter(), _Window()
        try:
            while self.state.epoch < epochs and not _done(self.state, max_steps):
                for batch in self._epoch_batches(loader):
                    record = self.step(batch)
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
                self._rescale_partial_window()
                self._optimizer_step()
                self._finish_step(window, log, bar, started)
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

    def _maybe_resume(self, resume: bool | str | os.PathLike) -> None:
        if resume is False:
            return
        if resume is True:
            if self.checkpoint_dir is None:
                raise ValueError("resume=True needs a checkpoint_dir (or pass a checkpoint path)")
            path = self.checkpoint_dir / CHECKPOINT_NAME
            if not path.exists():
                return  # nothing to resume: a fresh start
        else:
            path = Path(resume)
            if not path.exists():
                raise FileNotFoundError(f"resume checkpoint {path} does not exist")
        self.load(path)

    def _epoch_batches(self, loader: Iterable) -> Iterable:
        """The loader's batches for the current epoch, resumed mid-epoch if needed."""
        skip = self.state.micro_in_epoch
        if skip and self._epoch_rng is not None:
            now = torch.get_rng_state()
            torch.set_rng_state(self._epoch_rng)  # the order the interrupted epoch had
        else:
            self._epoch_rng = torch.get_rng_state()
        iterator = iter(loader)
        for i in range(skip):
            if next(iterator, None) is None:
                raise RuntimeError(
                    f"resuming at micro-batch {skip} of epoch {self.state.epoch}, but the "
                    f"loader yields only {i} batches: it is not the loader of the checkpoint"
                )
        if skip and self._epoch_rng is not None:
            torch.set_rng_state(now)
        return iterator

    def _finish_step(self, window: _Window, log, bar, started: float) -> None:
        record = window.flush()
        record.update(
            step=self.state.step,
            epoch=self.state.epoch,
            lr=self._last_lr,
            elapsed_s=time.perf_counter() - started,
        )
        if log is not None:
            log.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if self.checkpoint_every and self.state.step % self.checkpoint_every == 0:
            self.save()


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

    def flush(self) -> dict[str, Any]:
        now = time.perf_counter()
        keys = [k for k in self.records[0] if k not in ("stepped", "step", "tokens")]
        out: dict[str, Any] = {k: sum(r[k] for r in self.records) / len(self.records) for k in keys}
        tokens = sum(r["tokens"] for r in self.records)
        out["tokens"] = tokens
        out["tokens_per_s"] = tokens / max(now - self.start, 1e-9)
        self.last_loss = out["loss"]
        self.records, self.start = [], now
        return out


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
        total=total, initial=initial, desc=description, unit="step", dynamic_ncols=True,
        mininterval=0.5,
    )  # fmt: skip
