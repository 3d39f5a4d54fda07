"""Parts of a model by name: module-name patterns (`model.reinit`, `train.finetune.freeze`, `model.lora`) and the
blocks from input to head that discriminative learning rates step through (`train.finetune.layer_lr_decay`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

from torch import nn


def name_matches(name: str, pattern: str) -> bool:
    """`pattern` (fnmatch) matches the module name `name`, or its trailing dotted part (`head` matches `net.head`)."""
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def first_match(name: str, patterns: Sequence[str]) -> str | None:
    """The first of `patterns` matching `name` or one of its parent modules (a parameter `blocks.0.conv1.weight`
    is in the modules `blocks`, `blocks.0`, `blocks.0.conv1`)."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return next((p for p in patterns if any(name_matches(prefix, p) for prefix in prefixes)), None)


def unmatched(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """The patterns that name no module of `model` (a typo must not freeze nothing silently)."""
    names = [name for name, _ in model.named_modules() if name]
    return [p for p in patterns if not any(name_matches(n, p) for n in names)]


def lr_blocks(model: nn.Module) -> list[list[nn.Parameter]]:
    """The parameters in blocks from input to head: the model's `lr_blocks()` (every zoo model has one; a factory
    model may), else its top-level children in order. Parameters in no block join the head; a parameter in two
    blocks (tied weights) counts in the later one."""
    inner = _unwrapped(model)
    if hasattr(inner, "lr_blocks"):
        blocks = [[m for m in block] for block in inner.lr_blocks()]
    else:
        blocks = [[child] for child in inner.children()]
    placed: dict[int, int] = {}
    for index, modules in enumerate(blocks):
        for module in modules:
            for param in module.parameters():
                placed[id(param)] = index
    last = max(len(blocks) - 1, 0)
    out: list[list[nn.Parameter]] = [[] for _ in range(last + 1)]
    for param in model.parameters():
        out[placed.get(id(param), last)].append(param)
    return [params for params in out if params]


def _unwrapped(model: nn.Module) -> nn.Module:
    """The user's or zoo's module inside peft's wrappers (PeftModel.base_model.model)."""
    base = getattr(model, "base_model", None)
    return getattr(base, "model", model) if base is not None else model
