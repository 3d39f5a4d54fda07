"""User model factories for the `model.factory` tests: `package.module:function` called as function(spec, **params)."""

from __future__ import annotations

import math

import torch
from torch import nn

from core.data.spec import DataSpec


class TinyNet(nn.Module):
    """Flatten, one hidden layer, logits; keeps the spec it was built for."""

    def __init__(self, spec: DataSpec, hidden: int):
        super().__init__()
        self.spec = spec
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(spec.input_shape), hidden), nn.ReLU(), nn.Linear(hidden, spec.n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def tiny_net(spec: DataSpec, hidden: int = 8) -> nn.Module:
    return TinyNet(spec, hidden)


def not_a_module(spec: DataSpec) -> dict[str, DataSpec]:
    return {"spec": spec}


class _Unexportable(nn.Module):
    """A forward with an op no ONNX exporter converts (an eigendecomposition)."""

    def __init__(self, spec: DataSpec):
        super().__init__()
        self.linear = nn.Linear(math.prod(spec.input_shape), spec.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x.flatten(1))
        gram = logits.T @ logits
        return logits + torch.linalg.eigh(gram).eigenvalues.sum() * 0.0


def unexportable_net(spec: DataSpec) -> nn.Module:
    return _Unexportable(spec)
