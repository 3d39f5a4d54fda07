"""A multi-layer perceptron for tabular features."""

from __future__ import annotations

import torch
from torch import nn

from trainflow.core.config import MLPConfig

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig, in_features: int, n_classes: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for hidden in cfg.hidden_sizes:
            layers.append(nn.Linear(width, hidden))
            if cfg.norm == "layernorm":
                layers.append(nn.LayerNorm(hidden))
            elif cfg.norm == "batchnorm":
                layers.append(nn.BatchNorm1d(hidden))
            layers += [_ACTIVATIONS[cfg.activation](), nn.Dropout(cfg.dropout)]
            width = hidden
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, n_classes) logits
