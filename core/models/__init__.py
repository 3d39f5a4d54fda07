"""The model zoo: `mlp`, `cnn`, `gpt` by name, or your own `package.module:function` factory."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from torch import nn

from core.config import CNNConfig, FactoryModelConfig, GPTConfig, MLPConfig, ModelConfig
from core.errors import ConfigError
from core.prepare_data import DataSpec

_TASKS = {"mlp": "classification", "cnn": "classification", "gpt": "language_modeling"}


def build_model(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    """A freshly initialised model for the data described by `spec`.

    Raises:
        ConfigError: the model does not fit the data (a CNN on tabular rows, a GPT on labels) or the
            factory cannot be imported.
    """
    if isinstance(cfg, FactoryModelConfig):
        return _from_factory(cfg, spec)
    if _TASKS[cfg.name] != spec.task:
        raise ConfigError(f"model.name: '{cfg.name}' is for {_TASKS[cfg.name]} but the data is {spec.task}")
    if isinstance(cfg, MLPConfig):
        from core.models.mlp import MLP

        return MLP(cfg, in_features=_flat(spec.input_shape), n_classes=spec.n_classes)
    if isinstance(cfg, CNNConfig):
        from core.models.cnn import ResNetCNN

        if len(spec.input_shape) != 3:
            raise ConfigError(
                f"model.name: 'cnn' needs image data (C, H, W) but the data has shape {list(spec.input_shape)}; use mlp"
            )
        return ResNetCNN(cfg, in_channels=spec.input_shape[0], n_classes=spec.n_classes)
    if isinstance(cfg, GPTConfig):
        from core.models.gpt import GPT

        return GPT(cfg, vocab_size=spec.n_classes, block_size=spec.input_shape[0])
    raise TypeError(f"unknown model config {type(cfg).__name__}")


def _from_factory(cfg: FactoryModelConfig, spec: DataSpec) -> nn.Module:
    module_name, _, attr = cfg.factory.partition(":")
    try:
        factory: Callable[..., nn.Module] = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"model.factory: cannot import '{cfg.factory}' ({exc})") from None
    try:
        inspect.signature(factory).bind(spec, **cfg.params)
    except TypeError as exc:
        raise ConfigError(f"model.params: {cfg.factory}(spec, **params) does not accept them ({exc})") from None
    model = factory(spec, **cfg.params)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.factory: '{cfg.factory}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _flat(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
