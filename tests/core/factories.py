"""User model factories for the `model.factory` tests: `package.module:function` called as function(spec, **params)."""

from __future__ import annotations

import math
import os
import time

import torch
from torch import nn

from trainflow.core.data.spec import DataSpec


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


class _MemoryLimited(TinyNet):
    """A CPU stand-in for a GPU that runs out of memory: a forward over more than `max_batch` samples raises
    torch.cuda.OutOfMemoryError, as CUDA's allocator would."""

    def __init__(self, spec: DataSpec, hidden: int, max_batch: int):
        super().__init__(spec, hidden)
        self.max_batch = max_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_batch:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (stand-in: {x.shape[0]} > {self.max_batch} samples)")
        return super().forward(x)


def memory_limited_net(spec: DataSpec, max_batch: int, hidden: int = 16) -> nn.Module:
    return _MemoryLimited(spec, hidden, max_batch)


class _Paced(TinyNet):
    """TinyNet whose training forward takes at least `seconds`: a training that lasts a known wall time
    however busy the machine is (the cancellation test needs it still running when the cancel lands)."""

    def __init__(self, spec: DataSpec, hidden: int, seconds: float):
        super().__init__(spec, hidden)
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            time.sleep(self.seconds)
        return super().forward(x)


def paced_net(spec: DataSpec, hidden: int = 8, seconds: float = 0.02) -> nn.Module:
    return _Paced(spec, hidden, seconds)


class _Signalling(TinyNet):
    """TinyNet with dropout that sends `signum` to this process from inside its `at`-th training forward: a
    signal landing in the middle of a step, as a real one does."""

    def __init__(self, spec: DataSpec, at: int, signum: int):
        super().__init__(spec, 16)
        self.net.insert(3, nn.Dropout(0.2))
        self.at, self.signum, self.calls = at, signum, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)  # dropout has drawn from torch's RNG
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                os.kill(os.getpid(), self.signum)
        return out


def signalling_net(spec: DataSpec, at: int = 0, signum: int = 15) -> nn.Module:
    return _Signalling(spec, at, signum)
