"""Image and text folders written by the tests: digits as PNG files in class sub-folders, stdlib sources as text."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def digit_picture(pixels: np.ndarray, size: int, rgb: bool = False) -> Image.Image:
    """An 8x8 digit (0-16) as a `size` square picture, gray or tinted RGB."""
    gray = Image.fromarray((pixels * 15.9).clip(0, 255).astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)
    return Image.merge("RGB", (gray, gray.point(lambda v: v // 2), gray)) if rgb else gray


def write_digits(root: Path, per_class: int = 12, size: int = 16, rgb: bool = False, classes: int = 3) -> Path:
    """`per_class` digits of each of the first `classes` classes as PNG files in `root/<class>/<i>.png`."""
    digits = load_digits()
    for label in range(classes):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        for k, i in enumerate(np.flatnonzero(digits.target == label)[:per_class]):
            digit_picture(digits.images[i], size, rgb).save(folder / f"{k:03d}.png")
    return root


def png_bytes(picture: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt)
    return buffer.getvalue()


def write_texts(root: Path, n: int = 6) -> list[str]:
    """`n` text files of the stdlib's pydoc topics (about 20 KB each; the last one in a sub-folder), sorted."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    names = []
    for k in range(n):
        rel = f"part/m{k}.txt" if k == n - 1 else f"m{k}.txt"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        text = "\n".join(topics[key] for key in keys[k * 6 : k * 6 + 6])
        (root / rel).write_text(text, encoding="utf-8")
        names.append(rel)
    return sorted(names)
