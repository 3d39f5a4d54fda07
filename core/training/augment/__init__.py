"""Augmentation on the training device (`train.augment`): batched ops written on torch, applied by the Trainer to
each training micro-batch after it reaches the device, each sample with its own draw.

Every draw comes from torch's global generator of the batch's device, so the RNG state a checkpoint saves
(`core.training.seed.rng_state`) restores the draws: a resumed run sees the augmentations an uninterrupted one
would. (torchvision's v2 transforms draw one set of parameters per batch, torchvision #8484.)

    augment = build_augment(spec.train.augment, data_spec)   # None when off
    x, y = augment(x, y)                                      # y may come back as soft targets (B, C)
"""

from __future__ import annotations

import logging
from typing import TypeVar

import torch
from torch import Tensor

from trainflow.core.config import augment as ops
from trainflow.core.config.augment import AugmentConfig, augment_problem
from trainflow.core.data.spec import DataSpec
from trainflow.core.errors import ConfigError
from trainflow.core.training.augment.image import ColorJitter, Cutout, Geometry
from trainflow.core.training.augment.mix import Mix
from trainflow.core.training.augment.table import GaussianNoise, SwapNoise
from trainflow.core.training.trainer import Augment

log = logging.getLogger(__name__)
Op = TypeVar("Op")

__all__ = ["Pipeline", "build_augment"]


def build_augment(cfg: AugmentConfig, spec: DataSpec) -> Augment | None:
    """The ops of `cfg` for data of `spec`, in a fixed order whatever the list's: geometry (crop, flip, rotate as
    one warp), color_jitter, cutout; gaussian_noise, swap_noise; then mixup/cutmix. None when `cfg` is not active
    (no ops, or strength 0).

    Raises:
        ConfigError: the ops do not fit the data (image ops on a table, any op on language-modelling data).
    """
    if not cfg.active:
        return None
    problem = augment_problem(cfg, spec.task, len(spec.input_shape))
    if problem:
        raise ConfigError(problem)
    s = cfg.strength
    steps: list[Augment] = []
    crop, flip, rotate = _op(cfg, ops.RandomResizedCrop), _op(cfg, ops.HFlip), _op(cfg, ops.Rotate)
    if crop or flip or rotate:
        steps.append(Geometry(crop, flip, rotate, s))
    if jitter := _op(cfg, ops.ColorJitter):
        steps.append(ColorJitter(jitter, s, spec))
    if cutout := _op(cfg, ops.Cutout):
        steps.append(Cutout(cutout, s))
    if noise := _op(cfg, ops.GaussianNoise):
        if spec.numeric_features == 0:
            log.warning("train.augment: gaussian_noise finds no scaled numeric columns in this data; it does nothing")
        steps.append(GaussianNoise(noise, s, spec.numeric_features))
    if swap := _op(cfg, ops.SwapNoise):
        steps.append(SwapNoise(swap, s))
    mixup, cutmix = _op(cfg, ops.Mixup), _op(cfg, ops.CutMix)
    if mixup or cutmix:
        steps.append(Mix(mixup, cutmix, s, spec.n_classes))
    log.info("train.augment: %s at strength %g, on the training device", ", ".join(o.op for o in cfg.ops), s)
    return Pipeline(steps)


class Pipeline:
    """The ops one after another, outside autograd (the inputs need no gradient)."""

    def __init__(self, steps: list[Augment]) -> None:
        self.steps = steps

    @torch.no_grad()
    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        for step in self.steps:
            x, y = step(x, y)
        if channels_last:  # a channels-last CNN on CUDA: grid_sample and friends answer in NCHW
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y


def _op(cfg: AugmentConfig, kind: type[Op]) -> Op | None:
    """The listed op of that kind (each is listed at most once), or None."""
    return next((op for op in cfg.ops if isinstance(op, kind)), None)
