"""Table ops on a batch of rows (B, F), each sample with its own draw: Gaussian noise on the scaled numeric
columns, and swap noise (each value replaced by the same column of another row, as in the winning denoising
autoencoder of Kaggle's Porto Seguro competition)."""

from __future__ import annotations

import torch
from torch import Tensor

from trainflow.core.config.augment import GaussianNoise as GaussianNoiseConfig
from trainflow.core.config.augment import SwapNoise as SwapNoiseConfig


class GaussianNoise:
    """Adds N(0, std^2) to the first `numeric` columns (standardised: unit variance) of a share p of the rows;
    the one-hot columns after them are left as they are."""

    def __init__(self, op: GaussianNoiseConfig, strength: float, numeric: int) -> None:
        self.std, self.p, self.numeric = strength * op.std, op.p, numeric

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        b, k = x.shape[0], self.numeric
        noised = (torch.rand(b, 1, device=x.device) < self.p).to(x.dtype)
        noise = self.std * torch.randn(b, k, device=x.device, dtype=x.dtype) * noised
        return torch.cat([x[:, :k] + noise, x[:, k:]], dim=1), y


class SwapNoise:
    """Replaces each value with probability p by the value of the same column in another row of the batch."""

    def __init__(self, op: SwapNoiseConfig, strength: float) -> None:
        self.p = min(strength * op.p, 1.0)

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        b = x.shape[0]
        if b < 2:  # no other row to take from
            return x, y
        swapped = torch.rand(x.shape, device=x.device) < self.p
        rows = torch.arange(b, device=x.device).view(b, 1)
        other = (rows + torch.randint(1, b, x.shape, device=x.device)) % b  # never the row itself
        return torch.where(swapped, x.gather(0, other), x), y
