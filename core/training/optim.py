"""Optimizer with decoupled weight decay on weight matrices only, and a warmup + decay LR schedule."""

from __future__ import annotations

import importlib
import math

import torch
from torch import nn

from trainflow.core.config import OptimConfig
from trainflow.core.config.finetune import FinetuneConfig
from trainflow.core.training.finetune import param_groups
from trainflow.core.training.large_batch import LAMB, LARS
from trainflow.core.training.spec import OptimSpec


def import_optimizer_dependencies() -> None:
    """Import what torch defers to the first optimizer built in a process (torch._dynamo, ~1.3 s on 2 cores),
    so a caller can pay it where it overlaps other work: while Prefect's server boots, while an HPO worker
    waits for the study, before a benchmark's timed runs."""
    importlib.import_module("torch._dynamo")


def build_optimizer(
    model: nn.Module, cfg: OptimSpec, lr: float | None = None, finetune: FinetuneConfig | None = None
) -> torch.optim.Optimizer:
    """AdamW, SGD, LARS or LAMB over the parameters that require gradients; parameters with fewer than 2 dims
    (norm scales, biases) get no weight decay, and under LARS/LAMB no trust ratio either. `finetune` gives
    blocks their own LR factors (`core.training.finetune.param_groups`).

    `lr` overrides `cfg.lr` (scaled for several ranks). AdamW is fused when every parameter is on CUDA:
    one kernel for all tensors, and GradScaler's inf check skips its step on the device.
    """
    lr = cfg.lr if lr is None else lr
    groups = param_groups(model, finetune or FinetuneConfig(), cfg.weight_decay, lr)
    params = [p for g in groups for p in g["params"]]
    if cfg.name in ("lars", "lamb"):
        for group in groups:  # param_groups keeps matrices and vectors apart
            if group["params"][0].ndim < 2:
                group["trust_adaptation"] = False
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient)
    if cfg.name == "lamb":
        return LAMB(groups, lr=lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    fused = True if params and all(p.is_cuda for p in params) else None
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warmup, then decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step; its state goes into every checkpoint."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
