"""What the compress stage will build for a config, and the checks that fail a bad compress section before
any work: the preflight runs them on the config alone, the stage again on the prepared data's spec.

Torch loads only for the checks that need a model built (an explicit student, static quantization asked for).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from trainflow.core.config import CompressConfig, ModelConfig, TrainConfig
from trainflow.core.config.model import CNNConfig, FactoryModelConfig, GPTConfig, MLPConfig
from trainflow.core.data.spec import DataSpec
from trainflow.core.errors import ConfigError


@dataclass(frozen=True)
class FormatPlan:
    fp32_formats: list[str]  # formats of the trained model besides eager PyTorch
    onnx_int8: str  # dynamic | static
    half: str  # bf16 | fp16 | off
    structured: bool
    distill: bool


def plan_formats(cfg: CompressConfig, model_cfg: ModelConfig, train_cfg: TrainConfig) -> FormatPlan:
    """Resolve the `auto` settings for this model and device."""
    from trainflow.core.training.precision import resolve_device

    q = cfg.quantization
    onnx_int8 = q.onnx_int8 if q.onnx_int8 != "auto" else ("static" if isinstance(model_cfg, CNNConfig) else "dynamic")
    torch_int8 = q.torch_int8 if q.torch_int8 != "auto" else isinstance(model_cfg, MLPConfig | GPTConfig)
    half = q.half
    if half == "auto":
        half = "fp16" if resolve_device(train_cfg.device).type == "cuda" else "off"
    structured = cfg.structured_pruning.enabled
    if structured == "auto":
        structured = isinstance(model_cfg, MLPConfig | CNNConfig | GPTConfig)
    # a factory model has no automatic student: distillation applies when a student is configured
    distill = cfg.distillation.enabled and not (
        cfg.distillation.student is None and isinstance(model_cfg, FactoryModelConfig)
    )
    formats = (["onnx"] if q.onnx else []) + (["onnx_int8"] if q.onnx_int8 != "off" else [])
    formats += (["torch_int8"] if torch_int8 else []) + (["half"] if half != "off" else [])
    return FormatPlan(formats, onnx_int8, half, bool(structured), distill)


def check_compress(cfg: CompressConfig, model_cfg: ModelConfig, spec: DataSpec) -> None:
    """The compress section's problems that need the model: the preflight's check (on a nominal spec of
    the planned data) and the stage's (on the prepared data's)."""
    if not cfg.enabled:
        return
    if cfg.quantization.onnx_int8 == "static":
        if spec.task == "language_modeling":
            raise ConfigError(
                "compress.quantization.onnx_int8: static quantization calibrates float inputs, but a language "
                "model takes token ids; use dynamic (or auto)"
            )
        check_exports(model_cfg, spec)
    check_student(cfg, model_cfg, spec)


def check_student(cfg: CompressConfig, model_cfg: ModelConfig, spec: DataSpec) -> None:
    """A ConfigError unless the configured distillation student is smaller than the teacher."""
    d = cfg.distillation
    if not d.enabled or (d.student is None and isinstance(model_cfg, FactoryModelConfig)):
        return
    from trainflow.core.compression.distillation import count_parameters, student_config

    student = d.student or student_config(model_cfg, d.width)
    n_student, n_teacher = count_parameters(student, spec), count_parameters(model_cfg, spec)
    if n_student >= n_teacher:
        raise ConfigError(
            f"compress.distillation.student: {n_student:,} parameters is not smaller than the teacher's "
            f"{n_teacher:,}; choose a smaller student"
        )


def check_exports(model_cfg: ModelConfig, spec: DataSpec) -> None:
    """Static quantization needs an ONNX export: try it on a freshly built model, before any training."""
    import torch

    from trainflow.core.compression.onnx_export import ExportError, export_onnx
    from trainflow.core.models import build_model

    model = build_model(model_cfg, spec).eval()
    dtype = torch.int64 if spec.task == "language_modeling" else torch.float32
    example = torch.zeros((1, *spec.input_shape), dtype=dtype)
    with tempfile.TemporaryDirectory() as folder:
        try:
            export_onnx(model, example, Path(folder) / "model.onnx")
        except ExportError as exc:
            raise ConfigError(
                f"compress.quantization.onnx_int8: static quantization needs an ONNX export, and model "
                f"'{getattr(model_cfg, 'factory', model_cfg.name)}' does not export ({exc}); use dynamic or off"
            ) from None
