"""Knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"):
a smaller student learns from a trained teacher's softened outputs as well as from the labels.

Recipe (what the compress stage does; no `distill()` function is needed):

    student_cfg = student_config(spec.model, width=0.5)          # or a student section set by the user
    assert count_parameters(student_cfg, data_spec) <= count_parameters(spec.model, data_spec)
    teacher = trained_model(spec, store, trained.checkpoint_uri)  # core.training.checkpoint
    record = fit_in_folder(                                       # core.training.fit; the student built from
        spec.with_model(student_cfg), store, "<run>/compress/distilled",   # student_cfg, trained as the teacher
        loss=DistillationLoss(teacher, alpha=0.5, temperature=4.0))
    record.checkpoint_uri, record.best_metrics                    # val/* on the task loss

The trainer's validation keeps the task loss, so the student's val/loss compares with the teacher's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from trainflow.core.config import CNNConfig, FactoryModelConfig, GPTConfig, MLPConfig, ModelConfig
from trainflow.core.errors import ConfigError
from trainflow.core.models import build_model
from trainflow.core.training.metrics import loss_fn

if TYPE_CHECKING:
    from trainflow.core.data.spec import DataSpec


class DistillationLoss:
    """A Trainer `loss` hook: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy.

    The KL term compares the temperature-softened distributions softmax(logits / T); the T^2 factor
    keeps its gradients on the scale of the hard-label term as T changes (Hinton et al. 2015, sec. 2).
    Language models ((B, T, V) logits) are distilled per token: the KL is averaged over all B*T tokens.
    The teacher runs in eval mode under `torch.no_grad()` and is never updated; it moves to the batch's
    device on first use.
    """

    def __init__(self, teacher: nn.Module, alpha: float = 0.5, temperature: float = 4.0):
        problems = []
        if not 0.0 <= alpha <= 1.0:
            problems.append(f"distillation: alpha={alpha} must be in [0, 1] (the weight of the teacher's term)")
        if not (math.isfinite(temperature) and temperature > 0):
            problems.append(f"distillation: temperature={temperature} must be > 0 (typically 2 to 4)")
        if problems:
            raise ConfigError(problems)
        self.teacher, self.alpha, self.temperature = teacher.eval(), alpha, temperature
        self._device: torch.device | None = None

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        student = model(x)  # (B, C) or (B, T, V)
        if self.alpha == 0.0:  # no teacher forward when its term has no weight
            return loss_fn(student, y)
        with torch.no_grad():
            teacher = self._teacher_on(x.device)(x)
        soft = self.temperature**2 * distillation_kl(student, teacher, self.temperature)
        if self.alpha == 1.0:
            return soft
        return self.alpha * soft + (1.0 - self.alpha) * loss_fn(student, y)

    def _teacher_on(self, device: torch.device) -> nn.Module:
        if device != self._device:
            self.teacher.to(device).eval()
            self._device = device
        return self.teacher


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) averaged over targets (rows of the flattened logits)."""
    s = F.log_softmax(student.flatten(0, -2).float() / temperature, dim=-1)  # (N, C), N = B or B*T
    t = F.log_softmax(teacher.flatten(0, -2).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def student_config(teacher: ModelConfig, width: float) -> ModelConfig:
    """The teacher's zoo family and depth at `width` times every width (at least one unit each).

    MLP: each hidden size; CNN: each stage's channels; GPT: n_embd, rounded to a multiple of n_head
    (n_head kept, so it still divides n_embd; at least 8 as GPTConfig requires).

    Raises:
        ConfigError: width is not positive, or the teacher is a factory model (no automatic student).
    """
    if not (math.isfinite(width) and width > 0):
        raise ConfigError(f"distillation: width={width} must be > 0 (the student's share of each teacher width)")
    if isinstance(teacher, FactoryModelConfig):
        raise ConfigError(
            f"distillation: the teacher is a factory model ('{teacher.factory}'), which has no automatic student; "
            "set the student model section explicitly"
        )
    if isinstance(teacher, MLPConfig):
        update: dict[str, object] = {"hidden_sizes": [_scaled(h, width) for h in teacher.hidden_sizes]}
    elif isinstance(teacher, CNNConfig):
        update = {"channels": [_scaled(c, width) for c in teacher.channels]}
    elif isinstance(teacher, GPTConfig):
        per_head = max(_scaled(teacher.n_embd // teacher.n_head, width), math.ceil(8 / teacher.n_head))
        update = {"n_embd": per_head * teacher.n_head}
    else:
        raise TypeError(f"unknown model config {type(teacher).__name__}")
    fresh = {"init_from": None, "reinit": [], "lora": None}  # a smaller network starts from its own init, in full
    return type(teacher).model_validate(teacher.model_dump() | update | fresh)


def count_parameters(cfg: ModelConfig, spec: DataSpec) -> int:
    """Parameters of the model `cfg` builds for `spec` (tied weights once); built on the meta device, no memory."""
    with torch.device("meta"):
        model = build_model(cfg, spec)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def _scaled(size: int, width: float) -> int:
    return max(1, round(size * width))
