"""Mixed precision: an autocast context (a no-op for fp32) and a gradient scaler (enabled for fp16 only)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from trainflow.core.errors import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(device: torch.device, precision: str) -> AbstractContextManager[object]:
    """Re-enterable context for forward passes: autocast to bf16/fp16, or nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not (the scaler stays a no-op)."""
    check_precision(device, precision)
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def check_precision(device: torch.device, precision: str) -> None:
    """fp16 autocast with a gradient scaler is CUDA-only here; a ConfigError naming the field otherwise."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.precision: 'fp16' needs a CUDA device, this run uses {device.type}; use bf16")


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; an unavailable explicit device is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: '{name}' but CUDA is not available on this machine; use auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device: '{name}' but MPS is not available on this machine; use auto or cpu")
    return device
