"""One image, encoded or as pixels, brought to the model's square: the one rule training and serving share.

Policy: decoded with Pillow, converted to RGB or L (gray), the shorter side resized to `size` (bilinear; Pillow
antialiases when it shrinks), then the centre `size` x `size` cropped. Nothing is stretched, and an image already
at `size` x `size` passes unchanged.

Standalone on purpose (numpy and Pillow only): prepare_data decodes image folders with it, and a served model
(`trainflow_serving`, shipped beside this file) resizes its inputs with it, without trainflow installed.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def square_image(image: Any, size: int, color: str) -> np.ndarray:
    """(C, size, size) uint8 of an image: encoded bytes, a Pillow image, or pixels (H, W), (H, W, C) (uint8
    0-255, or floats in 0-1). `color`: "rgb" or "gray".

    Raises:
        ValueError: bytes that are not an image Pillow reads whole (truncated, another format), or an array
            that is not an image.
    """
    from PIL import Image

    picture = _as_pillow(image)
    picture = picture.convert("RGB" if color == "rgb" else "L")
    width, height = picture.size
    scale = size / min(width, height)
    resized = (max(size, round(width * scale)), max(size, round(height * scale)))
    if resized != picture.size:
        picture = picture.resize(resized, Image.Resampling.BILINEAR)
    left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
    picture = picture.crop((left, top, left + size, top + size))
    pixels = np.asarray(picture, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1).copy()


def _as_pillow(image: Any) -> Any:
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, bytes | bytearray | memoryview):
        try:
            picture = Image.open(io.BytesIO(bytes(image)))
            picture.load()  # decodes now: a truncated file fails here, not later
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"not a readable image ({type(exc).__name__}: {exc})") from None
        return picture
    pixels = np.asarray(image)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] not in (3, 4)) or pixels.size == 0:
        raise ValueError(f"an image is (H, W) or (H, W, 3 or 4) pixels, got shape {pixels.shape}")
    if pixels.dtype != np.uint8:
        pixels = np.clip(np.asarray(pixels, dtype=np.float64) * (255 if pixels.max() <= 1 else 1), 0, 255)
        pixels = np.rint(pixels).astype(np.uint8)
    return Image.fromarray(pixels)


def normalized(pixels: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 (N, C, H, W) -> float32 (p / 255 - mean) / std per channel: the model's input."""
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return (pixels.astype(np.float32) / 255.0 - m) / s
