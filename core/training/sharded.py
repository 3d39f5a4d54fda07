"""FSDP2 state: sharded checkpoints through torch.distributed.checkpoint (each rank writes and reads its
own shards of the weights and optimizer state, into one folder every rank reaches), and the plain full
state dict the stage hands on and publishes, gathered one parameter at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

SHARDS_SUFFIX = ".shards"  # step-000000042.pt holds the loop's state; step-000000042.shards/ the weights


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(module: nn.Module, keep: bool) -> dict[str, torch.Tensor] | None:
    """The unsharded weights on CPU where `keep` (the main rank), else None. Collective under FSDP: every
    rank calls it; each holds one whole parameter at a time, never the whole model."""
    out: dict[str, torch.Tensor] = {}
    for name, value in module.state_dict().items():
        whole = value.full_tensor() if hasattr(value, "full_tensor") else value
        if keep:
            out[name] = whole.detach().to("cpu", copy=True)
    return out if keep else None


def save_shards(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every rank writes its shards of weights and optimizer state into `folder` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer)
    dcp.save({"model": weights, "optimizer": optim}, checkpoint_id=str(folder))


def load_shards(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every rank reads its shards back (collective); the world size may not change between save and load."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    weights, optim = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": weights, "optimizer": optim}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
