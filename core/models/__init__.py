"""The model zoo: `mlp`, `cnn`, `gpt` by name, or your own `package.module:function` factory.

Importing this package does not load torch (the preflight uses `check_model_fits_data`); building a model does.
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from trainflow.core.config import CNNConfig, FactoryModelConfig, GPTConfig, MLPConfig, ModelConfig
from trainflow.core.data.spec import DataSpec, Task
from trainflow.core.errors import ConfigError
from trainflow.core.storage.version import model_code_version

if TYPE_CHECKING:  # torch loads when a model is built, not when the preflight checks a config
    from torch import nn

_TASKS: dict[str, Task] = {"mlp": "classification", "cnn": "classification", "gpt": "language_modeling"}
_TASK_WORDS = {"classification": "classification", "language_modeling": "language modelling (data.source: text)"}
# model_code_version of each factory's top-level module when this process imported it (see _import_factory)
_FACTORY_VERSIONS: dict[str, str] = {}


def check_model_fits_data(cfg: ModelConfig, task: Task, input_rank: int) -> None:
    """A ConfigError unless the zoo model `cfg` can take data of this task and sample rank (a factory
    model is the user's to check). The preflight calls it from the config alone, `build_model` from the
    prepared data's spec: one rule, one message.
    """
    if isinstance(cfg, FactoryModelConfig):
        _import_factory(cfg)  # its fit to the data is the user's to check; that it exists is ours
        return
    wanted = _TASKS[cfg.name]
    if wanted != task:
        fix = "use data.source: text" if wanted == "language_modeling" else "use gpt, or a classification data source"
        raise ConfigError(
            f"model.name: '{cfg.name}' is for {_TASK_WORDS[wanted]} but the data is for {_TASK_WORDS[task]}; {fix}"
        )
    if isinstance(cfg, CNNConfig) and input_rank != 3:
        raise ConfigError(
            f"model.name: 'cnn' needs image data (C, H, W), such as data.name: digits, but each sample of this "
            f"data has {input_rank} dimension(s); use mlp"
        )


def build_model(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    """A freshly initialised model for the data described by `spec`.

    Raises:
        ConfigError: the model does not fit the data (a CNN on tabular rows, a GPT on labels) or the
            factory cannot be imported.
    """
    check_model_fits_data(cfg, spec.task, len(spec.input_shape))
    if isinstance(cfg, FactoryModelConfig):
        return _from_factory(cfg, spec)
    if isinstance(cfg, MLPConfig):
        from trainflow.core.models.mlp import MLP

        return MLP(cfg, in_features=math.prod(spec.input_shape), n_classes=spec.n_classes)
    if isinstance(cfg, CNNConfig):
        from trainflow.core.models.cnn import ResNetCNN

        return ResNetCNN(cfg, in_channels=spec.input_shape[0], n_classes=spec.n_classes)
    if isinstance(cfg, GPTConfig):
        from trainflow.core.models.gpt import GPT

        return GPT(cfg, vocab_size=spec.n_classes, block_size=spec.input_shape[0])
    raise TypeError(f"unknown model config {type(cfg).__name__}")


def _from_factory(cfg: FactoryModelConfig, spec: DataSpec) -> nn.Module:
    from torch import nn

    model = _import_factory(cfg)(spec, **cfg.params)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.factory: '{cfg.factory}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_factory(cfg: FactoryModelConfig) -> Callable[..., nn.Module]:
    """The factory function, checked to accept `(spec, **model.params)`; it is not called here. Its code is
    the code `model_code_version` names (the stage cache key): a module edited since this process imported
    it is imported afresh."""
    module_name, _, attr = cfg.factory.partition(":")
    _reload_if_edited(module_name.partition(".")[0], model_code_version(cfg.factory))
    try:
        factory: Callable[..., nn.Module] = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"model.factory: cannot import '{cfg.factory}' ({exc})") from None
    try:
        inspect.signature(factory).bind(None, **cfg.params)
    except TypeError as exc:
        raise ConfigError(f"model.params: {cfg.factory}(spec, **params) does not accept them ({exc})") from None
    return factory


def _reload_if_edited(top: str, version: str) -> None:
    """Forget the imported modules of the top-level module or package `top` when its code is no longer the
    `version` this process first saw, so the next import runs the edited files (`trainflow serve`, a test
    editing a factory). Dropping them all, not `importlib.reload` one by one, re-imports them in their own
    dependency order. An installed distribution stays: compiled modules cannot be reloaded; trainflow's own
    code is `code_version`'s, fixed per process."""
    seen = _FACTORY_VERSIONS.setdefault(top, version)
    if seen == version or not version.startswith("sha256:") or top == __name__.partition(".")[0]:
        return
    for name in [name for name in sys.modules if name == top or name.startswith(f"{top}.")]:
        del sys.modules[name]
    importlib.invalidate_caches()  # a submodule file added since the first import
    _FACTORY_VERSIONS[top] = version
