"""Batch ops: mixup (Zhang et al. 2018) and cutmix (Yun et al. 2019), each sample mixed with its partner in a
random permutation of the batch by its own Beta draw; the targets become soft (B, C), mixed by the share of the
input that came from the partner."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from trainflow.core.config.augment import CutMix, Mixup
from trainflow.core.training.augment.image import random_box


class Mix:
    """mixup, cutmix, or both (then each sample takes one of the two, half and half, as timm's Mixup does per
    batch). Images are cut by a box; table rows by a random set of columns of the same share."""

    def __init__(self, mixup: Mixup | None, cutmix: CutMix | None, strength: float, n_classes: int) -> None:
        self.mixup = None if mixup is None else (strength * mixup.alpha, mixup.p)
        self.cutmix = None if cutmix is None else (strength * cutmix.alpha, cutmix.p)
        self.n_classes = n_classes

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        b, device = x.shape[0], x.device
        partner = torch.randperm(b, device=device)
        if self.mixup is not None and self.cutmix is not None:
            cut = torch.rand(b, device=device) < 0.5
        else:
            cut = torch.full((b,), self.cutmix is not None, device=device)
        wide = (b,) + (1,) * (x.dim() - 1)
        from_partner = torch.zeros(wide, device=device)  # share of each input value taken from the partner
        if self.mixup is not None:
            alpha, p = self.mixup
            lam = _beta(alpha, b, device)  # share kept from the sample itself
            mixed = (torch.rand(b, device=device) < p) & ~cut
            from_partner = torch.where(mixed.view(wide), (1 - lam).view(wide), from_partner)
        if self.cutmix is not None:
            alpha, p = self.cutmix
            lam = _beta(alpha, b, device)
            boxed = ((torch.rand(b, device=device) < p) & cut).view(wide)
            from_partner = torch.where(boxed, _cut(x, 1 - lam).to(x.dtype), from_partner)
        x = torch.lerp(x, x[partner], from_partner.to(x.dtype))
        share = from_partner.expand_as(x).flatten(1).mean(dim=1, keepdim=True)  # cutmix: the box's actual area
        soft = y.float() if y.is_floating_point() else F.one_hot(y, self.n_classes).float()
        return x, torch.lerp(soft, soft[partner], share)


def _beta(alpha: float, b: int, device: torch.device) -> Tensor:
    """(B,) shares each sample keeps of itself: lambda ~ Beta(alpha, alpha) from the global generator of `device`
    (torch's gamma sampler draws there), folded to max(lambda, 1 - lambda) as fastai's MixUp does: the partner is a
    random permutation, so this only says which of the two is the sample, and a small alpha (strength near 0)
    leaves each sample nearly as it is instead of swapping half of them for their partners."""
    # Beta as G1 / (G1 + G2) of two Gamma(alpha) draws, in log space: Gamma(alpha) = Gamma(alpha + 1) * U ** (1 / alpha)
    # (Marsaglia & Tsang 2000); float32 gamma draws underflow to 0 for alpha below ~0.01, which torch's Beta
    # then answers with 0.5
    boosted = torch.distributions.Gamma(torch.tensor(alpha + 1.0, device=device), torch.tensor(1.0, device=device))
    log_gamma = boosted.sample((2, b)).log() + torch.log(1 - torch.rand(2, b, device=device)) / alpha
    lam = torch.sigmoid(log_gamma[0] - log_gamma[1])
    return torch.maximum(lam, 1 - lam)


def _cut(x: Tensor, share: Tensor) -> Tensor:
    """Per sample, 1 where the partner's values go in: images a box of `share` of the area (sides sqrt(share) of
    the image's, clipped at the border: its actual area counts), rows each column with probability `share`."""
    b = x.shape[0]
    if x.dim() == 4:
        side = torch.sqrt(share)
        return random_box(b, x.shape[2], x.shape[3], side, side, x.device).float()
    return (torch.rand(x.shape, device=x.device) < share.view((b,) + (1,) * (x.dim() - 1))).float()
