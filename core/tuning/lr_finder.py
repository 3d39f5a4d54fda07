"""Leslie Smith's LR range test (Smith 2017, "Cyclical Learning Rates", section 3.3) and the rules
that pick a learning rate from its curve.

The sweep runs the Trainer's own optimizer step with an exponentially growing LR, records a
bias-corrected exponential moving average of the loss, and stops when it diverges. Model,
optimizer, schedule, scaler and the global RNG are restored afterwards, so nothing leaks into
the training that follows.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from trainflow.core.data.loaders import Batch
from trainflow.core.training.seed import isolate_rng
from trainflow.core.training.steps import optimizer_steps
from trainflow.core.training.trainer import Trainer

RULES = ("valley", "steepest", "min_div_10")


@dataclass(frozen=True)
class LRCurve:
    lrs: list[float]  # LR of each step
    losses: list[float]  # smoothed (bias-corrected EMA) loss after each step
    diverged: bool  # stopped by diverge_factor or a non-finite loss before num_steps


def lr_sweep(
    trainer: Trainer, min_lr: float, max_lr: float, num_steps: int, smoothing: float, diverge_factor: float
) -> LRCurve:
    """Run the range test with `trainer`'s step; every state it touches is restored on return. Its callbacks see
    `on_fit_start` and each step's `on_step_end` (the step counted from the sweep's start), nothing else."""
    saved = {
        "model": copy.deepcopy(trainer.module.state_dict()),
        "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
        "scheduler": trainer.scheduler,
        "scaler": copy.deepcopy(trainer.scaler.state_dict()),
        "data_position": (trainer.loaders.sampler.epoch, trainer.loaders.sampler.start),
        "step": trainer.state.step,
    }
    growth = (max_lr / min_lr) ** (1 / (num_steps - 1))
    lrs: list[float] = []
    losses: list[float] = []
    average, best, diverged = 0.0, math.inf, False
    try:
        with isolate_rng():
            for group in trainer.optimizer.param_groups:  # blocks at a fraction of the LR keep it (train.finetune)
                group["lr"] = group["initial_lr"] = min_lr * group.get("lr_scale", 1.0)
            trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda i: growth**i)
            for callback in trainer.callbacks:  # the doctor, when it watches the sweep (train.diagnostics.in_search)
                callback.on_fit_start(trainer)
            for step, micro_batches in zip(range(num_steps), _endless_steps(trainer), strict=False):
                lr = trainer.peak_lr
                loss = trainer.train_step(micro_batches).loss.item()
                trainer.state.step += 1
                for callback in trainer.callbacks:
                    callback.on_step_end(trainer)
                if not math.isfinite(loss):
                    diverged = True
                    break
                average = smoothing * average + (1 - smoothing) * loss
                smoothed = average / (1 - smoothing ** (step + 1))
                lrs.append(lr)
                losses.append(smoothed)
                best = min(best, smoothed)
                if smoothed > diverge_factor * best:
                    diverged = True
                    break
    finally:
        trainer.module.load_state_dict(saved["model"])
        trainer.optimizer.load_state_dict(saved["optimizer"])
        trainer.scheduler = saved["scheduler"]
        trainer.scaler.load_state_dict(saved["scaler"])
        trainer.loaders.sampler.set_epoch(*saved["data_position"])
        trainer.state.step = saved["step"]
        trainer.optimizer.zero_grad(set_to_none=True)
    return LRCurve(lrs, losses, diverged)


def suggest_lr(curve: LRCurve, rule: str, skip_start: int, skip_end: int) -> tuple[float | None, str]:
    """The learning rate `rule` picks from the curve, or None with the reason.

    Slopes are taken against log(LR), and the first `skip_start` and last `skip_end` points are
    ignored, so the warm-up of the moving average or an early spike does not decide.
    """
    lrs, losses = np.asarray(curve.lrs), np.asarray(curve.losses)
    end = max(0, len(losses) - (skip_end if curve.diverged else 0))
    lrs, losses = lrs[skip_start:end], losses[skip_start:end]
    if len(losses) < 5:
        return None, (
            f"only {len(curve.losses)} steps before the loss diverged; lower tune.lr_range_test.min_lr "
            "or raise num_steps"
        )
    if losses.min() >= losses[0] * 0.99:
        return None, f"the smoothed loss did not decrease between LR {lrs[0]:.2g} and {lrs[-1]:.2g}"
    if rule == "steepest":
        slopes = np.gradient(losses, np.log(lrs))
        i = int(np.argmin(slopes))
        return float(lrs[i]), f"steepest descent of the loss (slope {slopes[i]:.3g} per e-fold of LR)"
    if rule == "min_div_10":
        i = int(np.argmin(losses))
        return float(lrs[i] / 10), f"a tenth of the LR of the lowest loss ({lrs[i]:.3g})"
    start, end = _longest_descent(losses)
    sections = (end - start) / 3
    i = start + int(sections) + int(sections / 2)  # fastai's `valley`: the middle of the longest descent
    return float(lrs[i]), f"inside the longest descent of the loss (LR {lrs[start]:.2g} to {lrs[end]:.2g})"


def _longest_descent(losses: np.ndarray) -> tuple[int, int]:
    """Start and end of the longest strictly decreasing subsequence (fastai's `valley`), O(n²)."""
    n = len(losses)
    length, previous = [1] * n, list(range(n))
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and length[j] + 1 > length[i]:
                length[i], previous[i] = length[j] + 1, j
    end = int(np.argmax(length))
    start = end
    while previous[start] != start:
        start = previous[start]
    return start, end


def _endless_steps(trainer: Trainer) -> Iterator[list[Batch]]:
    """The micro-batches of each optimizer step over the training data, epoch after epoch."""
    epoch = 0
    while True:
        trainer.loaders.sampler.set_epoch(epoch)
        yield from optimizer_steps(trainer.loaders.train, trainer.cfg.grad_accum_steps)
        epoch += 1
