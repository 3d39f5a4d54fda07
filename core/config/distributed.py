"""The `train.distributed` section: how many processes train, on how many machines, and how they meet.

One process (the default) trains in the stage's own process. More start through torch's elastic
launcher (the machinery behind `torchrun`): `nproc_per_node` workers per machine, `nnodes` machines
meeting at `rdzv_endpoint` through c10d rendezvous. Node 0 runs the pipeline (`trainflow run`);
every other node joins its train stage with `trainflow train CONFIG --node-rank N`.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from trainflow.core.config.base import Section


class DistributedConfig(Section):
    nproc_per_node: int = Field(
        1,
        ge=1,
        description="Training processes on each machine: one per GPU on CUDA (at most the GPUs present), or CPU processes with gloo. 1 with nnodes 1 = no launcher, train in the stage's process.",
    )
    nnodes: int = Field(1, ge=1, description="Machines taking part; each runs nproc_per_node processes.")
    node_rank: int = Field(
        0,
        ge=0,
        description="This machine's index among nnodes: 0 runs the pipeline and hosts the rendezvous; others join with `trainflow train CONFIG --node-rank N`.",
    )
    rdzv_endpoint: str = Field(
        "localhost:29400",
        description="host:port where the machines meet (c10d rendezvous, hosted by node 0's launcher); every node must reach it. Port 0 (single machine only) = any free port.",
    )
    rdzv_timeout_s: int = Field(
        300, ge=1, description="Seconds the launcher waits for all nnodes to join before failing the stage."
    )
    collective_timeout_s: int = Field(
        600,
        ge=10,
        description="Seconds a collective (gradient all-reduce, broadcast) may wait for a peer before the rank fails: bounds the hang when a machine dies; a dead process on this machine is noticed at once.",
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="Process-group backend: auto = nccl on CUDA, gloo on CPU."
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every process holds the whole model, gradients are all-reduced. fsdp: parameters, gradients and optimizer state are sharded across processes (FSDP2 `fully_shard`), for models that do not fit one device; checkpoints are sharded, the published weights a full state dict.",
    )
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none",
        description="Scale optim.lr by world_size / tuned_world_size (linear, Goyal et al. 2017) or its square root (sqrt, for Adam-type optimizers) when training on more processes than the LR was tuned on; none = use optim.lr as is.",
    )
    tuned_world_size: int = Field(
        1, ge=1, description="Processes the LR was tuned with (the LR range test and HPO run in one process: 1)."
    )

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def enabled(self) -> bool:
        """Whether ranks are launched (more than one process in all)."""
        return self.world_size > 1

    @field_validator("rdzv_endpoint")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if (
            not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):\d{1,5}", value)
            or int(value.rsplit(":", 1)[1]) > 65535
        ):
            raise ValueError(f"'{value}' is not host:port")
        return value

    @model_validator(mode="after")
    def _node_rank_in_range(self) -> DistributedConfig:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes {self.nnodes}")
        if self.nnodes > 1 and self.rdzv_endpoint.endswith(":0"):
            raise ValueError(f"rdzv_endpoint '{self.rdzv_endpoint}': port 0 only works on one machine; name a port")
        return self

    def on_this_machine(self) -> DistributedConfig:
        """The same processes on this machine alone (the compress stage's fine-tunes and students: other
        machines join the train stage only)."""
        if self.nnodes == 1:
            return self
        return self.model_copy(update={"nnodes": 1, "node_rank": 0, "rdzv_endpoint": "localhost:0"})

    def lr_scale(self) -> float:
        """The factor optim.lr is multiplied by for this world size."""
        ratio = self.world_size / self.tuned_world_size
        return {"none": 1.0, "linear": ratio, "sqrt": ratio**0.5}[self.lr_scaling]
