"""Turn a model ("base": trained, pruned, distilled) into a measurable, saved variant in a format:
eager PyTorch, ONNX Runtime fp32, ONNX Runtime int8 (dynamic or static QDQ), PyTorch dynamic int8, or
half precision. Each builder saves the variant first and measures what it saved where it can (ONNX
files are run from disk), so the table describes the files that ship.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainflow.core.compression.measure import Candidate, Predict
from trainflow.core.compression.onnx_export import ExportInfo, OrtPredictor, export_onnx
from trainflow.core.compression.pruning import sparsity_report
from trainflow.core.compression.quantization import (
    onnx_int8_report,
    quantize_onnx_dynamic,
    quantize_onnx_static,
    quantize_torch_dynamic,
    save_torch_model,
    to_half,
    torch_int8_layers,
)


@dataclass
class Base:
    """A model the formats are applied to, with what is known about how it was made."""

    name: str  # fp32, pruned, pruned_structured, distilled
    model: nn.Module  # eval mode, on the CPU
    note: str = ""  # how it was made, shown in the table
    details: dict[str, object] | None = None


@dataclass(frozen=True)
class BuildContext:
    folder: Path  # where variant files go
    example: torch.Tensor  # one model input (batch 1), for export and tracing
    calibration: np.ndarray  # training inputs for static quantization
    threads: int
    onnx_int8: str  # dynamic | static
    half: str  # bf16 | fp16
    device: torch.device  # where half precision runs
    exports: dict[str, ExportInfo] = field(default_factory=dict)  # base name -> its fp32 ONNX export, made once


def torch_predict(model: nn.Module, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Predict:
    """numpy in, numpy logits out, under inference mode (the same conversions ONNX Runtime pays)."""
    device = device or torch.device("cpu")

    @torch.inference_mode()
    def predict(x: np.ndarray) -> np.ndarray:
        inputs = torch.from_numpy(x).to(device)
        if dtype is not None and inputs.is_floating_point():
            inputs = inputs.to(dtype)
        return model(inputs).float().cpu().numpy()

    return predict


def unique_parameters(model: nn.Module) -> int:
    """Parameters counted once per tensor (the GPT's tied embedding and head are one matrix)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def build_variant(base: Base, fmt: str, ctx: BuildContext) -> Candidate:
    """The variant `base` in `fmt` (torch = the base itself, eager). Raises whatever the export or the
    quantizer raises; the stage reports it as a failed variant and goes on."""
    name = base.name if fmt == "torch" else f"{base.name}+{fmt}"
    stem = ctx.folder / name.replace("+", "__")
    params, sparsity = unique_parameters(base.model), sparsity_report(base.model).overall
    if fmt == "torch":
        path = save_torch_model(base.model, ctx.example, stem)
        return Candidate(name, base.name, fmt, "torch", torch_predict(base.model), path, params, sparsity,
                         base.note or "eager PyTorch", dict(base.details or {}))  # fmt: skip
    if fmt == "onnx":
        info = _fp32_onnx(base, ctx)
        note = f"ONNX Runtime fp32 ({info.exporter} exporter)"
        details = {"exporter": info.exporter, "fallback_reason": info.fallback_reason}
        predict = OrtPredictor(info.path, ctx.threads)
        return Candidate(name, base.name, fmt, "onnxruntime", predict, info.path, params, sparsity, note, details)
    if fmt == "onnx_int8":
        info = _fp32_onnx(base, ctx)  # the base+onnx variant's file: exported once for both formats
        path = stem.with_suffix(".onnx")
        if ctx.onnx_int8 == "static":
            calibration = ctx.calibration.astype(ctx.example.numpy().dtype)
            quantize_onnx_static(info.path, path, calibration)
            note = f"ONNX Runtime int8, static QDQ calibrated on {len(calibration)} training samples"
        else:
            quantize_onnx_dynamic(info.path, path)
            note = "ONNX Runtime int8, dynamic (int8 weights, activations quantized per call)"
        report = onnx_int8_report(path)
        return Candidate(name, base.name, fmt, "onnxruntime", OrtPredictor(path, ctx.threads), path, params, sparsity,
                         note, {"int8": report, "exporter": info.exporter})  # fmt: skip
    if fmt == "torch_int8":
        quantized = quantize_torch_dynamic(base.model)
        layers = torch_int8_layers(quantized)
        if not layers:
            raise ValueError("no Linear layer to quantize")
        path = save_torch_model(quantized, ctx.example, stem)
        note = f"PyTorch dynamic int8 (torch.ao), {len(layers)} Linear layer(s)"
        return Candidate(name, base.name, fmt, "torch", torch_predict(quantized), path, params, sparsity, note,
                         {"int8_layers": layers})  # fmt: skip
    if fmt == "half":
        dtype = torch.float16 if ctx.half == "fp16" else torch.bfloat16
        half = to_half(base.model, dtype).to(ctx.device)  # a copy
        path = save_torch_model(half, ctx.example.to(ctx.device), stem)
        note = f"PyTorch {ctx.half} weights on {ctx.device.type}"
        return Candidate(name, base.name, fmt, f"torch-{ctx.device.type}", torch_predict(half, ctx.device), path,
                         params, sparsity, note)  # fmt: skip
    raise ValueError(f"unknown format {fmt!r}")


def _fp32_onnx(base: Base, ctx: BuildContext) -> ExportInfo:
    """The base's fp32 ONNX export at the `<base>+onnx` variant's path, made once per base (an export takes
    about a second): the onnx variant is that file, the onnx_int8 variant quantizes it."""
    if base.name not in ctx.exports:
        ctx.exports[base.name] = export_onnx(base.model, ctx.example, ctx.folder / f"{base.name}__onnx.onnx")
    return ctx.exports[base.name]
