"""The pipeline's config: the schema (`schema.py`), its sections, error messages and `--set` parsing.

Everything a caller needs is importable from here: `from core.config import Config, TrainConfig, load_config`.
"""

from trainflow.core.config.augment import AugmentConfig
from trainflow.core.config.compress import (
    CompressConfig,
    DistillationConfig,
    MeasureConfig,
    QuantizationConfig,
    StructuredPruningConfig,
    UnstructuredPruningConfig,
)
from trainflow.core.config.data import (
    DataConfig,
    ImageFolderDataConfig,
    LoaderConfig,
    SklearnDataConfig,
    SyntheticDataConfig,
    TableDataConfig,
    TextDataConfig,
    TextFolderDataConfig,
)
from trainflow.core.config.diagnostics import DiagnosticsConfig
from trainflow.core.config.distributed import DistributedConfig
from trainflow.core.config.model import CNNConfig, FactoryModelConfig, GPTConfig, MLPConfig, ModelConfig
from trainflow.core.config.schema import Config, config_from_dict, load_config
from trainflow.core.config.sections import (
    CheckpointConfig,
    EarlyStoppingConfig,
    OptimConfig,
    PublishConfig,
    StoreConfig,
    TrackingConfig,
    TrainConfig,
)
from trainflow.core.config.timeouts import TimeoutsConfig
from trainflow.core.config.tune import (
    CategoricalParam,
    FloatParam,
    HPOConfig,
    IntParam,
    LRRangeTestConfig,
    ParamSpec,
    TuneConfig,
)

__all__ = [
    "AugmentConfig",
    "CNNConfig",
    "CategoricalParam",
    "CheckpointConfig",
    "CompressConfig",
    "Config",
    "DataConfig",
    "DiagnosticsConfig",
    "DistillationConfig",
    "DistributedConfig",
    "EarlyStoppingConfig",
    "FactoryModelConfig",
    "FloatParam",
    "GPTConfig",
    "HPOConfig",
    "ImageFolderDataConfig",
    "IntParam",
    "LRRangeTestConfig",
    "LoaderConfig",
    "MLPConfig",
    "MeasureConfig",
    "ModelConfig",
    "OptimConfig",
    "ParamSpec",
    "PublishConfig",
    "QuantizationConfig",
    "SklearnDataConfig",
    "StoreConfig",
    "StructuredPruningConfig",
    "SyntheticDataConfig",
    "TableDataConfig",
    "TextDataConfig",
    "TextFolderDataConfig",
    "TimeoutsConfig",
    "TrackingConfig",
    "TrainConfig",
    "TuneConfig",
    "UnstructuredPruningConfig",
    "config_from_dict",
    "load_config",
]  # fmt: skip
