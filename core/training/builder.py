"""Build a ready-to-fit Trainer from config sections and prepared data.

Shared by the train stage, the compress stage (fine-tuning, distillation), the LR range test and HPO
trials, so all of them train the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from core.config import LoaderConfig, ModelConfig, OptimConfig, TrainConfig
from core.data.loaders import Loaders, build_loaders
from core.data.prepared import load_splits
from core.data.spec import check_metric
from core.models import build_model
from core.records import PrepareDataResult
from core.storage.store import ArtifactStore
from core.training.callbacks import Callback
from core.training.optim import build_optimizer, build_scheduler
from core.training.precision import resolve_device
from core.training.seed import seed_everything
from core.training.trainer import LossFn, Trainer, step_budget


def build_trainer(
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    train_cfg: TrainConfig,
    loader_cfg: LoaderConfig,
    seed: int,
    data: PrepareDataResult,
    store: ArtifactStore,
    callbacks: Sequence[Callback] = (),
    lr: float | None = None,
    model: nn.Module | None = None,
    loss: LossFn | None = None,
) -> Trainer:
    """Seeded model, optimizer (at `lr` if given, else `optim.lr`), LR schedule and loaders in a Trainer.

    Args:
        model: a pre-built model to train instead of `build_model(model_cfg, spec)` (a pruned model whose
            shapes no longer match `model_cfg`, a distillation student); moved to the device.
        loss: the training loss hook (default: cross-entropy); see `Trainer`.

    Raises:
        ConfigError: a setting does not fit this data or machine (before any compute).
    """
    device = resolve_device(train_cfg.device)
    check_metric(train_cfg.early_stopping.monitor, data.spec.task, "train.early_stopping.monitor")
    seed_everything(seed)
    loaders = prepared_loaders(data, store, train_cfg.batch_size, loader_cfg, seed, pin=device.type == "cuda")
    model = (build_model(model_cfg, data.spec) if model is None else model).to(device)
    optimizer = build_optimizer(model, optim_cfg, lr)
    _, total_steps = step_budget(len(loaders.train), train_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, total_steps)
    return Trainer(model, optimizer, scheduler, loaders, train_cfg, device, data.spec.task, callbacks, loss=loss)


def prepared_loaders(
    data: PrepareDataResult, store: ArtifactStore, batch_size: int, cfg: LoaderConfig, seed: int, pin: bool = False
) -> Loaders:
    """Train/val/test loaders over a prepared_data record's arrays (`pin` only where `loader.pin_memory` allows)."""
    splits = load_splits(store.local_path(data.uri), data.spec)
    return build_loaders(splits, data.spec.seq_len, batch_size, cfg, seed, pin and cfg.pin_memory)
