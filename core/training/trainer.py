"""The Trainer: one `fit()` loop whose optimizer step fits a screen, with callbacks around it.

Order of events in `fit`:
    on_fit_start
    for each optimizer step: train_step -> on_log (every log_every_steps) -> validation if due
        (on_eval_end) -> on_step_end
    at each epoch end (eval_every_steps unset): validation (on_eval_end)
    on_fit_end, or on_exception when an exception leaves fit (it is re-raised)
Each micro-batch's training loss comes from the `loss` hook (default `task_loss`: cross-entropy).
Callbacks run in the order given; the stage passes tracking, early stopping, checkpoint, progress,
so at each evaluation the checkpoint is written after the early-stopping decision it must hold.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from core.config import TrainConfig
from core.data.loaders import Batch, Loaders
from core.errors import TrainingError
from core.training.callbacks import Callback
from core.training.metrics import eval_pass, loss_fn, pass_metrics
from core.training.precision import autocast_context, grad_scaler
from core.training.seed import rng_state, set_rng_state
from core.training.state import FitResult, StepOutput, StopReason, TrainState

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""The training loss of one micro-batch from (model, x, y), averaged over its targets."""


def task_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The default LossFn: cross-entropy of the model's logits against the targets."""
    return loss_fn(model(x), y)


class Trainer:
    """Fits `model` with `loss` (default `task_loss`; distillation passes its own); validation always
    reports the task loss, so val/loss compares across students and teachers."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        loaders: Loaders,
        cfg: TrainConfig,
        device: torch.device,
        task: str,
        callbacks: Sequence[Callback] = (),
        world_size: int = 1,
        loss: LossFn | None = None,
    ):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.loss: LossFn = task_loss if loss is None else loss
        self.loaders, self.cfg, self.device, self.task = loaders, cfg, device, task
        self.callbacks, self.world_size = list(callbacks), world_size
        self.autocast: AbstractContextManager[object] = autocast_context(device, cfg.precision)
        self.scaler = grad_scaler(device, cfg.precision)
        self.state = TrainState()
        self.steps_per_epoch, self.total_steps = step_budget(len(loaders.train), cfg)
        self.last_metrics: dict[str, float] = {}
        self.eval_seconds = 0.0  # spent in validation during fit()
        self._reset_window()

    # ------------------------------------------------------------------------------- the step
    def train_step(self, window: Sequence[Batch]) -> StepOutput:
        """One optimizer step over `window`'s micro-batches.

        Each micro-batch's loss is weighted by its share of the window's targets, so k micro-batches
        give the gradient of one batch of their union, a short last batch included (fp32: equal to
        rounding). Steps with a non-finite gradient norm are skipped.
        """
        model, optimizer, scaler, loss_of = self.model, self.optimizer, self.scaler, self.loss
        n_targets = sum(y.numel() for _, y in window)
        loss: torch.Tensor | None = None
        for i, (x, y) in enumerate(window):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self._gradient_sync(last=i == len(window) - 1), self.autocast:
                micro_loss = loss_of(model, x, y)
            if len(window) > 1:  # one micro-batch is the whole window: no weighting op on the hot path
                micro_loss = micro_loss * (y.numel() / n_targets)
            scaler.scale(micro_loss).backward()
            loss = micro_loss.detach() if loss is None else loss + micro_loss.detach()
        assert loss is not None, "a window holds at least one micro-batch"
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.grad_clip_norm or math.inf)
        finite = bool(torch.isfinite(loss if scaler.is_enabled() else grad_norm))  # the step's one host sync
        if finite or scaler.is_enabled():
            scaler.step(optimizer)  # an enabled (fp16) scaler itself skips steps with inf/NaN gradients
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return StepOutput(loss, grad_norm, finite)

    # -------------------------------------------------------------------------------- the loop
    def fit(self) -> FitResult:
        """Train until max_epochs, max_steps or a callback's stop request; resumes from `self.state`."""
        s, cfg = self.state, self.cfg
        log.info("effective batch %d = %d per micro-batch x %d accumulation x %d processes; %d steps",
                 cfg.batch_size * cfg.grad_accum_steps * self.world_size, cfg.batch_size, cfg.grad_accum_steps,
                 self.world_size, self.total_steps)  # fmt: skip
        self._call("on_fit_start")
        self._fit_started, self._fit_samples, self.eval_seconds = time.perf_counter(), s.samples_seen, 0.0
        self.model.train()
        try:
            while s.stop_reason is None:
                if s.epoch >= cfg.max_epochs:
                    self.request_stop(StopReason.MAX_EPOCHS, f"reached train.max_epochs={cfg.max_epochs}")
                    break
                self.loaders.sampler.set_epoch(s.epoch, start=s.batch_in_epoch * cfg.batch_size)
                for window in step_windows(self.loaders.train, cfg.grad_accum_steps):
                    self._run_step(window)
                    if s.stop_reason is not None:
                        break
                else:
                    s.epoch, s.batch_in_epoch = s.epoch + 1, 0
                    if cfg.eval_every_steps is None:
                        self.validate()
            if s.last_eval_step != s.step:
                self.validate()
        except BaseException as exc:
            self._call("on_exception", exc)
            raise
        train_seconds = time.perf_counter() - self._fit_started - self.eval_seconds
        result = FitResult(
            stop_reason=StopReason(s.stop_reason),
            stop_message=s.stop_message,
            epochs_run=s.epoch + (1 if s.batch_in_epoch else 0),
            steps=s.step,
            samples_per_s=(s.samples_seen - self._fit_samples) / max(train_seconds, 1e-9),
            nonfinite_steps=s.nonfinite_total,
            last_metrics=self.last_metrics,
        )
        log.info("training stopped: %s (%s)", result.stop_reason.value, result.stop_message)
        self._call("on_fit_end", result)
        return result

    def _run_step(self, window: list[Batch]) -> None:
        s, cfg = self.state, self.cfg
        out = self.train_step(window)
        s.step += 1
        s.batch_in_epoch += len(window)
        samples = sum(len(y) for _, y in window)
        s.samples_seen += samples
        self._window_losses.append(out.loss)
        self._window_norms.append(out.grad_norm)
        self._window_targets += sum(y.numel() for _, y in window)
        self._check_finite(out)
        if s.step % cfg.log_every_steps == 0:
            self._call("on_log", self.collect_train_metrics())
        if cfg.max_steps is not None and s.step >= cfg.max_steps:
            self.request_stop(StopReason.MAX_STEPS, f"reached train.max_steps={cfg.max_steps}")
        if cfg.eval_every_steps is not None and s.step % cfg.eval_every_steps == 0:
            self.validate()
        self._call("on_step_end")

    def validate(self) -> dict[str, float]:
        """Evaluate on the validation split and notify callbacks (early stopping, checkpoint, ...)."""
        started = time.perf_counter()
        metrics = pass_metrics(eval_pass(self.model, self.loaders.val, self.device, self.autocast), self.task, "val")
        self.eval_seconds += time.perf_counter() - started
        self.state.last_eval_step, self.last_metrics = self.state.step, metrics
        self._call("on_eval_end", metrics)
        return metrics

    def request_stop(self, reason: StopReason, message: str) -> None:
        """Ask the loop to end after the current step; the first request's reason is kept."""
        if self.state.stop_reason is None:
            self.state.stop_reason, self.state.stop_message = reason.value, message

    # ---------------------------------------------------------------------- metrics and state
    def collect_train_metrics(self) -> dict[str, float]:
        """Training metrics averaged since the last call; the only place the loop reads device values."""
        now = time.perf_counter()
        seconds = max(now - self._window_started, 1e-9)
        lm = self.task == "language_modeling"
        processed = self._window_targets if lm else self.state.samples_seen - self._window_samples
        metrics = {
            "train/loss": torch.stack(self._window_losses).mean().item(),  # on_log comes after >= 1 step
            "train/grad_norm": torch.stack(self._window_norms).mean().item(),
            "lr": self.scheduler.get_last_lr()[0],
            "train/tokens_per_s" if lm else "train/samples_per_s": processed / seconds,
            "train/peak_memory_mb": _peak_memory_mb(self.device),
        }
        self._reset_window(now)
        return metrics

    def describe(self) -> dict[str, Any]:
        """Run facts logged once at the start (as MLflow params)."""
        cfg = self.cfg
        return {
            "effective_batch_size": cfg.batch_size * cfg.grad_accum_steps * self.world_size,
            "world_size": self.world_size,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "device": str(self.device),
            "n_parameters": sum(p.numel() for p in self.model.parameters()),
        }

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "state": asdict(self.state),
            "callbacks": {cb.state_key: cb.state_dict() for cb in self.callbacks},
        }

    def restore(self, payload: dict[str, Any]) -> None:
        """Continue from a checkpoint as if training had never stopped."""
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        set_rng_state(payload["rng"])
        self.state = TrainState(**payload["state"])
        for cb in self.callbacks:
            if cb.state_key in payload["callbacks"]:
                cb.load_state_dict(payload["callbacks"][cb.state_key])

    # -------------------------------------------------------------------------------- helpers
    def _check_finite(self, out: StepOutput) -> None:
        s = self.state
        if out.finite:
            s.nonfinite_in_row = 0
            return
        s.nonfinite_in_row += 1
        s.nonfinite_total += 1
        log.warning("step %d: non-finite gradient norm, step skipped (%d in a row)", s.step, s.nonfinite_in_row)
        if s.nonfinite_in_row >= self.cfg.max_nonfinite_steps:
            raise TrainingError(
                f"train: {s.nonfinite_in_row} optimizer steps in a row had non-finite gradients (last at step "
                f"{s.step}, lr {self.scheduler.get_last_lr()[0]:.3g}); lower optim.lr, set train.grad_clip_norm "
                f"or use fp32 (limit: train.max_nonfinite_steps={self.cfg.max_nonfinite_steps})"
            )

    def _gradient_sync(self, last: bool) -> AbstractContextManager[object]:
        # Under DDP only the last micro-batch of a window all-reduces gradients.
        if not last and isinstance(self.model, DistributedDataParallel):
            return self.model.no_sync()
        return nullcontext()

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def _reset_window(self, now: float | None = None) -> None:
        self._window_losses: list[torch.Tensor] = []  # per step, on device: stacked when logged, not per step
        self._window_norms: list[torch.Tensor] = []
        self._window_targets = 0
        self._window_samples = self.state.samples_seen
        self._window_started = time.perf_counter() if now is None else now


def step_budget(n_micro_batches: int, cfg: TrainConfig) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) for an epoch of `n_micro_batches`: the one
    place the loop's length is computed, so the LR schedule and the loop cannot disagree."""
    steps_per_epoch = math.ceil(n_micro_batches / cfg.grad_accum_steps)  # a short last window is a step
    total = cfg.max_epochs * steps_per_epoch
    return steps_per_epoch, total if cfg.max_steps is None else min(cfg.max_steps, total)


def step_windows(batches: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    """Group micro-batches into optimizer-step windows; the epoch's last window may be shorter."""
    window: list[Batch] = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
