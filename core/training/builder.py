"""Build a ready-to-fit Trainer from a training spec (`spec.py`).

Shared by the train stage, the compress stage (fine-tuning, distillation), the LR range test and HPO
trials, so all of them train the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from trainflow.core.data.loaders import Batch, Loaders, build_loaders, rebatched
from trainflow.core.data.prepared import load_splits
from trainflow.core.data.spec import check_metric
from trainflow.core.storage.store import ArtifactStore
from trainflow.core.training.augment import build_augment
from trainflow.core.training.callbacks import Callback
from trainflow.core.training.distributed import SINGLE, Rank
from trainflow.core.training.finetune import Finetuning
from trainflow.core.training.flops import model_flops_per_token
from trainflow.core.training.initial import initial_model
from trainflow.core.training.optim import build_optimizer, build_scheduler
from trainflow.core.training.parallel import enable_fast_matmul, uses_channels_last, wrap_model
from trainflow.core.training.precision import resolve_device
from trainflow.core.training.seed import seed_everything
from trainflow.core.training.spec import TrainingSpec
from trainflow.core.training.steps import step_budget
from trainflow.core.training.trainer import LossFn, Trainer


def build_trainer(
    spec: TrainingSpec,
    store: ArtifactStore,
    callbacks: Sequence[Callback] = (),
    model: nn.Module | None = None,
    loss: LossFn | None = None,
    rank: Rank = SINGLE,
    device: torch.device | None = None,
) -> Trainer:
    """The seeded model, optimizer, LR schedule and loaders of `spec` in a Trainer.

    Args:
        model: a pre-built model to train instead of `initial_model(spec)` (a pruned model whose shapes no
            longer match `spec.model`, a distillation student); moved to the device. `train.finetune` and
            `train.augment` apply only to the spec's own model.
        loss: the training loss hook (default: cross-entropy); see `Trainer`.
        rank: this process's place among data-parallel ranks: loaders hold its shard, the model is wrapped
            (DDP/FSDP) and the LR scaled by `train.distributed.lr_scaling`.
        device: this rank's device (default: `train.device` resolved).

    Raises:
        ConfigError: a setting does not fit this data or machine (before any compute).
    """
    train_cfg, data = spec.train, spec.data
    device = resolve_device(train_cfg.device) if device is None else device
    check_metric(train_cfg.early_stopping.monitor, data.spec.task, "train.early_stopping.monitor")
    seed_everything(spec.seed)  # the same on every rank: every replica starts from the same weights
    module = (initial_model(spec, store) if model is None else model).to(device)
    finetune = spec.train.finetune if model is None and spec.train.finetune.active else None
    phases = [Finetuning(finetune, module)] if finetune is not None else []  # before the freeze: all it may train
    auto = train_cfg.batch_size == "auto"
    loaders = prepared_loaders(spec, store, 1 if auto else int(train_cfg.batch_size), device.type == "cuda", rank)
    if auto:  # the search trains on the loaded split; the loaders then take the size found
        found = auto_batch_size(module, spec, store, loaders.train.dataset, rank, device)
        train_cfg = train_cfg.model_copy(update={"batch_size": found})
        loaders.train, loaders.val, loaders.test = (
            rebatched(d, found) for d in (loaders.train, loaders.val, loaders.test)
        )
    channels_last = uses_channels_last(module, device)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    enable_fast_matmul(device)
    wrapped = wrap_model(module, train_cfg, rank, device)
    lr = spec.optim.lr * (train_cfg.distributed.lr_scale() if rank.distributed else 1.0)
    optimizer = build_optimizer(module, spec.optim, lr, finetune)
    _, total_steps = step_budget(len(loaders.train), train_cfg)
    scheduler = build_scheduler(optimizer, spec.optim, total_steps)
    flops = model_flops_per_token(module, data.spec.seq_len) if data.spec.seq_len else None
    trainer = Trainer(wrapped, optimizer, scheduler, loaders, train_cfg, device, data.spec.task,
                      [*phases, *callbacks], rank, loss, module, flops)  # fmt: skip
    for phase in phases:  # the first phase now: the LR range test sweeps what the first epoch trains
        phase.apply(trainer)
    if channels_last:
        trainer.input_format = torch.channels_last
    if model is None:  # the spec's own model (training, HPO trials, a student); a pruned model's fine-tune: none
        trainer.augment = build_augment(train_cfg.augment, data.spec)
    return trainer


def prepared_loaders(
    spec: TrainingSpec, store: ArtifactStore, batch_size: int, pin: bool = False, rank: Rank = SINGLE
) -> Loaders:
    """Train/val/test loaders over the spec's prepared arrays, shuffled by its seed (`pin` only where
    `loader.pin_memory` allows); train and val hold `rank`'s shard."""
    data, loader = spec.data, spec.loader
    splits = load_splits(store, data)
    return build_loaders(splits, data.spec.seq_len, batch_size, loader, spec.seed, pin and loader.pin_memory,
                         rank.rank, rank.world_size)  # fmt: skip


def auto_batch_size(
    module: nn.Module,
    spec: TrainingSpec,
    store: ArtifactStore,
    train: Dataset[Batch],
    rank: Rank = SINGLE,
    device: torch.device | None = None,
) -> int:
    """`train.batch_size: auto` resolved: the recorded search result, else a search over `train` (the whole
    training split) on the main rank's device; the other ranks receive it."""
    from trainflow.core.training.batch_size import fingerprint, search_batch_size
    from trainflow.core.training.distributed import broadcast_object

    device = resolve_device(spec.train.device) if device is None else device
    found = None
    if rank.is_main:
        key = fingerprint(spec, device)
        found = search_batch_size(module, spec, train, device, store, key)
        found = max(1, min(found, len(train) // rank.world_size))  # type: ignore[arg-type]
    return broadcast_object(found, device, rank.main) if rank.distributed else found  # type: ignore[return-value]
