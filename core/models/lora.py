"""`model.lora`: low-rank adapters (Hu et al. 2021) through peft on any model of the zoo or a factory model.

Patterns are expanded here to the model's own module names, so peft is handed exact names (its suffix matching
is what trips users on custom modules, peft #781 and #1827), and a pattern that names no adaptable module is a
one-line error. peft is imported only when `model.lora` is set: plain runs and HPO workers never pay for it.

Checkpoints of a LoRA training hold only the adapters and `modules_to_save` (`weights_to_save`); the base weights
are the spec's own (its seeded init and `model.init_from`), rebuilt before the adapters load. `merged` folds the
adapters into the weights (`merge_and_unload`): what compress and publish get, and what serves without peft.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from trainflow.core.config.finetune import LoraConfig
from trainflow.core.errors import ConfigError
from trainflow.core.models.parts import name_matches

if TYPE_CHECKING:
    import torch
    from torch import nn

ADAPTER_KEYS = ("lora_", "modules_to_save")  # state-dict keys of what a LoRA training trains
EXTRA = "pip install 'trainflow[finetune]'"


def check_peft() -> None:
    """A ConfigError naming the extra when peft is not installed (the preflight calls it)."""
    try:
        import peft  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"model.lora: needs peft ({EXTRA}): {exc}") from None


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """`model` with adapters on `cfg.target_modules`; everything but adapters and `modules_to_save` frozen.

    Raises:
        ConfigError: peft is missing, or a pattern names no module peft can adapt.
    """
    from torch import nn

    check_peft()
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    adaptable = (nn.Linear, nn.Conv2d, nn.Embedding, nn.Conv1d)
    targets = _expand(model, cfg.target_modules, "target_modules", adaptable)
    saved = _expand(model, cfg.modules_to_save, "modules_to_save", None)
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                              modules_to_save=saved or None, bias="none")  # fmt: skip
    return get_peft_model(model, peft_cfg)


def _expand(model: nn.Module, patterns: list[str], field: str, kinds: tuple[type, ...] | None) -> list[str]:
    names = []
    for pattern in patterns:
        found = [n for n, m in model.named_modules()
                 if n and name_matches(n, pattern) and (kinds is None or isinstance(m, kinds))]  # fmt: skip
        if not found:
            kind = " Linear, Conv1d/2d or Embedding" if kinds else ""
            raise ConfigError(f"model.lora.{field}: '{pattern}' names no{kind} module of this model")
        names += [n for n in found if n not in names]
    return names


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def weights_to_save(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` as a checkpoint keeps it: the adapters and modules_to_save of a LoRA model, else all of it."""
    if not is_lora(model):
        return state
    return {k: v for k, v in state.items() if any(mark in k for mark in ADAPTER_KEYS)}


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load what `weights_to_save` kept: strict for a plain model; for a LoRA model every adapter must be there
    and nothing else may be (its base weights are already in place)."""
    if not is_lora(model):
        model.load_state_dict(state)
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    absent = [k for k in missing if any(mark in k for mark in ADAPTER_KEYS)]
    if absent or unexpected:
        raise ConfigError(f"LoRA checkpoint does not fit the model: missing {absent[:3]}, unexpected {unexpected[:3]}")


def merged(model: nn.Module) -> nn.Module:
    """A plain model with the adapters folded into its weights (a copy; `model` keeps its adapters), every parameter
    trainable again, as any trained model is (compress fine-tunes and distils it)."""
    if not is_lora(model):
        return model
    plain = copy.deepcopy(model).merge_and_unload()
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
