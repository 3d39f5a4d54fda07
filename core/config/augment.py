"""Config of augmentation on the training device (`train.augment`): a list of ops with their strengths, applied
to each training batch after it reaches the device, each sample with its own random draw.

Under `train`, not `data`: the prepare_data stage's cache key is the whole data section, and changing an
augmentation must not prepare the data again."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from trainflow.core.config.base import Section

IMAGE_OPS = ("random_resized_crop", "hflip", "rotate", "color_jitter", "cutout")
BATCH_OPS = ("mixup", "cutmix")
TABLE_OPS = ("gaussian_noise", "swap_noise")


class RandomResizedCrop(Section):
    op: Literal["random_resized_crop"]
    scale: tuple[float, float] = Field(
        (0.6, 1.0),
        description="Range of the crop's area as a share of the image (Inception-style); at strength s the lower end is 1 - s (1 - low).",
    )
    ratio: tuple[float, float] = Field((0.75, 4 / 3), description="Range of the crop's aspect ratio (log-uniform).")
    p: float = Field(1.0, ge=0, le=1, description="Share of samples cropped; the others keep the whole image.")

    @model_validator(mode="after")
    def _ordered(self) -> RandomResizedCrop:
        if not (0 < self.scale[0] <= self.scale[1] <= 1) or not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError("scale must satisfy 0 < low <= high <= 1 and ratio 0 < low <= high")
        return self


class HFlip(Section):
    op: Literal["hflip"]
    p: float = Field(0.5, ge=0, le=1, description="Share of samples mirrored left to right.")


class Rotate(Section):
    op: Literal["rotate"]
    degrees: float = Field(15.0, gt=0, le=180, description="Rotation drawn uniformly from [-degrees, degrees].")
    p: float = Field(1.0, ge=0, le=1, description="Share of samples rotated.")


class ColorJitter(Section):
    op: Literal["color_jitter"]
    brightness: float = Field(0.2, ge=0, le=1, description="Brightness factor drawn from [1 - b, 1 + b].")
    contrast: float = Field(0.2, ge=0, le=1, description="Contrast factor drawn from [1 - c, 1 + c].")
    saturation: float = Field(0.2, ge=0, le=1, description="Saturation factor drawn from [1 - s, 1 + s] (RGB only).")
    p: float = Field(1.0, ge=0, le=1, description="Share of samples jittered.")


class Cutout(Section):
    op: Literal["cutout"]
    size: float = Field(0.25, gt=0, le=1, description="Side of the erased square as a share of the image side.")
    p: float = Field(0.5, ge=0, le=1, description="Share of samples with a square erased (set to the mean).")


class Mixup(Section):
    op: Literal["mixup"]
    alpha: float = Field(
        0.2, gt=0, description="Beta(alpha, alpha) draws each sample's mixing weight (Zhang et al. 2018)."
    )
    p: float = Field(1.0, ge=0, le=1, description="Share of batches mixed; the loss takes the soft targets.")


class CutMix(Section):
    op: Literal["cutmix"]
    alpha: float = Field(1.0, gt=0, description="Beta(alpha, alpha) draws each sample's kept area (Yun et al. 2019).")
    p: float = Field(1.0, ge=0, le=1, description="Share of batches cut and mixed; targets weighted by area.")


class GaussianNoise(Section):
    op: Literal["gaussian_noise"]
    std: float = Field(0.1, gt=0, description="Noise added to the scaled numeric columns (they have unit variance).")
    p: float = Field(1.0, ge=0, le=1, description="Share of samples noised.")


class SwapNoise(Section):
    op: Literal["swap_noise"]
    p: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Share of each sample's columns replaced by the same column of another sample in the batch (Porto Seguro's winning DAE).",
    )


def _op_name(value: Any) -> str:
    return str(value.get("op", "")) if isinstance(value, dict) else getattr(value, "op", "")


AugmentOp = Annotated[
    Annotated[RandomResizedCrop, Tag("random_resized_crop")]
    | Annotated[HFlip, Tag("hflip")]
    | Annotated[Rotate, Tag("rotate")]
    | Annotated[ColorJitter, Tag("color_jitter")]
    | Annotated[Cutout, Tag("cutout")]
    | Annotated[Mixup, Tag("mixup")]
    | Annotated[CutMix, Tag("cutmix")]
    | Annotated[GaussianNoise, Tag("gaussian_noise")]
    | Annotated[SwapNoise, Tag("swap_noise")],
    Discriminator(_op_name),
]


class AugmentConfig(Section):
    ops: list[AugmentOp] = Field(
        [],
        description="Ops applied in order to each training batch on the training device, each sample drawn on its own: images random_resized_crop, hflip, rotate, color_jitter, cutout; batch-level mixup and cutmix (soft targets); tables gaussian_noise and swap_noise. Empty = no augmentation. Off for validation, test and compression's calibration.",
    )
    strength: float = Field(
        1.0,
        ge=0,
        le=2,
        description="One factor on every op's magnitude (rotate degrees, crop area range, jitter amounts, cutout size, noise std, swap share, mixup/cutmix alpha); 0 = off. The knob the search tunes: tune.hpo.space.train.augment.strength.",
    )
    in_lr_range_test: bool = Field(
        False,
        description="Augment the LR range test's sweep too (off by default: it measures the loss curve of the plain data).",
    )

    @property
    def active(self) -> bool:
        return bool(self.ops) and self.strength > 0

    @model_validator(mode="after")
    def _one_each(self) -> AugmentConfig:
        names = [op.op for op in self.ops]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"op {repeated[0]} is listed twice")
        kinds = {("table" if n in TABLE_OPS else "image") for n in names if n not in BATCH_OPS}
        if len(kinds) > 1:
            raise ValueError("image ops and table ops cannot be mixed in one list")
        return self
