"""The model as the loop trains it: on its device, channels-last for a CNN on CUDA, wrapped for data
parallelism (DDP, or FSDP2's `fully_shard`), optionally compiled; plus the GPU switches (TF32)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from trainflow.core.config import TrainConfig
from trainflow.core.training.distributed import Rank

log = logging.getLogger(__name__)


def enable_fast_matmul(device: torch.device) -> None:
    """TF32 matmuls and convolutions on Ampere and later (about 8x fp32 throughput, 10-bit mantissa inputs)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def uses_channels_last(model: nn.Module, device: torch.device) -> bool:
    """A convolutional model on CUDA: NHWC lets cuDNN use tensor-core kernels without transposes."""
    return device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def wrap_model(module: nn.Module, cfg: TrainConfig, rank: Rank, device: torch.device) -> nn.Module:
    """The module (already on `device`) wrapped for `cfg.distributed.strategy` when ranks train, then
    `torch.compile`d when `cfg.compile` (the Trainer falls back to eager if the first step fails)."""
    model = module
    if rank.distributed and cfg.distributed.strategy == "fsdp":
        shard_fully(module)
    elif rank.distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    return model


def shard_fully(module: nn.Module) -> None:
    """FSDP2: each repeated block (a GPT block, a residual block, a layer of an MLP) is its own shard unit,
    then the root; parameters become DTensors sharded over the ranks."""
    from torch.distributed.fsdp import fully_shard

    for block in shard_units(module):
        fully_shard(block)
    fully_shard(module)


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The children of the model's ModuleLists/Sequentials that hold parameters: the usual FSDP wrap policy
    (one all-gather per block)."""
    units: list[nn.Module] = []
    for child in module.modules():
        if child is not module and isinstance(child, nn.ModuleList | nn.Sequential):
            units += [m for m in child if any(True for _ in m.parameters())]
    return [u for u in units if not any(u is not other and _contains(other, u) for other in units)]


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())
