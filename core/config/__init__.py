"""The pipeline's config: the schema (`schema.py`), its sections, error messages and `--set` parsing.

Everything a caller needs is importable from here: `from core.config import Config, TrainConfig, load_config`.
"""

from core.config.data import (
    DataConfig,
    LoaderConfig,
    SklearnDataConfig,
    SyntheticDataConfig,
    TableDataConfig,
    TextDataConfig,
)
from core.config.model import CNNConfig, FactoryModelConfig, GPTConfig, MLPConfig, ModelConfig
from core.config.schema import Config, config_from_dict, load_config
from core.config.sections import (
    CheckpointConfig,
    EarlyStoppingConfig,
    EvaluateConfig,
    OptimConfig,
    PublishConfig,
    StoreConfig,
    TrackingConfig,
    TrainConfig,
)
from core.config.tune import (
    CategoricalParam,
    FloatParam,
    HPOConfig,
    IntParam,
    LRRangeTestConfig,
    ParamSpec,
    TuneConfig,
)

__all__ = [
    "CNNConfig", "CategoricalParam", "CheckpointConfig", "Config", "DataConfig", "EarlyStoppingConfig",
    "EvaluateConfig", "FactoryModelConfig", "FloatParam", "GPTConfig", "HPOConfig", "IntParam", "LRRangeTestConfig",
    "LoaderConfig", "MLPConfig", "ModelConfig", "OptimConfig", "ParamSpec", "PublishConfig", "SklearnDataConfig",
    "StoreConfig", "SyntheticDataConfig", "TableDataConfig", "TextDataConfig", "TrackingConfig", "TrainConfig",
    "TuneConfig", "config_from_dict", "load_config",
]  # fmt: skip
