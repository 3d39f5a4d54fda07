"""A multi-layer perceptron for tabular features."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from trainflow.core.config import MLPConfig

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig, in_features: int, n_classes: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        self.hidden_at: list[tuple[int, int]] = []  # (first, last + 1) index in `net` of each hidden layer
        width = in_features
        for hidden in cfg.hidden_sizes:
            first = len(layers)
            layers.append(nn.Linear(width, hidden))
            if cfg.norm == "layernorm":
                layers.append(nn.LayerNorm(hidden))
            elif cfg.norm == "batchnorm":
                layers.append(nn.BatchNorm1d(hidden))
            layers += [_ACTIVATIONS[cfg.activation](), nn.Dropout(cfg.dropout)]
            self.hidden_at.append((first, len(layers)))
            width = hidden
        named = [(str(i), layer) for i, layer in enumerate(layers)]
        # the output layer is `net.head`: `model.reinit: [head]` reaches it when the number of classes changes
        self.net = nn.Sequential(OrderedDict([*named, ("head", nn.Linear(width, n_classes))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, n_classes) logits

    def lr_blocks(self) -> list[list[nn.Module]]:
        """Blocks from input to head for `train.finetune.layer_lr_decay`: each hidden layer, then the head."""
        return [[self.net[i] for i in range(a, b)] for a, b in self.hidden_at] + [[self.net.head]]
