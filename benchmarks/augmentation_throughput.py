"""Part 1 of `augmentation.py`: samples/s of a training epoch with the same image ops on the training device in
batches (`core.training.augment`) against per sample in DataLoader workers; same model, batch, data, threads."""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from trainflow.core.config.augment import AugmentConfig
from trainflow.core.config.model import CNNConfig
from trainflow.core.data.loaders import ArrayDataset
from trainflow.core.data.spec import DataSpec
from trainflow.core.models import build_model
from trainflow.core.training.augment import build_augment

OPS = [{"op": "random_resized_crop"}, {"op": "hflip"}, {"op": "rotate"}, {"op": "color_jitter"}, {"op": "cutout"}]
Augment = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class OneAtATime(Dataset[tuple[Tensor, Tensor]]):
    """Per sample, the same code: `__getitem__` runs the batched ops on a batch of one sample (on the CPU)."""

    def __init__(self, x: Tensor, y: Tensor, augment: Augment):
        self.x, self.y, self.augment = x, y, augment

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.augment(self.x[i : i + 1], self.y[i : i + 1])
        return x[0], y[0]


class PillowPerSample(Dataset[tuple[Tensor, Tensor]]):
    """Per sample, the classic way: torchvision v1's transforms on a Pillow image (the calls its PIL backend makes:
    RandomResizedCrop = one resize of the crop box, hflip, rotate, ImageEnhance brightness/contrast/colour), then
    to a normalised tensor and Cutout on it; the same ranges as `OPS`' defaults, Python's `random` per sample."""

    def __init__(self, pixels: np.ndarray, y: Tensor, mean: list[float], std: list[float]):
        from PIL import Image

        self.images = [Image.fromarray(p.transpose(1, 2, 0)) for p in pixels]  # uint8 (H, W, 3)
        self.y, self.fill = y, tuple(round(255 * m) for m in mean)
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        from PIL import Image, ImageEnhance

        image = self.images[i]
        w, h = image.size
        area, ratio = random.uniform(0.6, 1.0) * w * h, math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = min(w, round(math.sqrt(area * ratio))), min(h, round(math.sqrt(area / ratio)))
        left, top = random.randint(0, w - cw), random.randint(0, h - ch)
        image = image.resize((w, h), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch))
        if random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = image.rotate(random.uniform(-15, 15), Image.Resampling.BILINEAR, fillcolor=self.fill)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            image = enhance(image).enhance(random.uniform(0.8, 1.2))
        x = (torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1) - self.mean) / self.std
        if random.random() < 0.5:
            side, cy, cx = round(0.25 * h), random.randrange(h), random.randrange(w)
            x[:, max(0, cy - side // 2) : cy - side // 2 + side, max(0, cx - side // 2) : cx - side // 2 + side] = 0
        return x, self.y[i]


@dataclass
class Side:
    name: str
    loader: DataLoader[Any]
    augment: Augment | None  # on the training device, after the batch arrives
    train_rates: list[float]  # samples/s of each timed epoch with the model's step
    aug_rates: list[float]  # samples/s of each timed epoch of the data path alone (no model)


def throughput(x: Tensor, y: Tensor, spec: DataSpec, channels: list[int], batch: int, rounds: int,
               workers: tuple[int, ...] = (0, 2)) -> list[Side]:  # fmt: skip
    """Each side's samples/s over `rounds` timed epochs after one warm-up epoch, the sides rotated round by round
    (persistent workers: the timed epochs do not pay the workers' start)."""
    on_device = build_augment(AugmentConfig(ops=OPS), spec)
    mean, std = torch.tensor(spec.pixel_mean).view(1, -1, 1, 1), torch.tensor(spec.pixel_std).view(1, -1, 1, 1)
    pixels = np.uint8(np.round(255 * (x * std + mean).clamp(0, 1).numpy()))  # the uint8 images the Pillow side reads

    def loader(dataset: Dataset[Any], n_workers: int, collate: Any = None) -> DataLoader[Any]:
        return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=n_workers, drop_last=True,
                          persistent_workers=n_workers > 0, generator=torch.Generator().manual_seed(0),
                          collate_fn=collate)  # fmt: skip

    batches = loader(ArrayDataset(x.numpy(), y.numpy()), 0, lambda batch: batch)  # __getitems__: already a batch
    sides = [Side("on the training device, in batches", batches, on_device, [], [])]
    for n in workers:
        sides.append(Side(f"per sample, same ops (torch), {n} workers", loader(OneAtATime(x, y, on_device), n),
                          None, [], []))  # fmt: skip
        pillow = PillowPerSample(pixels, y, spec.pixel_mean, spec.pixel_std)
        sides.append(Side(f"per sample, Pillow (torchvision v1 way), {n} workers", loader(pillow, n), None, [], []))
    torch.manual_seed(0)
    initial = build_model(CNNConfig(channels=channels), spec)
    for r in range(rounds + 1):  # round 0: warm-up
        for side in sides[r % len(sides) :] + sides[: r % len(sides)]:
            model = _copy(initial)
            rate = _epoch(side, model, torch.optim.AdamW(model.parameters(), lr=1e-3))
            bare = _epoch(side, None, None)
            if r:
                side.train_rates.append(rate)
                side.aug_rates.append(bare)
    return sides


def median(values: list[float]) -> float:
    return statistics.median(values)


def _epoch(side: Side, model: nn.Module | None, optimizer: torch.optim.Optimizer | None) -> float:
    """samples/s of one pass over the loader: fetch, augment (on the device side), and the model's step."""
    n, started = 0, time.perf_counter()
    for x, y in side.loader:
        if side.augment is not None:
            x, y = side.augment(x, y)
        if model is not None and optimizer is not None:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        n += len(y)
    return n / (time.perf_counter() - started)


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).train()
