"""What the Trainer does when a step fails in a way it can survive: a non-finite gradient (skip the step,
stop after too many in a row), a CUDA out-of-memory error (split the micro-batch, keep the effective
batch) and a torch.compile'd model that cannot compile (train eagerly)."""

from __future__ import annotations

import gc
import logging
from typing import TYPE_CHECKING

import torch

from trainflow.core.data.loaders import Batch, rebatched
from trainflow.core.errors import TrainingError
from trainflow.core.training.state import StepOutput
from trainflow.core.training.steps import split_factor

if TYPE_CHECKING:
    from trainflow.core.training.trainer import Trainer

log = logging.getLogger(__name__)


def split_micro_batch(trainer: Trainer, exc: BaseException) -> None:
    """Micro-batch / k and accumulation x k for the smallest k dividing it; the data position is counted in
    the new micro-batches, so the interrupted step re-runs on the same samples: the same update.

    Raises:
        TrainingError: a micro-batch of 1 cannot be split, or ranks are training (they cannot agree on a
            split inside a step: lower train.batch_size, or use batch_size: auto).
    """
    s = trainer.state
    factor = split_factor(s.micro_batch)
    if trainer.rank.distributed or factor is None:
        why = "a micro-batch of 1 cannot be split" if factor is None else "ranks cannot split in step"
        raise TrainingError(
            f"train: CUDA out of memory at micro-batch {s.micro_batch} ({why}); set a smaller train.batch_size, "
            "or train.batch_size: auto"
        ) from exc
    trainer.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if trainer.device.type == "cuda":
        torch.cuda.empty_cache()
    s.micro_batch, s.grad_accum = s.micro_batch // factor, s.grad_accum * factor
    s.batch_in_epoch *= factor
    trainer.loaders.train = rebatched(trainer.loaders.train, s.micro_batch)
    trainer.loaders.val = rebatched(trainer.loaders.val, s.micro_batch)  # evaluation at the size that fits
    log.warning("step %d: CUDA out of memory; micro-batch now %d x %d accumulation (effective batch %d kept)",
                s.step + 1, s.micro_batch, s.grad_accum, trainer.effective_batch_size)  # fmt: skip


def first_compiled_step(trainer: Trainer, window: list[Batch]) -> StepOutput:
    """The first step of a torch.compile'd model, where compiling happens; if it fails, a warning, the
    uncompiled model and the step again (an error of the model itself then surfaces from eager mode)."""
    try:
        return trainer.train_step(window)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:
        log.warning("train.compile: compiling failed (%s: %s); training in eager mode",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")  # fmt: skip
        trainer.model = trainer.model._orig_mod  # type: ignore[assignment]
        trainer.optimizer.zero_grad(set_to_none=True)
        return trainer.train_step(window)


def count_nonfinite(trainer: Trainer, finite: bool) -> None:
    """Count a step skipped for a non-finite gradient norm (reset on a finite one).

    Raises:
        TrainingError: `train.max_nonfinite_steps` skipped in a row.
    """
    s = trainer.state
    if finite:
        s.nonfinite_in_row = 0
        return
    s.nonfinite_in_row += 1
    s.nonfinite_total += 1
    log.warning("non-finite gradient norm, step skipped (%d in a row, up to step %d)", s.nonfinite_in_row, s.step)
    if s.nonfinite_in_row >= trainer.cfg.max_nonfinite_steps:
        raise TrainingError(
            f"train: {s.nonfinite_in_row} optimizer steps in a row had non-finite gradients (last at step "
            f"{s.step}, lr {trainer.scheduler.get_last_lr()[0]:.3g}); lower optim.lr, set train.grad_clip_norm "
            f"or use fp32 (limit: train.max_nonfinite_steps={trainer.cfg.max_nonfinite_steps})"
        )
