"""Callbacks: behaviour attached at named points of `Trainer.fit` instead of flags inside the loop.

A callback that wants training to end calls `trainer.request_stop(reason, message)`; the loop
leaves at the next check and the reason lands in the fit result.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import TYPE_CHECKING, Any, Protocol

from trainflow.core.config import EarlyStoppingConfig
from trainflow.core.errors import ConfigError
from trainflow.core.training.state import FitResult, StopReason

if TYPE_CHECKING:
    from trainflow.core.training.trainer import Trainer

log = logging.getLogger(__name__)


class Callback:
    """Base class: every hook is a no-op; override the ones you need.

    Data-parallel, a callback runs on the main rank only (logging, checkpoints), unless `every_rank` is
    true: one that changes the model (keeping pruned weights at zero) must act on every replica."""

    every_rank = False

    @property
    def state_key(self) -> str:
        """Key of this callback's state inside a checkpoint."""
        return type(self).__name__

    def on_fit_start(self, trainer: Trainer) -> None:
        """Called once before the first step, after any resumed state is restored."""

    def on_epoch_start(self, trainer: Trainer) -> None:
        """Called before each epoch's first step (also a resumed one's)."""

    def on_step_end(self, trainer: Trainer) -> None:
        """Called after every optimizer step (skipped non-finite steps included)."""

    def on_before_optimizer_step(self, trainer: Trainer) -> None:
        """Called inside each step once its gradients are final (accumulated, unscaled, clipped), before the
        update; the parameters still hold their old values."""

    def on_log(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Called every `train.log_every_steps` steps with the training metrics since the last call."""

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Called after each validation pass with its metrics (`val/loss`, ...)."""

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        """Called once when fit ends normally."""

    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        """Called when fit is left by an exception (which is re-raised afterwards)."""

    def on_micro_batch_split(self, trainer: Trainer) -> None:
        """Called after a CUDA out-of-memory error split the micro-batch (`trainer.state.micro_batch`)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def monitored_value(metrics: dict[str, float], monitor: str, field: str) -> float:
    """The monitored metric, or a ConfigError naming the config field and the metrics there are."""
    if monitor not in metrics:
        raise ConfigError(f"{field}: '{monitor}' is not an evaluation metric; available: {', '.join(sorted(metrics))}")
    return metrics[monitor]


def is_improvement(current: float, best: float | None, mode: str, min_delta: float) -> bool:
    """Whether `current` beats `best` by more than `min_delta` in direction `mode` (NaN never does)."""
    if not math.isfinite(current):
        return False
    if best is None:
        return True
    return current < best - min_delta if mode == "min" else current > best + min_delta


class EarlyStopping(Callback):
    """Stop after `patience` evaluations without an improvement of the monitored metric."""

    def __init__(self, cfg: EarlyStoppingConfig):
        self.cfg = cfg
        self.best: float | None = None
        self.wait = 0

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        current = monitored_value(metrics, self.cfg.monitor, "train.early_stopping.monitor")
        if is_improvement(current, self.best, self.cfg.mode, self.cfg.min_delta):
            self.best, self.wait = current, 0
            return
        self.wait += 1
        if self.wait >= self.cfg.patience:
            trainer.request_stop(
                StopReason.EARLY_STOPPING,
                f"{self.cfg.monitor} did not improve on {self.best:.5g} by more than {self.cfg.min_delta:g} "
                f"for {self.wait} evaluations (patience {self.cfg.patience})",
            )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait = state["best"], state["wait"]


class MetricLogger(Protocol):
    """Where metrics go (MLflow in the pipeline); implementations must not block the training step."""

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def flush(self) -> None: ...


class TrackingCallback(Callback):
    """Sends training and evaluation metrics to a MetricLogger."""

    def __init__(self, logger: MetricLogger):
        self.logger = logger

    def on_fit_start(self, trainer: Trainer) -> None:
        self.logger.log_params(trainer.describe())

    def on_log(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.logger.log_metrics(metrics, trainer.state.step)

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.logger.log_metrics(metrics | {"epoch": float(trainer.state.epoch)}, trainer.state.step)

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        self.logger.flush()

    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        self.logger.flush()

    def on_micro_batch_split(self, trainer: Trainer) -> None:
        s = trainer.state
        metrics = {"train/micro_batch_size": s.micro_batch, "train/grad_accum_steps": s.grad_accum}
        self.logger.log_metrics(metrics, s.step)


class ProgressBar(Callback):
    """A tqdm bar over optimizer steps, shown only when stderr is a terminal."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and sys.stderr.isatty()
        self.bar: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=trainer.total_steps, initial=trainer.state.step, unit="step", dynamic_ncols=True)

    def on_step_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_log(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['lr']:.2e}", refresh=False)

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_description(f"epoch {trainer.state.epoch} val/loss {metrics['val/loss']:.4f}")

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        self._close()

    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
