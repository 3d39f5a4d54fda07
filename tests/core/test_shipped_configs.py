"""Every config under configs/ validates, with each value it spells out reaching the pipeline as written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from trainflow.core.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _shipped_configs() -> list[Path]:
    return sorted(CONFIGS.glob("**/*.yaml"))


@pytest.mark.parametrize("path", _shipped_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_config_validates_with_every_value_as_written(path: Path) -> None:
    """Every value the file spells out is the value the pipeline gets (none dropped, renamed or coerced away)."""
    written = _leaves(yaml.safe_load(path.read_text(encoding="utf-8")))
    loaded = _leaves(load_config(path).model_dump(mode="json"))
    assert written, f"{path} sets nothing"
    assert {key: loaded.get(key) for key in written} == written


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, value in tree.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): list(tree) if isinstance(tree, tuple) else tree}


def test_no_shipped_config_is_skipped() -> None:
    """The glob above must see every YAML under configs/ (a .yml, or one in a subfolder, would otherwise be missed)."""
    walked = [
        os.path.join(folder, name)
        for folder, _, names in os.walk(CONFIGS)
        for name in names
        if name.endswith((".yaml", ".yml"))
    ]
    assert len(walked) >= 3  # digits.yaml, wine_mlp.yaml, text_gpt.yaml at least
    assert len(_shipped_configs()) == len(walked), sorted(walked)
