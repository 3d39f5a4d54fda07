"""The trainer's state types: its progress (saved in checkpoints), one step's output, why it stopped,
and what `fit` returns."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch


class StopReason(str, Enum):
    MAX_EPOCHS = "max_epochs"
    MAX_STEPS = "max_steps"
    EARLY_STOPPING = "early_stopping"
    PRUNED = "pruned"
    DIAGNOSIS = "diagnosis"  # the training doctor's finding (train.diagnostics.on_finding: stop); a re-run resumes


@dataclass
class TrainState:
    """Progress, saved in every checkpoint. (epoch, batch_in_epoch) is the next batch to train on."""

    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed (by each rank): the data position
    micro_batch: int = 0  # samples per micro-batch and rank now (0: train.batch_size); smaller after an OOM split
    grad_accum: int = 0  # micro-batches per optimizer step now (0: train.grad_accum_steps)
    step: int = 0  # optimizer steps taken, skipped non-finite steps included
    samples_seen: int = 0
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    last_eval_step: int = -1
    stop_reason: str | None = None
    stop_message: str = ""


@dataclass(frozen=True)
class StepOutput:
    loss: torch.Tensor  # mean loss over the step's targets (on device: reading it syncs)
    grad_norm: torch.Tensor  # global norm before clipping
    finite: bool | torch.Tensor  # a 0-dim bool tensor when the check is deferred to the logging interval


@dataclass(frozen=True)
class FitResult:
    stop_reason: StopReason
    stop_message: str
    epochs_run: int
    steps: int
    samples_per_s: float  # over this call's training steps, evaluation excluded
    nonfinite_steps: int
    last_metrics: dict[str, float]
