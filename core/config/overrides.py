"""`--set section.key=value` overrides: parsed as YAML, applied to the raw config mapping before validation."""

from __future__ import annotations

import re
from typing import Any

import yaml

_OVERRIDE_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    """Split `section.key=value`; the value is parsed as YAML (`32` -> int, `null` -> None, `[1, 2]` -> list)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not _OVERRIDE_KEY.match(key):
        raise ValueError("expected section.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return tuple(key.split(".")), value


def set_path(raw: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    """Set `raw[k1][k2]...[kn] = value`, creating sections on the way."""
    node = raw
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ValueError(f"{'.'.join(keys[: depth + 1])} is a value, not a section")
        node = child
    node[keys[-1]] = value
