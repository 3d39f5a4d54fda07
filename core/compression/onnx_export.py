"""Export a model to one self-contained ONNX file with a dynamic batch, and run it with ONNX Runtime.

The dynamo exporter (`torch.export`-based, the default since torch 2.9) is tried first; when it raises,
or its graph does not reproduce the model at another batch size, the legacy TorchScript exporter is
tried. Each export is checked against the eager model at two batch sizes, because an exporter can
"succeed" with a wrong graph: the legacy tracer bakes a `.numpy()` result in as a constant, and the
dynamo exporter silently fixes the batch size when the forward branches on tensor values.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

INPUT_NAME, OUTPUT_NAME = "input", "logits"


class ExportError(Exception):
    """Neither exporter produced a correct ONNX graph; the message is one line naming the failing op when known."""


@dataclass(frozen=True)
class ExportInfo:
    """Which exporter wrote `path`, why the first choice was not used (None when it was), the file's opset."""

    path: Path
    exporter: str  # "dynamo" or "torchscript"
    fallback_reason: str | None
    opset: int


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> ExportInfo:
    """Write `model` (in eval mode) to `path` as one ONNX file: input "input", output "logits", batch dynamic.

    `example` is a batch of real inputs (float features/images or int64 token ids); the other dimensions
    are fixed at its shape. Raises ExportError when neither exporter gives a graph matching the model.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    if example.shape[0] < 2:  # torch.export specialises a dimension of size 0 or 1 to a constant
        example = example.expand(2, *example.shape[1:]).contiguous()
    try:
        with torch.no_grad():
            reasons: list[str] = []
            for exporter in ("dynamo", "torchscript"):
                try:
                    _export(model, example, path, exporter)
                    _check_matches(model, example, path)
                except Exception as exc:
                    reasons.append(f"{exporter}: {_one_line(exc)}")
                    continue
                opset = next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))
                return ExportInfo(path, exporter, reasons[0] if reasons else None, opset)
    finally:
        model.train(was_training)
    path.unlink(missing_ok=True)
    raise ExportError("cannot export to ONNX: " + "; ".join(reasons))


def _export(model: nn.Module, example: torch.Tensor, path: Path, exporter: str) -> None:
    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}
    with _quiet(fd_level=exporter == "torchscript"):  # the TorchScript exporter prints its IR from C++ on failure
        if exporter == "dynamo":
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                external_data=False,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                **names,
            )
        else:
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                **names,
            )


class _Mismatch(ValueError):
    """An exported graph that loads but does not reproduce the model."""


def _check_matches(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Raise unless the ONNX graph reproduces the model on `example` and on a reordered batch one row longer."""
    session = _session(path, threads=1, log_severity=4)  # failures arrive as exceptions; no ORT log lines
    if len(session.get_inputs()) != 1:
        raise _Mismatch(f"the graph has {len(session.get_inputs())} inputs, not 1 (the input traced as a constant?)")
    predict = OrtPredictor.from_session(session)
    for batch in (example, torch.cat([example.flip(0), example[:1]])):
        expected = model(batch).float().cpu().numpy()
        try:
            got = predict(batch.cpu().numpy())
        except Exception as exc:
            detail = re.sub(r"\[ONNXRuntimeError\] : \d+ : ", "", str(exc).splitlines()[0])[:120]
            raise _Mismatch(f"the graph does not run at batch {len(batch)}: {detail}") from exc
        if got.shape != expected.shape:
            raise _Mismatch(f"output shape {got.shape} at batch {len(batch)}, expected {expected.shape}")
        error, scale = float(np.abs(got - expected).max()), float(np.abs(expected).max())
        if error > 1e-3 * max(1.0, scale):
            raise _Mismatch(f"outputs differ from the model's by {error:.3g} (logits up to {scale:.3g})")


_OP_PATTERNS = (
    re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)'"),  # dynamo: no translation of an aten op
    re.compile(r"Error when translating node %\S+ : .*?target=torch\.ops\.([\w.]+)"),
    re.compile(r"Exporting the operator '([^']+)' to ONNX opset version \d+ is not supported"),  # torchscript
)


def _one_line(exc: BaseException) -> str:
    """The failing op when the exporter names it (in the message or its causes), else the first message line."""
    if isinstance(exc, _Mismatch):
        return str(exc)
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for pattern in _OP_PATTERNS:
        for err in chain:
            if match := pattern.search(str(err)):
                return f"no ONNX conversion for {match.group(1)} ({type(exc).__name__})"
    innermost = chain[-1]
    lines = [line.strip() for line in str(innermost).splitlines() if line.strip()]
    text = re.sub(r"\x1b\[[0-9;]*m", "", lines[0] if lines else "")
    return f"{type(innermost).__name__}: {text[:200]}"


@contextlib.contextmanager
def _quiet(fd_level: bool) -> Iterator[None]:
    """Silence the exporters' progress prints, warnings and log lines; with `fd_level`, also output written by C++.

    The fd-level capture briefly hides other threads' console output too, so it is used only where needed.
    """
    loggers = [
        logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
            _fd_silenced() if fd_level else contextlib.nullcontext(),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def _fd_silenced() -> Iterator[None]:
    """Point file descriptors 1 and 2 at a scratch file for the duration, restoring them afterwards."""
    for stream in (sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as scratch:
        os.dup2(scratch.fileno(), 1)
        os.dup2(scratch.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def ort_session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """A CPU-only ONNX Runtime session with all graph optimisations and `threads` intra-op threads.

    Listing only the CPU provider keeps a GPU build of onnxruntime from warning about CUDA.
    """
    return _session(path, threads, log_severity=3)


def _session(path: Path, threads: int, log_severity: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = log_severity  # 3: errors only, 4: fatal only
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


class OrtPredictor:
    """`np.ndarray -> logits` through ONNX Runtime; the input is cast to the graph's input dtype."""

    def __init__(self, path: Path, threads: int = 1):
        self._use(ort_session(path, threads))

    @classmethod
    def from_session(cls, session: ort.InferenceSession) -> OrtPredictor:
        """A predictor over an existing session (for sessions with other options)."""
        predictor = cls.__new__(cls)
        predictor._use(session)
        return predictor

    def _use(self, session: ort.InferenceSession) -> None:
        self.session = session
        spec = session.get_inputs()[0]
        self.input_name = spec.name
        self.dtype = _ORT_DTYPES.get(spec.type, np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        feed = np.ascontiguousarray(x, dtype=self.dtype)
        return self.session.run(None, {self.input_name: feed})[0]
