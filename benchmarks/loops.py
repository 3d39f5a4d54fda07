"""The bare loop trainflow's train stage is measured against, and the statistics of a side-by-side run.

`bare_fit` is what a hand-written PyTorch script does (`lightning_loop.py` holds Lightning's side). Both
train the model the train stage would build (`core.models.build_model`) from the same loaders and seed,
with the same AdamW, schedule, gradient clipping and one validation pass per epoch, and are timed from
their first line of setup (data, model, optimizer) to their last write, as a user waits for them.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

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


@dataclass(frozen=True)
class Sample:
    seconds: float  # wall time of the whole run, setup to last write
    samples: int  # training samples (images, or seq_len windows) seen
    steps: int  # optimizer steps
    best_val_loss: float  # equal across sides that did the same work


def bare_fit(cfg: Config, data: PrepareDataResult, store: ArtifactStore, weights: Path) -> Sample:
    """A hand-written loop: forward, cross-entropy, backward, clip, step, schedule, zero_grad; a validation
    pass per epoch; the final weights saved. Seeds, loaders, model and optimizer come in the train stage's
    order, so both draw the same numbers."""
    started = time.perf_counter()
    seed_everything(cfg.seed)
    loaders = prepared_loaders(TrainingSpec.of(cfg, data), store, cfg.train.batch_size)
    model = build_model(cfg.model, data.spec)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, step_budget(len(loaders.train), cfg.train)[1])
    clip_norm = cfg.train.grad_clip_norm or math.inf
    steps = samples = 0
    best_val_loss = math.inf
    model.train()
    for epoch in range(cfg.train.max_epochs):
        loaders.sampler.set_epoch(epoch)
        for x, y in loaders.train:
            logits = model(x)  # (B, classes) or (B, T, vocab)
            loss = F.cross_entropy(logits.flatten(0, -2), y.flatten())
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            steps, samples = steps + 1, samples + len(y)
        best_val_loss = min(best_val_loss, val_loss(model, loaders.val))
    torch.save(model.state_dict(), weights)
    return Sample(time.perf_counter() - started, samples, steps, best_val_loss)


@torch.no_grad()
def val_loss(model: nn.Module, loader: DataLoader[Batch]) -> float:
    model.eval()
    loss_sum, n = 0.0, 0
    for x, y in loader:
        loss_sum += F.cross_entropy(model(x).flatten(0, -2), y.flatten(), reduction="sum").item()
        n += y.numel()
    model.train()
    return loss_sum / n


# ------------------------------------------------------------------------------------ statistics
def speed_ratio(engine: list[float], reference: list[float]) -> float:
    """How fast the engine is relative to a reference: median reference seconds / median engine seconds."""
    return statistics.median(reference) / statistics.median(engine)


def bootstrap_interval(engine: list[float], reference: list[float], draws: int = 4000) -> tuple[float, float]:
    """95% percentile interval of `speed_ratio`, resampling whole rounds (each round ran both sides back to
    back, so a disturbance that hit one round hit both)."""
    rng = random.Random(0)
    n = len(engine)
    ratios = []
    for _ in range(draws):
        rounds = [rng.randrange(n) for _ in range(n)]
        ratios.append(speed_ratio([engine[i] for i in rounds], [reference[i] for i in rounds]))
    ratios.sort()
    return ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]


def paired_ratio(engine: list[float], reference: list[float]) -> float:
    """The median over rounds of reference/engine seconds in the same round: the machine's drift between
    rounds cancels out, where it moves both medians of `speed_ratio`."""
    return statistics.median(r / e for e, r in zip(engine, reference, strict=True))


def paired_interval(engine: list[float], reference: list[float], draws: int = 4000) -> tuple[float, float]:
    """95% percentile interval of `paired_ratio`, resampling rounds."""
    rng = random.Random(0)
    n = len(engine)
    ratios = sorted(
        paired_ratio(*zip(*[(engine[i], reference[i]) for i in (rng.randrange(n) for _ in range(n))], strict=True))
        for _ in range(draws)
    )
    return ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]
