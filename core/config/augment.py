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
        description="Range of the crop's area as a share of the image (Inception-style), resized back to the image's size; at strength s each end e becomes 1 - s * (1 - e), at least 0.01.",
    )
    ratio: tuple[float, float] = Field(
        (0.75, 4 / 3),
        description="Range of the crop's aspect ratio, width / height (log-uniform); at strength s each end r becomes r ** s. A crop wider or taller than the image is clipped to it.",
    )
    p: float = Field(1.0, ge=0, le=1, description="Share of samples cropped; the others keep the whole image.")

    @model_validator(mode="after")
    def _ordered(self) -> RandomResizedCrop:
        if not (0 < self.scale[0] <= self.scale[1] <= 1) or not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError("scale must satisfy 0 < low <= high <= 1 and ratio 0 < low <= high")
        return self


class HFlip(Section):
    op: Literal["hflip"]
    p: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of samples mirrored left to right; a flip has no magnitude, so strength s scales this share: p * min(s, 1).",
    )


class Rotate(Section):
    op: Literal["rotate"]
    degrees: float = Field(
        15.0,
        gt=0,
        le=180,
        description="Rotation drawn uniformly from [-d, d], d = min(s * degrees, 180) at strength s; corners from outside the image take the nearest edge pixel.",
    )
    p: float = Field(1.0, ge=0, le=1, description="Share of samples rotated.")


class ColorJitter(Section):
    op: Literal["color_jitter"]
    brightness: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Brightness factor drawn from [1 - b, 1 + b], b = min(s * brightness, 1) at strength s.",
    )
    contrast: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Contrast factor drawn from [1 - c, 1 + c], c = min(s * contrast, 1): the image blended with its mean grey.",
    )
    saturation: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Saturation factor drawn from [1 - a, 1 + a], a = min(s * saturation, 1): each pixel blended with its grey (RGB only). All three act on [0, 1] pixels (the inputs un-normalised with the data's pixel mean and std, clamped, normalised again), or on the values as they are when the data has no pixel normalisation (digits).",
    )
    p: float = Field(
        1.0, ge=0, le=1, description="Share of samples jittered (brightness, then contrast, then saturation)."
    )


class Cutout(Section):
    op: Literal["cutout"]
    size: float = Field(
        0.25,
        gt=0,
        le=1,
        description="Side of the erased square as a share of the image side, min(s * size, 1) at strength s; its centre anywhere in the image (clipped at the border).",
    )
    p: float = Field(
        0.5, ge=0, le=1, description="Share of samples with a square erased (set to 0, the mean of normalised pixels)."
    )


class Mixup(Section):
    op: Literal["mixup"]
    alpha: float = Field(
        0.2,
        gt=0,
        description="Each sample's weight on itself is drawn from Beta(a, a), a = s * alpha at strength s (Zhang et al. 2018), and folded to the larger of w and 1 - w: a larger a mixes more evenly, a small one barely.",
    )
    p: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of samples mixed, each with its partner in a random permutation of the batch; the targets become soft (one-hot mixed by the same weight). With cutmix also listed, each sample takes one of the two, half and half.",
    )


class CutMix(Section):
    op: Literal["cutmix"]
    alpha: float = Field(
        1.0,
        gt=0,
        description="Each sample's kept share is drawn from Beta(a, a), a = s * alpha at strength s (Yun et al. 2019), and folded to the larger of w and 1 - w; images: a box of the rest (at most half) is pasted from the partner; table rows: that share of columns.",
    )
    p: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of samples cut and mixed; targets weighted by the share actually pasted (a box clipped at the border counts its real area).",
    )


class GaussianNoise(Section):
    op: Literal["gaussian_noise"]
    std: float = Field(
        0.1,
        gt=0,
        description="Std of the noise added to the scaled numeric columns (unit variance), s * std at strength s; one-hot columns are left alone.",
    )
    p: float = Field(1.0, ge=0, le=1, description="Share of samples noised.")


class SwapNoise(Section):
    op: Literal["swap_noise"]
    p: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Chance that each value is replaced by the same column of another row of the batch (Porto Seguro's winning DAE); min(s * p, 1) at strength s.",
    )


def augment_problem(cfg: AugmentConfig, task: str, rank: int) -> str | None:
    """Why `cfg`'s ops do not fit data of `task` whose samples have `rank` dimensions (3: images), or None."""
    names = [op.op for op in cfg.ops]
    if not names:
        return None
    if task == "language_modeling":
        return "train.augment.ops: augmentation is for classification data, and this data is language modelling (text); remove the ops"
    image = [n for n in names if n in IMAGE_OPS]
    table = [n for n in names if n in TABLE_OPS]
    if image and rank != 3:
        return f"train.augment.ops: image ops ({', '.join(image)}) on table data (rows of features); use {', '.join(TABLE_OPS)}, mixup or cutmix"
    if table and rank == 3:
        return f"train.augment.ops: table ops ({', '.join(table)}) on image data; use {', '.join(IMAGE_OPS)}, mixup or cutmix"
    return None


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
        description="Ops applied to each training micro-batch on the training device, each sample with its own draw: images random_resized_crop, hflip, rotate, color_jitter, cutout; tables gaussian_noise, swap_noise; either: mixup, cutmix (soft targets). Run in that order whatever the list's (crop, flip and rotate as one warp). Empty = no augmentation. Off for validation, test, the LR range test (see in_lr_range_test), compression's fine-tuning of a pruned model and its calibration.",
    )
    strength: float = Field(
        1.0,
        ge=0,
        le=2,
        description="One factor s on every op's magnitude, each op's description says how (rotate degrees, crop area and ratio ranges, jitter amounts, cutout size, noise std, swap share, mixup/cutmix alpha, hflip's share up to s = 1); shares p stay. 0 = off. The knob the search tunes: tune.hpo.space.train.augment.strength.",
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
