"""The compress stage on a small trained model: every variant built, saved, measured and compared; a variant
that fails is a row with its reason; a bad compress section fails before any work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import tiny_raw
from trainflow.core.compress import compress
from trainflow.core.compression.measure import held_out, task_metrics
from trainflow.core.compression.onnx_export import OrtPredictor
from trainflow.core.compression.quantization import load_torch_model
from trainflow.core.config import Config, config_from_dict
from trainflow.core.data.prepared import load_splits
from trainflow.core.errors import ConfigError
from trainflow.core.preflight import preflight
from trainflow.core.prepare_data import prepare_data
from trainflow.core.records import CompressResult
from trainflow.core.storage.store import LocalStore
from trainflow.core.train import train
from trainflow.core.training.spec import TrainingSpec

pytestmark = pytest.mark.slow  # every technique trains, exports and is measured: left out of `pytest -m 'not slow'`

LIGHT = {"measure": {"latency_calls": 20, "warmup": 2, "rounds": 2, "serving_batch": 32, "throughput_calls": 2},
         "structured_pruning": {"finetune_epochs": 2}, "distillation": {"max_epochs": 4}}  # fmt: skip


def _run(store: LocalStore, **compress_cfg: Any) -> tuple[Config, Any, CompressResult]:
    config = config_from_dict(tiny_raw(compress=LIGHT | compress_cfg))
    data = prepare_data(config.data, config.seed, store)
    spec = TrainingSpec.of(config, data)
    trained = train(spec, store, "train")
    return config, data, compress(config.compress, spec, trained, store, "compress")


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalStore, Any, CompressResult]:
    store = LocalStore(tmp_path_factory.mktemp("compress") / "artifacts")
    _, data, result = _run(store)
    return store, data, result


def test_every_configured_variant_is_measured_and_the_baseline_comes_first(compressed) -> None:
    _, _, result = compressed
    names = [v.name for v in result.variants]
    assert names == ["fp32", "fp32+onnx", "fp32+onnx_int8", "fp32+torch_int8", "pruned", "pruned_structured",
                     "distilled", "distilled+onnx_int8", "pruned_structured+onnx_int8"]  # fmt: skip
    for v in result.variants:
        assert v.status == "ok", v.reason
        assert v.size_bytes and v.params and v.metrics["accuracy"] > 0.5
        assert 0 < v.latency_ms_p50 <= v.latency_ms_p95 and v.throughput > 0
        assert v.runtime == ("onnxruntime" if "onnx" in v.format else "torch")
    by = {v.name: v for v in result.variants}
    assert by["pruned"].sparsity == pytest.approx(0.5, abs=1e-3)
    assert by["pruned_structured"].params < by["fp32"].params * 0.6  # channels really removed
    assert by["distilled"].params < by["fp32"].params
    assert by["fp32+onnx_int8"].details["int8"]["int8_weight_fraction"] >= 0.9
    assert by["fp32+torch_int8"].details["int8_layers"]
    assert by["fp32+onnx_int8"].size_bytes < by["fp32+onnx"].size_bytes  # a tiny model: the file overhead dominates


def test_the_recommended_variant_is_within_tolerance_and_the_table_is_written(compressed) -> None:
    store, _, result = compressed
    chosen, baseline = result.variant(result.recommended), result.variant("fp32")
    assert baseline.metrics["accuracy"] - chosen.metrics["accuracy"] <= 0.01
    assert chosen.latency_ms_p50 <= min(v.latency_ms_p50 for v in result.variants if v.status == "ok") * 1.05 or (
        result.recommended == "fp32"
    )
    table = store.local_path(result.table_uri).read_text()
    assert f"**{result.recommended}** (recommended)" in table and table.count("\n|") >= len(result.variants) + 1
    assert store.local_path(result.plot_uri).read_bytes()[:4] == b"\x89PNG"
    assert len(store.local_path(result.csv_uri).read_text().splitlines()) == len(result.variants) + 1


def test_each_saved_variant_loads_and_gives_the_metrics_in_the_table(compressed) -> None:
    store, data, result = compressed
    test = held_out(load_splits(store, data), data.spec.task, data.spec.seq_len)
    for v in result.variants:
        path = store.local_path(v.uri)
        if path.suffix == ".onnx":
            predict = OrtPredictor(path, threads=1)
        else:
            module = load_torch_model(path)

            def predict(x: np.ndarray, module=module) -> np.ndarray:
                import torch

                with torch.no_grad():
                    return module(torch.from_numpy(x)).float().numpy()

        metrics = task_metrics(predict, test)
        assert metrics["accuracy"] == pytest.approx(v.metrics["accuracy"]), v.name
        assert metrics["loss"] == pytest.approx(v.metrics["loss"], rel=1e-4, abs=1e-5), v.name


def test_a_variant_that_fails_is_reported_and_the_others_go_on(store: LocalStore, monkeypatch) -> None:
    import trainflow.core.compression.variants as variants

    real = variants.quantize_onnx_dynamic

    def unsupported(src: Path, dst: Path) -> Path:
        if "distilled" in str(dst):
            raise RuntimeError("no quantized kernel for op FancyGelu\nsecond line of a long trace")
        return real(src, dst)

    monkeypatch.setattr(variants, "quantize_onnx_dynamic", unsupported)
    _, _, result = _run(store, pruning={"enabled": False}, structured_pruning={"enabled": False},
                        combinations=["distilled+onnx_int8"])  # fmt: skip
    failed = result.variant("distilled+onnx_int8")
    assert failed.status == "failed" and failed.reason == "RuntimeError: no quantized kernel for op FancyGelu"
    assert result.variant("fp32+onnx_int8").status == "ok" and result.variant("distilled").status == "ok"
    assert result.recommended != "distilled+onnx_int8"
    assert "failed" in store.local_path(result.table_uri).read_text()


@pytest.mark.parametrize(
    ("compress_cfg", "message"),
    [
        ({"pruning": {"sparsity": 1.0}}, "compress.pruning.sparsity: 1.0 must be < 1.0"),
        ({"quantize": {}}, "compress.quantize: unknown key"),
        ({"combinations": ["distilled+int4"]}, "compress.combinations: 'distilled+int4' is not base+format"),
        ({"tolerance": {"accuracy_drop": 1.5}}, "compress.tolerance.accuracy_drop: 1.5 must be <= 1"),
        ({"structured_pruning": {"ratio": 0}}, "compress.structured_pruning.ratio: 0 must be > 0"),
        ({"distillation": {"temperature": -1}}, "compress.distillation.temperature: -1 must be > 0"),
    ],
)
def test_a_bad_compress_section_is_one_config_error(compress_cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        config_from_dict(tiny_raw(compress=compress_cfg))
    assert len(error.value.problems) == 1 and message in error.value.problems[0]


def _preflight_error(in_tmp: Path, **sections: Any) -> str:
    """The preflight's error for the tiny config with these sections replaced whole."""
    config = config_from_dict(tiny_raw() | sections | {"store": {"uri": str(in_tmp / "artifacts")}})
    with pytest.raises(ConfigError) as error:
        preflight(config)
    assert not (in_tmp / "artifacts").exists(), "nothing is written before the error"
    return str(error.value)


def test_a_student_larger_than_the_teacher_fails_in_the_preflight(in_tmp: Path) -> None:
    student = {"name": "mlp", "hidden_sizes": [64, 64]}
    message = _preflight_error(in_tmp, compress={"distillation": {"student": student}})
    assert message.startswith("compress.distillation.student: ") and "is not smaller than the teacher's" in message


def test_static_quantization_of_a_model_that_cannot_export_fails_in_the_preflight(in_tmp: Path) -> None:
    model = {"name": "factory", "factory": "tests.core.factories:unexportable_net"}
    message = _preflight_error(in_tmp, model=model, compress={"quantization": {"onnx_int8": "static"}})
    assert message.startswith("compress.quantization.onnx_int8: static quantization needs an ONNX export")
    assert "\n" not in message


def test_static_quantization_of_a_language_model_fails_in_the_preflight(in_tmp: Path) -> None:
    message = _preflight_error(in_tmp, data={"source": "text", "seq_len": 16},
                               model={"name": "gpt", "n_layer": 1, "n_embd": 16, "n_head": 2},
                               compress={"quantization": {"onnx_int8": "static"}})  # fmt: skip
    assert message.startswith("compress.quantization.onnx_int8: static quantization calibrates float inputs")
