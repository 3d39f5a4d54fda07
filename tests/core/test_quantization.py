"""ONNX export (dynamic batch, exporter fallback, ExportError), ONNX Runtime int8 (dynamic and static QDQ),
torch.ao dynamic int8, half precision, and saving torch variants that load without our model classes."""

from __future__ import annotations

import collections
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from trainflow.core.compression.onnx_export import ExportError, OrtPredictor, export_onnx
from trainflow.core.compression.quantization import (
    load_torch_model,
    onnx_int8_report,
    quantize_onnx_dynamic,
    quantize_onnx_static,
    quantize_torch_dynamic,
    save_torch_model,
    to_half,
    torch_int8_layers,
)
from trainflow.core.config import CNNConfig, GPTConfig, MLPConfig
from trainflow.core.data.spec import DataSpec
from trainflow.core.models import build_model

pytestmark = pytest.mark.slow  # three models exported and quantized: left out of `pytest -m 'not slow'`

TABULAR = DataSpec(task="classification", input_shape=(13,), n_classes=3)
IMAGES = DataSpec(task="classification", input_shape=(1, 8, 8), n_classes=10)
TEXT = DataSpec(task="language_modeling", input_shape=(16,), n_classes=64)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> nn.Module:
    """A few Adam steps, so that argmax agreement under int8 noise means something (untrained logits tie)."""
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        rows = torch.arange(step * 64, step * 64 + 64) % len(x)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        optimizer.step()
    return model.eval()


def _data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    digits = load_digits()
    images = torch.tensor(digits.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    rng = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (400,), generator=rng)
    rows = torch.randn(400, 13, generator=rng) + 2.0 * nn.functional.one_hot(labels, 13).float()  # 3 blobs
    return {
        "mlp": (rows, labels),
        "cnn": (images, torch.tensor(digits.target)),
        "gpt": (torch.randint(0, 64, (200, 16), generator=rng), torch.zeros(200)),
    }


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Three small trained-ish models, their fp32 ONNX files and int8 variants, exported once for the module."""
    folder = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    data = _data()
    models = {
        "mlp": _train(build_model(MLPConfig(hidden_sizes=[64, 64]), TABULAR), *data["mlp"], steps=60),
        "cnn": _train(build_model(CNNConfig(channels=[8, 16]), IMAGES), *data["cnn"], steps=60),
        "gpt": build_model(GPTConfig(n_layer=2, n_head=2, n_embd=32), TEXT).eval(),
    }
    zoo: dict[str, dict] = {}
    for name, model in models.items():
        x = data[name][0]
        info = export_onnx(model, x[:4], folder / f"{name}.onnx")
        entry = {"model": model, "x": x, "info": info}
        if name == "cnn":
            calibration = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:200]].numpy()
            entry["int8"] = quantize_onnx_static(info.path, folder / "cnn.int8.onnx", calibration)
        else:
            entry["int8"] = quantize_onnx_dynamic(info.path, folder / f"{name}.int8.onnx")
        zoo[name] = entry
    return zoo


def _eager(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).float().numpy()


def _relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


# ------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("name", ["mlp", "cnn", "gpt"])
def test_onnx_matches_pytorch_at_batch_1_and_5(zoo: dict[str, dict], name: str) -> None:
    entry = zoo[name]
    assert (entry["info"].exporter, entry["info"].fallback_reason) == ("dynamo", None)
    session = ort.InferenceSession(str(entry["info"].path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    assert not list(entry["info"].path.parent.glob("*.data"))  # one self-contained file
    predict = OrtPredictor(entry["info"].path)
    for batch in (1, 5):
        x = entry["x"][10 : 10 + batch]
        expected = _eager(entry["model"], x)
        got = predict(x.numpy())
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def test_dynamo_failure_falls_back_to_torchscript(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_export = torch.onnx.export

    def dynamo_breaks(*args, **kwargs):
        if kwargs.get("dynamo"):
            raise RuntimeError("simulated dynamo failure\nwith a second line")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_breaks)
    model = build_model(MLPConfig(hidden_sizes=[8]), TABULAR).eval()
    info = export_onnx(model, torch.randn(1, 13), tmp_path / "m.onnx")  # batch 1 example: still a dynamic batch
    assert info.exporter == "torchscript"
    assert info.fallback_reason == "dynamo: RuntimeError: simulated dynamo failure"
    x = torch.randn(7, 13)
    np.testing.assert_allclose(OrtPredictor(info.path)(x.numpy()), _eager(model, x), atol=1e-5)


class _Eigenvalues(nn.Module):
    """Neither exporter has a conversion for aten.linalg_eigh (verified on torch 2.13)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigh(x[:, :4, None] * x[:, None, :4]).eigenvalues


class _ValuesAsConstants(nn.Module):
    """Branches in Python on tensor values: dynamo fixes the batch size, the tracer bakes the branch in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = [value > 0 for value in x.sum(1).tolist()]
        return x * torch.tensor(keep, dtype=x.dtype)[:, None]


@pytest.mark.parametrize(
    ("module", "words"),
    [(_Eigenvalues(), ["aten._linalg_eigh", "aten::linalg_eigh"]), (_ValuesAsConstants(), ["does not run at batch"])],
)
def test_unexportable_model_raises_a_one_line_export_error(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], module: nn.Module, words: list[str]
) -> None:
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ExportError) as raised:
        warnings.simplefilter("always")
        export_onnx(module, torch.randn(3, 8), tmp_path / "bad.onnx")
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("cannot export to ONNX: dynamo: ")
    assert all(word in message for word in words), message
    assert not (tmp_path / "bad.onnx").exists()
    out, err = capfd.readouterr()
    assert (out, err, [str(w.message) for w in caught]) == ("", "", [])  # nothing reaches the pipeline log


# ------------------------------------------------------------------------------------------- ONNX int8
@pytest.mark.parametrize("name", ["mlp", "cnn", "gpt"])
def test_int8_onnx_stores_int8_weights_and_agrees_with_fp32(zoo: dict[str, dict], name: str) -> None:
    entry = zoo[name]
    assert onnx_int8_report(entry["info"].path)["int8_weight_fraction"] == 0.0
    report = onnx_int8_report(entry["int8"])
    assert report["int8_weight_fraction"] >= 0.9, report
    assert report["weight_bytes"].get("int8", 0) > 0
    ops = report["quantized_ops"]
    if name == "cnn":  # static QDQ: Q/DQ pairs in the file, fused into int8 kernels by ORT
        assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    else:  # dynamic: activations quantized at run time
        assert ops["DynamicQuantizeLinear"] == ops["MatMulInteger"] > 0
    x = entry["x"][-100:]
    expected, got = _eager(entry["model"], x), OrtPredictor(entry["int8"])(x.numpy())
    assert _relative_error(got, expected) < (0.15 if name == "cnn" else 0.05)  # measured 0.08 / 0.03, 0.01
    if name != "gpt":  # an untrained GPT's logits are near ties; the classifiers are trained
        assert np.mean(got.argmax(-1) == expected.argmax(-1)) >= 0.9


def test_static_qdq_runs_every_conv_as_an_int8_kernel(zoo: dict[str, dict], tmp_path: Path) -> None:
    """QUInt8 activations let ORT fuse each DQ-Conv-Q into QLinearConv on x86 (QInt8 left most Convs in fp32)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(zoo["cnn"]["int8"]), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    convs = sum(isinstance(m, nn.Conv2d) for m in zoo["cnn"]["model"].modules())
    assert (ops["QLinearConv"], ops["Conv"]) == (convs, 0)


# ------------------------------------------------------------------------------------------- torch variants
@pytest.mark.parametrize("name", ["mlp", "gpt"])
def test_torch_dynamic_int8_quantizes_every_linear(zoo: dict[str, dict], name: str) -> None:
    model = zoo[name]["model"]
    quantized = quantize_torch_dynamic(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(torch_int8_layers(quantized)) == sorted(linears) and linears
    assert torch_int8_layers(model) == []  # the original is untouched
    x = zoo[name]["x"][:20]
    assert _relative_error(_eager(quantized, x), _eager(model, x)) < 0.1


@pytest.mark.parametrize("name", ["mlp", "gpt"])
def test_half_precision_wrapper_keeps_a_float32_interface(zoo: dict[str, dict], name: str) -> None:
    model, x = zoo[name]["model"], zoo[name]["x"][:6]
    half = to_half(model, torch.bfloat16)
    out = half(x)
    assert out.dtype == torch.float32 and next(model.parameters()).dtype == torch.float32
    assert _relative_error(out.detach().numpy(), _eager(model, x)) < 0.05


@pytest.mark.parametrize(
    ("name", "variant", "suffix"),
    [
        ("mlp", "fp32", ".pt2"),
        ("cnn", "fp32", ".pt2"),
        ("gpt", "fp32", ".pt2"),
        ("mlp", "bf16", ".pt2"),
        ("mlp", "int8", ".ts"),  # torch.export cannot take torch.ao's packed weights
        ("gpt", "int8", ".ts"),
    ],
)
def test_saved_torch_variant_round_trips(
    zoo: dict[str, dict], tmp_path: Path, name: str, variant: str, suffix: str
) -> None:
    model, x = zoo[name]["model"], zoo[name]["x"]
    model = {"fp32": model, "bf16": to_half(model, torch.bfloat16), "int8": quantize_torch_dynamic(model)}[variant]
    path = save_torch_model(model, x[:3], tmp_path / "model")
    assert path.suffix == suffix and path.exists()
    loaded = load_torch_model(path)
    for batch in (1, 6):
        expected = model(x[:batch]).detach()
        got = loaded(x[:batch])
        assert not got.requires_grad
        assert torch.equal(got, expected)
