"""Loss and evaluation passes shared by the Trainer, the evaluate stage and the tuners."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from trainflow.core.data.loaders import Batch
from trainflow.core.data.spec import EVAL_METRICS, Task


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every target: (B, C) vs (B,) for classification, (B, T, V) vs (B, T) for LM; (B, C)
    vs soft targets (B, C), class probabilities (mixup, cutmix)."""
    if target.is_floating_point():
        return F.cross_entropy(logits.float(), target.float())
    return F.cross_entropy(logits.flatten(0, -2).float(), target.flatten())


@dataclass(frozen=True)
class EvalPass:
    loss: float  # mean over every target
    n_targets: int
    correct: int
    predictions: np.ndarray | None = None  # argmax class per target, when collected
    targets: np.ndarray | None = None


@torch.no_grad()
def eval_pass(
    model: nn.Module,
    loader: DataLoader[Batch],
    device: torch.device,
    autocast: AbstractContextManager[object],
    collect: bool = False,
) -> EvalPass:
    """One pass in eval mode; the model is put back in the mode it was in."""
    was_training = model.training
    model.eval()
    loss_sums: list[torch.Tensor] = []  # per batch, on device: added up once at the end (float64), not per batch
    corrects: list[torch.Tensor] = []
    n, predictions, targets = 0, [], []
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast:
                logits = model(x)
            loss_sums.append(F.cross_entropy(logits.flatten(0, -2).float(), y.flatten(), reduction="sum"))
            predicted = logits.argmax(dim=-1)
            corrects.append((predicted == y).sum())
            n += y.numel()
            if collect:
                predictions.append(predicted.flatten().cpu())
                targets.append(y.flatten().cpu())
    finally:
        model.train(was_training)
    return EvalPass(
        loss=torch.stack(loss_sums).double().sum().item() / n if n else 0.0,
        n_targets=n,
        correct=int(torch.stack(corrects).sum().item()) if n else 0,
        predictions=torch.cat(predictions).numpy() if collect and predictions else None,
        targets=torch.cat(targets).numpy() if collect and targets else None,
    )


def pass_metrics(result: EvalPass, task: Task, prefix: str) -> dict[str, float]:
    """The task's `EVAL_METRICS` (core/data/spec.py) under `prefix`: loss, and accuracy or perplexity."""
    values = {
        "loss": result.loss,
        "accuracy": result.correct / max(result.n_targets, 1),
        "perplexity": perplexity(result.loss),
    }
    return {f"{prefix}/{name}": values[name] for name in EVAL_METRICS[task]}


def perplexity(loss: float) -> float:
    """exp(loss), capped at e^50: past that the figure only says the model diverged (and math.exp overflows)."""
    return math.exp(min(loss, 50.0))


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, loss: float) -> dict[str, float]:
    """The test metrics of a classifier: accuracy, macro precision/recall/F1 (a class never predicted counts 0),
    and the given loss. The evaluate stage and every compressed variant are judged by these."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision_macro": float(precision),
        "recall_macro": float(recall),
        "f1_macro": float(f1),
        "loss": loss,
    }
