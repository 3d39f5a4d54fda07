"""Checkpoints for crash-safe resume: written to a temp file and renamed, the last k kept.

A periodic checkpoint holds everything `Trainer.fit` needs to continue as if never stopped:
model, optimizer, scheduler, scaler, RNG states, progress (epoch, step, data position) and the
callbacks' states (the best weights so far among them), plus the resolved config and tracking
run id. `best.pt` holds the weights of the best evaluation, `model.pt` those the stage hands on.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from core.config import CheckpointConfig, EarlyStoppingConfig
from core.errors import TrainingError
from core.training.callbacks import Callback, is_improvement, monitored_value
from core.training.state import FitResult

if TYPE_CHECKING:
    from core.training.trainer import Trainer

log = logging.getLogger(__name__)

_PERIODIC = re.compile(r"^step-(\d+)\.pt$")
BEST, FINAL = "best.pt", "model.pt"


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Atomic save: a crash mid-write leaves the previous checkpoint intact, never a truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint we wrote (tensors and plain containers only: `weights_only=True`).

    Raises:
        TrainingError: the file cannot be loaded; a run never silently starts over.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainingError(
            f"{path}: checkpoint cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "delete it to start this run over, or set train.resume=false"
        ) from None


def periodic_checkpoints(folder: Path) -> list[Path]:
    """Periodic checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _PERIODIC.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: Path) -> Path | None:
    found = periodic_checkpoints(folder)
    return found[-1] if found else None


class ModelCheckpoint(Callback):
    """Periodic checkpoints for resume, and the weights of the best evaluation.

    Periodic checkpoints are written every `every_steps` optimizer steps when set; otherwise at an
    evaluation once `min_interval_s` seconds have passed since the last one, so short epochs do not
    pay a save each. The best weights are kept in host memory and travel inside every periodic
    checkpoint. At fit end: a last checkpoint, `best.pt`, then (with `restore_best`) the best
    weights are loaded and the weights the stage hands on are written to `model.pt`.
    """

    def __init__(self, folder: Path, cfg: CheckpointConfig, monitor: EarlyStoppingConfig, extra: dict[str, Any]):
        self.folder, self.cfg, self.monitor, self.extra = folder, cfg, monitor, extra
        self.best: float | None = None
        self.best_metrics: dict[str, float] = {}
        self.best_step: int | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self._saved_step: int | None = None
        self._saved_at = time.monotonic()

    def on_step_end(self, trainer: Trainer) -> None:
        if self.cfg.every_steps and trainer.state.step % self.cfg.every_steps == 0:
            self.save(trainer)

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        current = monitored_value(metrics, self.monitor.monitor, "train.early_stopping.monitor")
        if is_improvement(current, self.best, self.monitor.mode, 0.0):
            self.best, self.best_metrics, self.best_step = current, dict(metrics), trainer.state.step
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()}
        if self.cfg.every_steps is None and time.monotonic() - self._saved_at >= self.cfg.min_interval_s:
            self.save(trainer)

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        if self._saved_step != trainer.state.step:
            self.save(trainer)
        if self.best_weights is not None:
            best = {"model": self.best_weights, "step": self.best_step, "metrics": self.best_metrics}
            save_checkpoint(best, self.folder / BEST)
            if self.monitor.restore_best:
                trainer.model.load_state_dict(self.best_weights)
                log.info("restored the weights of step %s (%s=%.5g)", self.best_step, self.monitor.monitor, self.best)
        save_checkpoint({"model": trainer.model.state_dict(), "step": trainer.state.step}, self.folder / FINAL)

    def save(self, trainer: Trainer) -> Path:
        path = self.folder / f"step-{trainer.state.step:09d}.pt"
        save_checkpoint(trainer.checkpoint_state() | self.extra, path)
        self._saved_step, self._saved_at = trainer.state.step, time.monotonic()
        for old in periodic_checkpoints(self.folder)[: -self.cfg.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_metrics": self.best_metrics, "best_step": self.best_step,
                "best_weights": self.best_weights}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_metrics, self.best_step = state["best"], state["best_metrics"], state["best_step"]
        self.best_weights = state["best_weights"]
