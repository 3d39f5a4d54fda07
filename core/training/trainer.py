"""The Trainer: one `fit()` loop whose optimizer step fits a screen, with callbacks around it.

Order of events in `fit`:
    on_fit_start
    at each epoch start: on_epoch_start
    for each optimizer step: train_step (on_before_optimizer_step once its gradients are final) -> on_log
        (every log_every_steps) -> validation if due
        (on_eval_end) -> on_step_end
    at each epoch end (eval_every_steps unset): validation (on_eval_end)
    on_fit_end, or on_exception when an exception leaves fit (it is re-raised)
Each micro-batch's training loss comes from the `loss` hook (default `task_loss`: cross-entropy).
Callbacks run in the order given; the stage passes tracking, early stopping, checkpoint, progress,
so at each evaluation the checkpoint is written after the early-stopping decision it must hold.

Data-parallel (`rank` given, model wrapped in DDP/FSDP): each rank steps on its share of every global
micro-batch; logged training metrics and validation are reduced over ranks, so every rank sees the
same numbers and takes the same early-stopping decision. A CUDA out-of-memory error in a step splits
the micro-batch and multiplies accumulation alike, then re-reads the step's data: same update.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainflow.core.config import TrainConfig
from trainflow.core.data.loaders import Batch, Loaders, rebatched
from trainflow.core.models.lora import load_weights, weights_to_save
from trainflow.core.training.callbacks import Callback
from trainflow.core.training.distributed import SINGLE, Rank, broadcast_object, reduced_eval
from trainflow.core.training.flops import mfu_factor
from trainflow.core.training.metrics import eval_pass, loss_fn, pass_metrics
from trainflow.core.training.precision import autocast_context, grad_scaler
from trainflow.core.training.recovery import count_nonfinite, micro_batch_split
from trainflow.core.training.seed import rng_state, set_rng_state
from trainflow.core.training.sharded import full_state_dict, is_sharded, load_shards, save_shards
from trainflow.core.training.state import FitResult, StepOutput, StopReason, TrainState
from trainflow.core.training.steps import optimizer_steps, step_budget
from trainflow.core.training.window import LogWindow

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""The training loss of one micro-batch from (model, x, y), averaged over its targets."""
Augment = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(x, y) on the device -> augmented (x, y); y may become soft targets (B, C) that the loss takes as they are."""


def task_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The default LossFn: cross-entropy of the model's logits against the targets."""
    return loss_fn(model(x), y)


class Trainer:
    """Fits `model` with `loss` (default `task_loss`; distillation passes its own); validation always
    reports the task loss, so val/loss compares across students and teachers. `model` may be wrapped
    (DDP, FSDP, torch.compile); `module` is the plain model whose state is saved."""

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
        rank: Rank = SINGLE,
        loss: LossFn | None = None,
        module: nn.Module | None = None,
        flops_per_token: float | None = None,
    ):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.module = module if module is not None else getattr(model, "module", model)
        self.loss: LossFn = task_loss if loss is None else loss
        self.loaders, self.cfg, self.device, self.task = loaders, cfg, device, task
        self.callbacks, self.rank = list(callbacks), rank
        self.autocast: AbstractContextManager[object] = autocast_context(device, cfg.precision)
        self.scaler = grad_scaler(device, cfg.precision)
        self.state = TrainState(micro_batch=cfg.batch_size, grad_accum=cfg.grad_accum_steps)  # type: ignore[arg-type]
        self.steps_per_epoch, self.total_steps = step_budget(len(loaders.train), cfg)
        self.last_metrics: dict[str, float] = {}
        self.eval_seconds = 0.0  # spent in validation during fit()
        self.input_format = torch.preserve_format  # torch.channels_last for a channels-last CNN on CUDA
        self.mfu_factor = mfu_factor(flops_per_token, device)  # the GPT on a GPU of known peak: MFU is logged
        # a fused optimizer skips a non-finite step on the device: no host sync, checked when metrics are logged
        self.deferred_finite_check = bool(getattr(optimizer, "defaults", {}).get("fused"))
        self.sharded = is_sharded(self.module)  # FSDP: weights and optimizer state split over the ranks
        self._compile_pending = hasattr(model, "_orig_mod")  # torch.compile: the first step may fail to compile
        self.log_window = LogWindow(self.state.samples_seen)
        self.updating = False  # inside an optimizer update or an epoch's end: no consistent state to save
        self.augment: Augment | None = None  # train.augment: applied to each training micro-batch on the device

    # ------------------------------------------------------------------------------- the step
    def train_step(self, micro_batches: Sequence[Batch]) -> StepOutput:
        """One optimizer step over `micro_batches` (accumulated).

        Each micro-batch's loss is weighted by its share of the step's targets, so k micro-batches
        give the gradient of one batch of their union, a short last batch included (fp32: equal to
        rounding). Steps with a non-finite gradient norm are skipped.
        """
        model, optimizer, scaler, loss_of = self.model, self.optimizer, self.scaler, self.loss
        n_targets = sum(y.numel() for _, y in micro_batches)
        loss: torch.Tensor | None = None
        for i, (x, y) in enumerate(micro_batches):
            share = y.numel() / n_targets
            x = x.to(self.device, non_blocking=True, memory_format=self.input_format)
            y = y.to(self.device, non_blocking=True)
            if self.augment is not None:  # on the device, each sample its own draw; may give soft targets
                x, y = self.augment(x, y)
            with self._gradient_sync(last=i == len(micro_batches) - 1), self.autocast:
                micro_loss = loss_of(model, x, y)
            if len(micro_batches) > 1:  # one micro-batch is the whole step: no weighting op on the hot path
                micro_loss = micro_loss * share
            scaler.scale(micro_loss).backward()
            loss = micro_loss.detach() if loss is None else loss + micro_loss.detach()
        assert loss is not None, "a step has at least one micro-batch"
        self.updating = True  # until the step's end: the weights, optimizer and progress change from here
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.grad_clip_norm or math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        self._call("on_before_optimizer_step")  # gradients final: unscaled, clipped, accumulated
        finite_t = torch.isfinite(loss if scaler.is_enabled() else grad_norm)
        if self.deferred_finite_check:
            if not scaler.is_enabled():  # an enabled scaler hands its own found_inf to a fused optimizer
                optimizer.found_inf = (~finite_t).float()  # type: ignore[attr-defined]
            scaler.step(optimizer)
            finite: bool | torch.Tensor = finite_t
        else:
            finite = bool(finite_t)  # the step's one host sync (non-fused optimizers)
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
                 self.effective_batch_size, s.micro_batch, s.grad_accum, self.rank.world_size,
                 self.total_steps)  # fmt: skip
        self.model.train()
        self._call("on_fit_start")
        self._fit_started, self._fit_samples, self.eval_seconds = time.perf_counter(), s.samples_seen, 0.0
        self.log_window.reset(s.samples_seen)  # the first window starts now, after any resume
        try:
            while s.stop_reason is None:
                if s.epoch >= cfg.max_epochs:
                    self.request_stop(StopReason.MAX_EPOCHS, f"reached train.max_epochs={cfg.max_epochs}")
                    break
                start = s.batch_in_epoch * s.micro_batch * self.rank.world_size
                self.loaders.sampler.set_epoch(s.epoch, start=start)
                self._call("on_epoch_start")
                if self._run_epoch():
                    self.updating = True
                    s.epoch, s.batch_in_epoch = s.epoch + 1, 0
                    if cfg.eval_every_steps is None:
                        self.validate()
                    self.updating = False
            for finite in self.log_window.deferred_finite():  # steps skipped since the last log point
                self._check_finite(finite)
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
            samples_per_s=(s.samples_seen - self._fit_samples) * self.rank.world_size / max(train_seconds, 1e-9),
            nonfinite_steps=s.nonfinite_total,
            last_metrics=self.last_metrics,
        )
        log.info("training stopped: %s (%s)", result.stop_reason.value, result.stop_message)
        self._call("on_fit_end", result)
        return result

    def _run_epoch(self) -> bool:
        """Steps over the rest of the epoch; True when its data ran out, False on a stop request or when
        the micro-batch was split (the epoch is then re-read from the same position)."""
        for micro_batches in optimizer_steps(self.loaders.train, self.state.grad_accum, self.log_window.data_wait):
            if not self._run_step(micro_batches) or self.state.stop_reason is not None:
                return False
        return True

    def _run_step(self, micro_batches: list[Batch]) -> bool:
        s, cfg = self.state, self.cfg
        try:
            out = self._guarded_step(micro_batches)
        except torch.cuda.OutOfMemoryError as exc:
            self.split_micro_batch(exc)
            return False
        s.step += 1
        s.batch_in_epoch += len(micro_batches)
        s.samples_seen += sum(len(y) for _, y in micro_batches)
        self.log_window.add(out, micro_batches)
        if isinstance(out.finite, bool):
            self._check_finite(out.finite)
        if s.step % cfg.log_every_steps == 0:
            self._call("on_log", self.collect_train_metrics())
        if cfg.max_steps is not None and s.step >= cfg.max_steps:
            self.request_stop(StopReason.MAX_STEPS, f"reached train.max_steps={cfg.max_steps}")
        if cfg.eval_every_steps is not None and s.step % cfg.eval_every_steps == 0:
            self.validate()
        self._call("on_step_end")
        self.updating = False
        return True

    def _guarded_step(self, micro_batches: list[Batch]) -> StepOutput:
        """The step. A torch.compile'd model compiles in its first step; if that fails, a warning, the uncompiled
        model and the step again (an error of the model itself then surfaces from eager mode)."""
        if not self._compile_pending:
            return self.train_step(micro_batches)
        self._compile_pending = False
        try:
            return self.train_step(micro_batches)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:
            log.warning("train.compile: compiling failed (%s: %s); training in eager mode",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")  # fmt: skip
            self.model = self.model._orig_mod  # type: ignore[assignment]
            self.optimizer.zero_grad(set_to_none=True)
            return self.train_step(micro_batches)

    def split_micro_batch(self, exc: BaseException) -> None:
        """After a CUDA out-of-memory error inside a step (before its update): micro-batch / k and accumulation x k
        (`recovery.micro_batch_split`); the data position is counted in the new micro-batches, so the step re-runs
        on the same samples: the same update."""
        s = self.state
        factor = micro_batch_split(s.micro_batch, self.rank.distributed, exc)
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        s.micro_batch, s.grad_accum, s.batch_in_epoch = (
            s.micro_batch // factor,
            s.grad_accum * factor,
            s.batch_in_epoch * factor,
        )
        self.loaders.train = rebatched(self.loaders.train, s.micro_batch)
        self.loaders.val = rebatched(self.loaders.val, s.micro_batch)  # evaluation at the size that fits
        log.warning("step %d: CUDA out of memory; micro-batch now %d x %d accumulation (effective batch %d kept)",
                    s.step + 1, s.micro_batch, s.grad_accum, self.effective_batch_size)  # fmt: skip
        self._call("on_micro_batch_split")

    def validate(self) -> dict[str, float]:
        """Evaluate on the validation split (each rank its shard, reduced) and notify callbacks."""
        started = time.perf_counter()
        result = eval_pass(self.model, self.loaders.val, self.device, self.autocast)
        if self.rank.distributed:
            result = reduced_eval(result, self.device)
        metrics = pass_metrics(result, self.task, "val")
        self.eval_seconds += time.perf_counter() - started
        self.log_window.excluded_seconds += time.perf_counter() - started
        self.state.last_eval_step, self.last_metrics = self.state.step, metrics
        self._call("on_eval_end", metrics)
        return metrics

    def request_stop(self, reason: StopReason, message: str) -> None:
        """Ask the loop to end after the current step; the first request's reason is kept."""
        if self.state.stop_reason is None:
            self.state.stop_reason, self.state.stop_message = reason.value, message

    # ---------------------------------------------------------------------- metrics and state
    @property
    def effective_batch_size(self) -> int:
        return self.state.micro_batch * self.state.grad_accum * self.rank.world_size

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The plain weights on CPU, on the main rank (None elsewhere); collective under FSDP. A LoRA model's are
        its adapters (`core.models.lora.weights_to_save`)."""
        state = full_state_dict(self.module, self.rank.is_main)
        return None if state is None else weights_to_save(self.module, state)

    def main_decides(self, flag: bool) -> bool:
        """The main rank's `flag` on every rank (a time-based decision that collectives must share)."""
        if not self.rank.distributed:
            return flag
        return bool(broadcast_object(flag, self.device, self.rank.main))

    def collect_train_metrics(self) -> dict[str, float]:
        """Training metrics since the last call, averaged over ranks; the only place the loop reads device
        values (and, with a fused optimizer, checks the window's non-finite steps)."""
        for finite in self.log_window.deferred_finite():
            self._check_finite(finite)
        lm, lr = self.task == "language_modeling", self.peak_lr
        metrics = self.log_window.metrics(self.state.samples_seen, lm, self.rank, self.device, lr, self.mfu_factor)
        return metrics | {"train/micro_batch_size": float(self.state.micro_batch)}

    def describe(self) -> dict[str, Any]:
        """Run facts logged once at the start (as MLflow params)."""
        return {
            "effective_batch_size": self.effective_batch_size,
            "micro_batch_size": self.state.micro_batch,
            "grad_accum_steps": self.state.grad_accum,
            "world_size": self.rank.world_size,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "device": str(self.device),
            "n_parameters": sum(p.numel() for p in self.module.parameters()),
            "trainable_parameters": sum(p.numel() for p in self.module.parameters() if p.requires_grad),
        }

    @property
    def peak_lr(self) -> float:
        """The LR now of parameters at factor 1 (`train.finetune` gives lower blocks a fraction of it)."""
        group = self.optimizer.param_groups[0]
        return float(group["lr"]) / group.get("lr_scale", 1.0)

    def rewrap(self) -> None:
        """After parameters were frozen or unfrozen: DDP registers the trainable ones when it wraps, so wrap again
        (a collective; every rank changes phase at the same epoch)."""
        if isinstance(getattr(self.model, "_orig_mod", self.model), DistributedDataParallel):
            from trainflow.core.training.parallel import wrap_model

            self.model = wrap_model(self.module, self.cfg, self.rank, self.device)

    def checkpoint_state(self, shards: Path | None = None) -> dict[str, Any]:
        """Everything `restore` needs. Under FSDP (collective) the weights and optimizer state go to `shards`,
        each rank its own, and the returned dict names that folder instead of holding them."""
        if self.sharded:
            assert shards is not None, "a sharded model saves its state into a shards folder"
            save_shards(self.module, self.optimizer, shards)
        return {
            "model": None if self.sharded else weights_to_save(self.module, self.module.state_dict()),
            "optimizer": None if self.sharded else self.optimizer.state_dict(),
            "shards": shards.name if self.sharded and shards is not None else None,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "state": asdict(self.state),
            "callbacks": {cb.state_key: cb.state_dict() for cb in self.callbacks},
        }

    def restore(self, payload: dict[str, Any], folder: Path | None = None) -> None:
        """Continue from a checkpoint as if training had never stopped (at its micro-batch size); a sharded
        one's weights from its shards folder in `folder` (collective)."""
        if payload.get("shards"):
            assert folder is not None, "a sharded checkpoint's weights are in its folder"
            load_shards(self.module, self.optimizer, folder / payload["shards"])
        else:
            load_weights(self.module, payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        set_rng_state(payload["rng"])
        micro, accum = self.state.micro_batch, self.state.grad_accum
        self.state = TrainState(**payload["state"])
        self.state.micro_batch, self.state.grad_accum = self.state.micro_batch or micro, self.state.grad_accum or accum
        if self.state.micro_batch != micro:
            self.loaders.train = rebatched(self.loaders.train, self.state.micro_batch)
            self.loaders.val = rebatched(self.loaders.val, self.state.micro_batch)
        for cb in self.callbacks:
            if cb.state_key in payload["callbacks"]:
                cb.load_state_dict(payload["callbacks"][cb.state_key])

    # -------------------------------------------------------------------------------- helpers
    def _check_finite(self, finite: bool) -> None:
        count_nonfinite(self.state, finite, self.cfg.max_nonfinite_steps, self.peak_lr)

    def _gradient_sync(self, last: bool) -> AbstractContextManager[object]:
        # Under DDP/FSDP only the last micro-batch of a step all-reduces (reduce-scatters) gradients.
        if not last and isinstance(self.model, DistributedDataParallel):
            return self.model.no_sync()
        if self.sharded and self.rank.distributed:
            self.module.set_requires_gradient_sync(last)  # type: ignore[operator]
        return nullcontext()

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)
