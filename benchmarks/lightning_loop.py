"""Lightning's side of the train-stage benchmark: `Trainer.fit` set up as its docs show, with an MLflow
logger, ModelCheckpoint and EarlyStopping, on the same model, loaders, optimizer and schedule as the
train stage and the bare loop (`loops.py`). Needs `pip install lightning` (the `bench` extra)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from loops import Sample
from torch import nn

from trainflow.core.config import Config
from trainflow.core.data.loaders import Batch
from trainflow.core.models import build_model
from trainflow.core.records import PrepareDataResult
from trainflow.core.storage.store import ArtifactStore
from trainflow.core.training.builder import prepared_loaders
from trainflow.core.training.optim import build_optimizer, build_scheduler
from trainflow.core.training.seed import seed_everything
from trainflow.core.training.spec import TrainingSpec
from trainflow.core.training.steps import step_budget


class LitModule(L.LightningModule):
    def __init__(self, model: nn.Module, cfg: Config, total_steps: int):
        super().__init__()
        self.model, self.cfg, self.total_steps, self.samples = model, cfg, total_steps, 0

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(x).flatten(0, -2), y.flatten())
        self.log("train/loss", loss)
        self.samples += len(y)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        x, y = batch
        loss = F.cross_entropy(self.model(x).flatten(0, -2), y.flatten())
        self.log("val/loss", loss, on_epoch=True, batch_size=y.numel())

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.model, self.cfg.optim)
        scheduler = build_scheduler(optimizer, self.cfg.optim, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def lightning_fit(
    cfg: Config, data: PrepareDataResult, store: ArtifactStore, folder: Path, tracking_uri: str
) -> Sample:
    """MLFlowLogger every 25 steps (as the train stage logs), ModelCheckpoint and EarlyStopping on val/loss
    (patience above max_epochs, so it never ends the run), no sanity-check pass (the train stage has none),
    no progress bar or model summary."""
    started = time.perf_counter()
    seed_everything(cfg.seed)
    loaders = prepared_loaders(TrainingSpec.of(cfg, data), store, cfg.train.batch_size)
    module = LitModule(build_model(cfg.model, data.spec), cfg, step_budget(len(loaders.train), cfg.train)[1])
    checkpoint = ModelCheckpoint(dirpath=folder, monitor="val/loss", mode="min")
    trainer = L.Trainer(
        max_epochs=cfg.train.max_epochs, accelerator="cpu", devices=1, gradient_clip_val=cfg.train.grad_clip_norm,
        logger=MLFlowLogger(experiment_name="lightning", tracking_uri=tracking_uri), log_every_n_steps=25,
        callbacks=[checkpoint, EarlyStopping(monitor="val/loss", patience=cfg.train.max_epochs + 1)],
        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False, default_root_dir=folder,
    )  # fmt: skip
    trainer.fit(module, loaders.train, loaders.val)
    best = float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else math.nan
    return Sample(time.perf_counter() - started, module.samples, trainer.global_step, best)
