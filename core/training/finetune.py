"""`train.finetune`: frozen modules and when they unfreeze, BatchNorm in frozen modules, per-layer learning rates.

The optimizer is built once over every parameter that may ever train, in groups by learning-rate factor
(`param_groups`). Freezing only turns `requires_grad` off: a parameter without a gradient is skipped by the
optimizer (no update, no weight decay, no state), so unfreezing adds nothing to the optimizer, and the phase is a
pure function of the epoch (`FinetuneConfig.frozen_at`). A resumed run is therefore in the phase, with the param
groups, optimizer state and schedule, of the run it continues; nothing can re-freeze what had thawed (the
failure Lightning's BaseFinetuning shows on resume, #6891, #21901).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from torch import nn

from trainflow.core.config.finetune import FinetuneConfig
from trainflow.core.errors import ConfigError
from trainflow.core.models.parts import first_match, lr_blocks, unmatched
from trainflow.core.training.callbacks import Callback

if TYPE_CHECKING:
    from trainflow.core.training.trainer import Trainer

log = logging.getLogger(__name__)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def lr_scales(model: nn.Module, cfg: FinetuneConfig) -> dict[int, float]:
    """The factor on optim.lr of each trainable parameter (by id): `layer_lr_decay` ** (blocks above it), or
    the first `lr_multipliers` pattern matching its name; 1 otherwise."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.layer_lr_decay is not None:
        blocks = lr_blocks(model)
        depth = {id(p): len(blocks) - 1 - i for i, block in enumerate(blocks) for p in block}
        return {id(p): cfg.layer_lr_decay ** depth[id(p)] for p in params}
    if cfg.lr_multipliers:
        missing = unmatched(model, cfg.lr_multipliers)
        if missing:
            raise ConfigError(f"train.finetune.lr_multipliers: {missing[0]!r} names no module of this model")
        patterns = list(cfg.lr_multipliers)
        scales: dict[int, float] = {}
        for p, names in _all_names(model).items():  # a tied weight answers to each of its names
            found = next((f for f in (first_match(n, patterns) for n in names) if f), None)
            scales[p] = cfg.lr_multipliers[found] if found else 1.0
        return {id(p): scales[id(p)] for p in params}
    return {id(p): 1.0 for p in params}


def param_groups(model: nn.Module, cfg: FinetuneConfig, weight_decay: float, lr: float) -> list[dict[str, Any]]:
    """Optimizer groups over the trainable parameters: one per (LR factor, decay or not), in model order.
    Weight matrices (2+ dims) get `weight_decay`, norms and biases none; each group's `lr` is `lr` x its
    `lr_scale`, which the LR schedule multiplies alike and the LR range test sweeps alike."""
    scales = lr_scales(model, cfg)
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        key = (scales[id(p)], p.ndim >= 2)
        group = groups.setdefault(key, {"params": [], "weight_decay": weight_decay if key[1] else 0.0,
                                        "lr": lr * key[0], "lr_scale": key[0]})  # fmt: skip
        group["params"].append(p)
    return list(groups.values())


class Finetuning(Callback):
    """Applies the phase of `train.finetune` at fit start, at each epoch start and after each validation (which
    leaves every module in train mode): frozen parameters off, BatchNorm of frozen modules per `batchnorm`."""

    every_rank = True  # data-parallel: every replica trains the same parameters

    def __init__(self, cfg: FinetuneConfig, model: nn.Module):
        self.cfg = cfg
        self.trainable = {id(p) for p in model.parameters() if p.requires_grad}  # LoRA's base stays frozen
        missing = unmatched(model, cfg.freeze + [p for s in cfg.unfreeze_steps() for p in s.patterns])
        if missing:
            raise ConfigError(f"train.finetune: {missing[0]!r} names no module of this model")
        self.phase: tuple[int, ...] | None = None

    def apply(self, trainer: Trainer) -> None:
        module, epoch = trainer.module, trainer.state.epoch
        frozen, thawed = self.cfg.frozen_at(epoch)
        before = [p.requires_grad for p in module.parameters()]
        for name, sub in module.named_modules():
            if isinstance(sub, _BATCHNORM):  # statistics fixed while frozen, else as the loop's mode
                held = self.cfg.batchnorm == "frozen" and _in(name, frozen) and not _in(name, thawed)
                sub.train(module.training and not held)
        named = _all_names(module)
        for p in module.parameters():
            if id(p) not in self.trainable:
                continue
            owners = [name.rsplit(".", 1)[0] for name in named[id(p)]]  # a tied weight: frozen under any name
            still_frozen = any(_in(o, frozen) and not _in(o, thawed) for o in owners)
            bn_trains = self.cfg.batchnorm == "train" and isinstance(module.get_submodule(owners[0]), _BATCHNORM)
            p.requires_grad_(not still_frozen or bn_trains)
        after = [p.requires_grad for p in module.parameters()]
        if after != before:
            n = sum(p.numel() for p in module.parameters() if p.requires_grad)
            log.info("finetune: epoch %d: %d trainable parameters (frozen: %s; unfrozen: %s)", epoch, n,
                     ", ".join(frozen) or "none", ", ".join(thawed) or "none")  # fmt: skip
            trainer.rewrap()

    def on_fit_start(self, trainer: Trainer) -> None:
        self.apply(trainer)

    def on_epoch_start(self, trainer: Trainer) -> None:
        self.apply(trainer)

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.apply(trainer)


def _all_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter (by id): the GPT's tied `tok_emb.weight` is `lm_head.weight` too."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _in(name: str, patterns: list[str]) -> bool:
    return bool(patterns) and first_match(name, patterns) is not None if name else False
