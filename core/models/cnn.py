"""A small ResNet-style CNN (He et al. 2016, basic blocks) for small images such as 8x8 digits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainflow.core.config import CNNConfig


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a (projected) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCNN(nn.Module):
    def __init__(self, cfg: CNNConfig, in_channels: int, n_classes: int):
        super().__init__()
        first = cfg.channels[0]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, first, 3, padding=1, bias=False), nn.BatchNorm2d(first), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        c_in = first
        for stage, c_out in enumerate(cfg.channels):
            for block in range(cfg.blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(BasicBlock(c_in, c_out, stride))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(cfg.dropout), nn.Linear(c_in, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))  # (B, C, H, W) -> (B, n_classes)

    def lr_blocks(self) -> list[list[nn.Module]]:
        """Blocks from input to head for `train.finetune.layer_lr_decay`: the stem, each residual block, the head."""
        return [[self.stem], *([block] for block in self.blocks), [self.head]]
