"""Post-training quantization (ONNX Runtime int8, torch.ao dynamic int8), half precision, and portable saving.

All quantizers are the libraries' own: `onnxruntime.quantization` for ONNX files, `torch.ao.quantization`
for eager models. Saved torch variants load without this project's model classes (`torch.export` programs,
or TorchScript where `torch.export` cannot take the model).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from trainflow.core.compression.onnx_export import INPUT_NAME

QUANTIZED_ONNX_OPS = (
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "DynamicQuantizeLinear",
    "DynamicQuantizeMatMul",
    "QuantizeLinear",
    "DequantizeLinear",
)


# ------------------------------------------------------------------------------------------- ONNX Runtime
def quantize_onnx_dynamic(src: Path, dst: Path) -> Path:
    """int8 weights, activations quantized at run time per batch (MatMulInteger): for MLP and GPT graphs.

    No calibration data needed. The graph goes through `quant_pre_process` first: neutral for MLPs, but
    on the GPT its constant folding lets the tied lm_head MatMul be quantized too (17 vs 16 MatMulInteger,
    about 7% faster at batch 1).
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        quantize_dynamic(str(_preprocessed(Path(src), Path(tmp))), str(dst), weight_type=QuantType.QInt8)
    return dst


def _preprocessed(src: Path, folder: Path) -> Path:
    """`src` after ORT's shape inference and graph optimisation, or `src` itself where that fails."""
    prepared = folder / "prepared.onnx"
    try:
        quant_pre_process(str(src), str(prepared))
    except Exception as exc:  # symbolic shape inference does not know every op; quantizing without it works
        logging.getLogger(__name__).info("quant_pre_process failed on %s (%s); quantizing it as exported", src, exc)
        return src
    return prepared


class _Samples(CalibrationDataReader):
    """Calibration batches from the rows of one array (MinMax takes the extremes over all batches, so the
    batch size changes only the speed)."""

    def __init__(self, samples: np.ndarray, dtype: type, batch: int = 32):
        self.samples, self.dtype, self.batch, self.next = samples, dtype, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.next >= len(self.samples):
            return None
        rows = self.samples[self.next : self.next + self.batch]
        self.next += self.batch
        return {INPUT_NAME: np.ascontiguousarray(rows, dtype=self.dtype)}

    def rewind(self) -> None:
        self.next = 0


def quantize_onnx_static(src: Path, dst: Path, calibration: np.ndarray, per_channel: bool = True) -> Path:
    """int8 weights and activations in QDQ format (ORT fuses Q/DQ pairs into QLinearConv etc.): for CNNs.

    Activation ranges come from MinMax calibration over `calibration` (a few hundred training samples):
    no outliers to clip in small classifiers, and the fastest method. Activations are QUInt8
    (asymmetric: post-ReLU ranges are one-sided), weights QInt8 symmetric, per output channel by default
    (ResNet kernels differ in scale per channel).

    Measured on this x86 CPU (AVX-512 VNNI, ORT 1.32): with QInt8 activations ORT fused only 2 of 6
    DQ-Conv-Q groups into QLinearConv and ran the rest in fp32 (2x slower than QUInt8, which fuses all).
    Per-channel weights cost about 10% latency at batch 1 against per-tensor, same argmax on digits.

    Weights are quantized to 7 bits (`reduce_range`): on x86 CPUs without VNNI (AVX2 only) ORT's u8s8 kernels
    add pairs of products in saturating int16 and the 8-bit CNN's logits were off by 45% of their range (a 7-bit
    file: 10%, 99% argmax agreement); the file is served on CPUs we do not know, so it is made safe for both.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.int64 if np.issubdtype(calibration.dtype, np.integer) else np.float32
    reader = _Samples(calibration, dtype)
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        quantize_static(
            str(_preprocessed(Path(src), Path(tmp))),
            str(dst),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            reduce_range=True,
        )
    return dst


def onnx_int8_report(path: Path) -> dict[str, Any]:
    """What is quantized in an ONNX file: initializers by dtype, quantized ops by type, 8-bit share of weights.

    Weights are initializers of rank >= 2 (matrices, kernels, embeddings); `int8_weight_fraction` is the
    share of their elements stored as int8/uint8 (biases, scales and zero points are left out).
    """
    graph = onnx.load(str(path)).graph
    initializers: Counter[str] = Counter()
    weight_elements: Counter[str] = Counter()
    weight_bytes: Counter[str] = Counter()
    for tensor in graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).name
        initializers[dtype] += 1
        if len(tensor.dims) >= 2:
            array = numpy_helper.to_array(tensor)
            weight_elements[dtype] += array.size
            weight_bytes[dtype] += array.nbytes
    ops = Counter(node.op_type for node in graph.node if node.op_type in QUANTIZED_ONNX_OPS)
    total = sum(weight_elements.values())
    eight_bit = weight_elements["int8"] + weight_elements["uint8"]
    return {
        "initializers": dict(initializers),
        "quantized_ops": dict(ops),
        "weight_bytes": dict(weight_bytes),
        "int8_weight_fraction": eight_bit / total if total else 0.0,
    }


# ------------------------------------------------------------------------------------------- torch
def quantize_torch_dynamic(model: nn.Module) -> nn.Module:
    """A copy with every nn.Linear as a torch.ao dynamic int8 Linear (weights int8, activations per batch).

    Quantizing the activations at each call is a fixed cost. On this CPU (1 thread, two runs) a 13-256-256-3
    MLP was 1.4-1.5x slower than fp32 at batch 1 and 1.6-1.8x faster at batch 256; a 64-1024-1024-10 MLP
    was faster at both (1.2-1.7x at batch 1, 6x at batch 256).
    """
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


def torch_int8_layers(model: nn.Module) -> list[str]:
    """Names of the modules that are torch.ao dynamic-quantized Linear layers."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    return [name for name, module in model.named_modules() if isinstance(module, DynamicQuantizedLinear)]


class HalfPrecision(nn.Module):
    """A bf16/fp16 model behind a float32 interface: float inputs cast in, logits cast back to float32.

    Integer inputs (token ids) pass through unchanged.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            x = x.to(self.dtype)
        return self.model(x).float()


def to_half(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A copy in `dtype` (bf16 or fp16), for GPU serving; on a CPU bf16 runs and fp16 is slow."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"to_half takes torch.bfloat16 or torch.float16, not {dtype}")
    return HalfPrecision(copy.deepcopy(model).eval().to(dtype), dtype).eval()


# ------------------------------------------------------------------------------------------- saving
def save_torch_program(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Save `model` as a `torch.export` program (.pt2) with a dynamic batch dimension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    if example.shape[0] < 2:  # torch.export specialises a dimension of size 0 or 1
        example = example.expand(2, *example.shape[1:]).contiguous()
    with torch.no_grad(), _quiet():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, str(path))
    return path


def load_torch_program(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module of a saved `torch.export` program; runs without the model's Python classes."""
    return torch.export.load(str(path)).module()  # a GraphModule: callable, but eval()/train() unsupported


def save_torch_model(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Save `model` where it loads without our classes: a .pt2 program, or TorchScript (.ts) as a fallback.

    torch.ao dynamic-quantized models go to TorchScript directly: `torch.export` fails on their packed
    weights (torch 2.13: "LinearPackedParamsBase does not have a field with name '__obj_flatten__'").
    The bf16/fp16 wrapper exports as a program. Returns the path written; its suffix names the format.
    """
    path = Path(path)
    if not torch_int8_layers(model):
        try:
            return save_torch_program(model, example, path.with_suffix(".pt2"))
        except Exception as exc:  # an unexportable forward: TorchScript may still trace it
            logging.getLogger(__name__).info("torch.export failed (%s); saving TorchScript", exc)
    ts_path = path.with_suffix(".ts")
    ts_path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    with torch.no_grad(), _quiet():
        traced = torch.jit.trace(model, (example,), check_trace=False)
        torch.jit.save(traced, str(ts_path))
    return ts_path


def load_torch_model(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """Load what `save_torch_model` wrote, by its suffix (.pt2: torch.export, .ts: TorchScript)."""
    path = Path(path)
    if path.suffix == ".pt2":
        module = load_torch_program(path)
    elif path.suffix == ".ts":
        module = torch.jit.load(str(path)).eval()
    else:
        raise ValueError(f"{path}: expected a .pt2 or .ts file written by save_torch_model")
    for parameter in module.parameters():  # loaded weights require grad; inference does not want a graph
        parameter.requires_grad_(False)
    return module


def _not_onnxruntime_advice(record: logging.LogRecord) -> bool:
    return "onnxruntime" not in record.pathname or record.levelno >= logging.ERROR


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence library warnings, and onnxruntime.quantization's advice (it logs on the root logger itself;
    a filter there drops only its records, other threads' logging is untouched)."""
    root, library = logging.getLogger(), logging.getLogger("onnxruntime")
    level = library.level
    root.addFilter(_not_onnxruntime_advice)
    library.setLevel(logging.ERROR)  # its named loggers (shape inference, calibration) propagate past root's filter
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(_not_onnxruntime_advice)
        library.setLevel(level)
