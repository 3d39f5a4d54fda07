"""Config of the compress stage: which compressed variants are built from the trained model, how each is
measured, and how the one to ship is picked.

Every variant is evaluated the same way as the fp32 model (test metrics, batch-1 latency, throughput,
size), so the table in the run shows what each technique buys and costs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from trainflow.core.config.base import Section
from trainflow.core.config.model import ModelConfig

# The variants a run can produce: a model ("base") in a runtime/format. `fp32` is the trained model.
BASES = ("fp32", "pruned", "pruned_structured", "distilled")
FORMATS = ("onnx", "onnx_int8", "torch_int8", "half")


class UnstructuredPruningConfig(Section):
    enabled: bool = Field(
        True,
        description="Global magnitude pruning (torch.nn.utils.prune, L1 over every Linear/Conv weight) to `sparsity`, masks made permanent. Zeros do not shrink a dense file or speed up dense kernels: the table shows what it costs in accuracy.",
    )
    sparsity: float = Field(0.5, ge=0, lt=1, description="Fraction of the prunable weights set to zero.")
    finetune_epochs: int = Field(
        2,
        ge=0,
        description="Epochs of fine-tuning through the Trainer after pruning, the pruned weights kept at zero; 0 = none.",
    )


class StructuredPruningConfig(Section):
    enabled: bool | Literal["auto"] = Field(
        "auto",
        description="Remove whole channels/neurons with Torch-Pruning so tensors shrink and the model gets faster. auto = on for mlp, cnn and gpt (its feed-forward units only: attention heads and the residual width stay); off for factory models.",
    )
    ratio: float = Field(
        0.5, gt=0, lt=1, description="Fraction of the channels (hidden units) of each prunable layer removed."
    )
    rounds: int = Field(
        1, ge=1, description="Iterative pruning: reach `ratio` in this many equal steps, fine-tuning after each."
    )
    finetune_epochs: int = Field(
        5, ge=0, description="Epochs of fine-tuning through the Trainer after each round (early stopping applies)."
    )


class QuantizationConfig(Section):
    onnx: bool = Field(
        True,
        description="An ONNX Runtime fp32 variant of the trained model: what the runtime gives before any quantization.",
    )
    onnx_int8: Literal["auto", "dynamic", "static", "off"] = Field(
        "auto",
        description="ONNX Runtime int8: dynamic (int8 weights, activations quantized at run time; MLP, GPT) or static (QDQ, activations calibrated on training samples; CNN). auto = static for cnn, dynamic otherwise.",
    )
    calibration_samples: int = Field(
        256, ge=8, description="Training samples the static quantization's activation ranges are calibrated on."
    )
    torch_int8: bool | Literal["auto"] = Field(
        "auto",
        description="PyTorch dynamic int8 (torch.ao, Linear layers): faster at large batches on CPU, slower at batch 1. auto = on for mlp and gpt (models made of Linear layers).",
    )
    half: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto",
        description="Half-precision weights for GPU serving. auto = fp16 when train.device resolves to CUDA, off on CPU (where fp16 kernels are slow).",
    )


class DistillationConfig(Section):
    enabled: bool = Field(
        True,
        description="Train a smaller student on the teacher's soft targets (Hinton et al. 2015) through the Trainer: the main run's early stopping, checkpoints and resume.",
    )
    student: ModelConfig | None = Field(
        None,
        description="The student's model section (any zoo model); null = the teacher's family at `width` times each width.",
    )
    width: float = Field(
        0.5, gt=0, lt=1, description="With student null: the student's widths as a fraction of the teacher's."
    )
    alpha: float = Field(
        0.5, ge=0, le=1, description="Weight of the soft-target loss; 1 - alpha weighs the hard-label loss."
    )
    temperature: float = Field(
        4.0, gt=0, le=100, description="Softmax temperature of both teacher and student in the soft loss."
    )
    max_epochs: int | None = Field(None, ge=1, description="Student training epochs; null = train.max_epochs.")


class ToleranceConfig(Section):
    accuracy_drop: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Largest test-accuracy drop (absolute, 0.01 = 1 point) a recommended variant may have.",
    )
    perplexity_rise: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Largest relative test-perplexity rise (0.02 = 2%) a recommended language model may have.",
    )


class MeasureConfig(Section):
    threads: int = Field(
        1, ge=1, le=256, description="Intra-op threads of every runtime while measuring (torch and ONNX Runtime alike)."
    )
    warmup: int = Field(20, ge=0, description="Untimed batch-1 calls per variant before timing.")
    latency_calls: int = Field(200, ge=20, description="Timed batch-1 calls per variant; p50 and p95 are reported.")
    rounds: int = Field(
        5, ge=1, description="The timed calls are split in this many rounds, variants alternated within each round."
    )
    serving_batch: int = Field(256, ge=1, description="Batch size of the throughput measurement.")
    throughput_calls: int = Field(10, ge=1, description="Timed calls at the serving batch per variant.")
    latency_tie: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Batch-1 latencies within this fraction of the fastest count as a tie; the smaller file wins a tie.",
    )


class CompressConfig(Section):
    enabled: bool = Field(True, description="Run the compress stage; off = publish ships the fp32 model only.")
    pruning: UnstructuredPruningConfig = Field(
        default_factory=UnstructuredPruningConfig, description="Unstructured (magnitude) pruning."
    )
    structured_pruning: StructuredPruningConfig = Field(
        default_factory=StructuredPruningConfig, description="Structured pruning (channels removed)."
    )
    quantization: QuantizationConfig = Field(
        default_factory=QuantizationConfig, description="ONNX Runtime and PyTorch quantization, half precision."
    )
    distillation: DistillationConfig = Field(
        default_factory=DistillationConfig, description="Knowledge distillation into a smaller student."
    )
    combinations: list[str] = Field(
        ["distilled+onnx_int8", "pruned_structured+onnx_int8"],
        description=f"Further variants as base+format: a base ({', '.join(BASES[1:])}) in a format ({', '.join(FORMATS)}); a combination whose base is off is skipped.",
    )
    tolerance: ToleranceConfig = Field(
        default_factory=ToleranceConfig, description="How much quality a recommended variant may lose."
    )
    measure: MeasureConfig = Field(
        default_factory=MeasureConfig,
        description="How latency and throughput are measured: every variant's, and the trained model's in the evaluate stage (the table's fp32 row), also when compress is off.",
    )

    @field_validator("combinations")
    @classmethod
    def _known_combinations(cls, value: list[str]) -> list[str]:
        for item in value:
            base, plus, fmt = item.partition("+")
            if not plus or base not in BASES[1:] or fmt not in FORMATS:
                raise ValueError(
                    f"'{item}' is not base+format with base one of {', '.join(BASES[1:])} and format one of {', '.join(FORMATS)}"
                )
        if len(set(value)) != len(value):
            raise ValueError("a combination is listed twice")
        return value
