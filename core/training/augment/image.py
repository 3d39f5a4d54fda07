"""Image ops on a batch (B, C, H, W), each sample with its own draw: random_resized_crop, hflip and rotate as
one affine warp (`Geometry`: one `affine_grid` + `grid_sample` for all three), `ColorJitter` in pixel space and
`Cutout`. Every draw comes from torch's global generator of the batch's device."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from trainflow.core.config.augment import ColorJitter as ColorJitterConfig
from trainflow.core.config.augment import Cutout as CutoutConfig
from trainflow.core.config.augment import HFlip, RandomResizedCrop, Rotate
from trainflow.core.data.spec import DataSpec

GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


class Geometry:
    """Crop (area and aspect drawn as Inception's RandomResizedCrop, resized back to H x W), mirror and rotation of
    each sample, composed into one 2x3 matrix per sample and sampled once (bilinear; a rotated corner outside the
    image takes the nearest edge pixel, not a constant patch: on digits' black background a fill of 0, the mean
    pixel, drew grey corners)."""

    def __init__(
        self, crop: RandomResizedCrop | None, flip: HFlip | None, rotate: Rotate | None, strength: float
    ) -> None:
        self.crop = crop is not None
        if crop is not None:  # strength s: area range 1 - s * (1 - end), aspect ratio range ratio ** s
            self.scale = tuple(max(1 - strength * (1 - end), 0.01) for end in crop.scale)
            self.log_ratio = tuple(strength * math.log(end) for end in crop.ratio)
            self.crop_p = crop.p
        self.flip_p = 0.0 if flip is None else flip.p * min(strength, 1.0)
        self.degrees = 0.0 if rotate is None else min(strength * rotate.degrees, 180.0)
        self.rotate_p = 0.0 if rotate is None else rotate.p

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        b, _, h, w = x.shape
        theta = self.matrices(b, h, w, x.device)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False), y

    def matrices(self, b: int, h: int, w: int, device: torch.device) -> Tensor:
        """(B, 2, 3): each output pixel's place in the input, in affine_grid's normalised coordinates: rotate,
        then mirror, then scale and shift into the crop."""
        one = torch.ones(b, device=device)
        zero = torch.zeros(b, device=device)
        fw, fh, cx, cy = self._crop(b, h, w, device) if self.crop else (one, one, zero, zero)
        mirror = torch.where(torch.rand(b, device=device) < self.flip_p, -one, one)
        angle = torch.deg2rad(self.degrees * (2 * torch.rand(b, device=device) - 1))
        angle = torch.where(torch.rand(b, device=device) < self.rotate_p, angle, zero)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # a rotation in pixels, in coordinates normalised per axis: diag(2/W, 2/H) R diag(W/2, H/2)
        rows = [
            torch.stack([fw * mirror * cos, -fw * mirror * sin * h / w, cx], dim=1),
            torch.stack([fh * sin * w / h, fh * cos, cy], dim=1),
        ]
        return torch.stack(rows, dim=1)

    def _crop(self, b: int, h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Crop width and height as shares of the image's, and the crop's centre in [-1, 1] (the whole image for
        samples not cropped)."""
        area = _uniform(b, *self.scale, device)
        ratio = torch.exp(_uniform(b, *self.log_ratio, device))  # width / height of the crop, in pixels
        keep = torch.rand(b, device=device) >= self.crop_p
        fw = torch.sqrt(area * ratio * h / w).clamp(max=1.0).masked_fill(keep, 1.0)
        fh = torch.sqrt(area / ratio * w / h).clamp(max=1.0).masked_fill(keep, 1.0)
        cx = (1 - fw) * (2 * torch.rand(b, device=device) - 1)
        cy = (1 - fh) * (2 * torch.rand(b, device=device) - 1)
        return fw, fh, cx, cy


class ColorJitter:
    """Brightness, contrast and saturation factors per sample, applied in that order in pixel space: the inputs
    un-normalised with the spec's pixel mean and std, clamped to [0, 1] after each, normalised again. Without a
    pixel normalisation (digits: scaled per pixel) the factors apply to the values as they are, unclamped."""

    def __init__(self, op: ColorJitterConfig, strength: float, spec: DataSpec) -> None:
        self.amounts = [min(strength * a, 1.0) for a in (op.brightness, op.contrast, op.saturation)]
        self.p = op.p
        self.mean = torch.tensor(spec.pixel_mean).view(1, -1, 1, 1) if spec.pixel_mean else None
        self.std = torch.tensor(spec.pixel_std).view(1, -1, 1, 1) if spec.pixel_std else None

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        b, c = x.shape[:2]
        jittered = (torch.rand(b, device=x.device) < self.p).view(b, 1, 1, 1)
        bright, contrast, saturation = (
            torch.where(jittered, 1 + a * (2 * torch.rand(b, 1, 1, 1, device=x.device) - 1), 1.0) for a in self.amounts
        )
        pixels = self._clamp(x * self.std.to(x.device) + self.mean.to(x.device)) if self.std is not None else x
        pixels = self._clamp(pixels * bright)
        mean = _gray(pixels).mean(dim=(1, 2, 3), keepdim=True)
        pixels = self._clamp(torch.lerp(mean, pixels, contrast))
        if c == 3:
            pixels = self._clamp(torch.lerp(_gray(pixels), pixels, saturation))
        if self.std is None:
            return pixels, y
        return (pixels - self.mean.to(x.device)) / self.std.to(x.device), y

    def _clamp(self, pixels: Tensor) -> Tensor:
        return pixels.clamp(0.0, 1.0) if self.std is not None else pixels


class Cutout:
    """Erases one square per sample (DeVries & Taylor 2017): its side a share of the image's (on a non-square image
    the same share of each side), its centre anywhere in the image (clipped at the border), filled with 0, the mean
    of normalised pixels."""

    def __init__(self, op: CutoutConfig, strength: float) -> None:
        self.size, self.p = min(strength * op.size, 1.0), op.p

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        b, _, h, w = x.shape
        erased = (torch.rand(b, device=x.device) < self.p).view(b, 1, 1, 1)
        side = torch.full((b,), self.size, device=x.device)
        mask = random_box(b, h, w, side, side, x.device) & erased
        return x.masked_fill(mask, 0.0), y


def random_box(b: int, h: int, w: int, share_h: Tensor, share_w: Tensor, device: torch.device) -> Tensor:
    """(B, 1, H, W) True inside each sample's box: sides share_h * H and share_w * W (rounded), centre uniform over
    the pixels, clipped at the border."""
    side_h, side_w = torch.round(share_h * h), torch.round(share_w * w)
    cy = torch.randint(0, h, (b,), device=device)
    cx = torch.randint(0, w, (b,), device=device)
    top, left = cy - torch.div(side_h, 2, rounding_mode="floor"), cx - torch.div(side_w, 2, rounding_mode="floor")
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    inside_rows = (rows >= top.view(b, 1, 1)) & (rows < (top + side_h).view(b, 1, 1))
    inside_cols = (cols >= left.view(b, 1, 1)) & (cols < (left + side_w).view(b, 1, 1))
    return (inside_rows & inside_cols).unsqueeze(1)


def _uniform(b: int, low: float, high: float, device: torch.device) -> Tensor:
    return low + (high - low) * torch.rand(b, device=device)


def _gray(pixels: Tensor) -> Tensor:
    """(B, 1, H, W) luma of RGB pixels; a one-channel image is its own."""
    if pixels.shape[1] != 3:
        return pixels.mean(dim=1, keepdim=True)
    weights = torch.tensor(GRAY, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels * weights).sum(dim=1, keepdim=True)
