"""The evaluate stage on its own: metrics equal scikit-learn's and those recomputed from the model's own
predictions, latency and throughput time what they say (the one harness the compress stage uses too), size and
parameters match the weights, the confusion matrix is a PNG; the language-modelling branch reports perplexity and
bits per byte."""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from torch import nn

import trainflow.core.compress
import trainflow.core.evaluate
from tests.conftest import tiny_raw
from tests.core.trained_support import Trained, train_and_evaluate
from trainflow.core.compress import compress
from trainflow.core.compression.measure import measure_speed
from trainflow.core.config import CompressConfig, MeasureConfig, config_from_dict
from trainflow.core.data.loaders import TokenWindows
from trainflow.core.evaluate import _serialized_size, evaluate
from trainflow.core.training.checkpoint import load_checkpoint
from trainflow.core.training.metrics import classification_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def wine(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """The tiny wine MLP, trained and evaluated once for the module."""
    return train_and_evaluate(tmp_path_factory.mktemp("wine"), config_from_dict(tiny_raw()))


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A small GPT on 6 KB of text, one epoch."""
    root = tmp_path_factory.mktemp("text")
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "five", "wizards"]
    rng = np.random.default_rng(0)
    (root / "corpus.txt").write_text(" ".join(rng.choice(words, size=1200)) + " ünïcödé\n", encoding="utf-8")
    raw = tiny_raw(train={"max_epochs": 1})
    raw["data"] = {"source": "text", "path": str(root / "corpus.txt"), "seq_len": 16}
    raw["model"] = {"name": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 16}
    return train_and_evaluate(root, config_from_dict(raw))


# --------------------------------------------------------------------------- metric arithmetic
def test_classification_metrics_on_known_predictions_with_a_class_never_predicted() -> None:
    y_true = np.array([0, 0, 1, 1, 2, 2, 2, 3])
    y_pred = np.array([0, 1, 1, 1, 2, 0, 2, 1])  # class 3 is never predicted: its precision counts as 0
    metrics = classification_metrics(y_true, y_pred, loss=0.25)
    # By hand: precision (1/2, 2/4, 2/2, 0), recall (1/2, 2/2, 2/3, 0/1), F1 (1/2, 2/3, 4/5, 0)
    assert metrics == pytest.approx(
        {"accuracy": 5 / 8, "precision_macro": 0.5, "recall_macro": 13 / 24, "f1_macro": 59 / 120, "loss": 0.25}
    )
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    assert (metrics["precision_macro"], metrics["recall_macro"], metrics["f1_macro"]) == pytest.approx(
        (precision, recall, f1)
    )
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))


def test_classification_metrics_of_perfect_predictions_are_one() -> None:
    y = np.array([2, 0, 1, 1, 0, 2])
    assert classification_metrics(y, y.copy(), loss=0.0) == {
        "accuracy": 1.0,
        "precision_macro": 1.0,
        "recall_macro": 1.0,
        "f1_macro": 1.0,
        "loss": 0.0,
    }


# ------------------------------------------------------------------------ timing and size helpers
def _sleeper(slow_calls: int, slow_s: float, fast_s: float) -> tuple[Callable[[np.ndarray], np.ndarray], list[int]]:
    """A predict that sleeps `slow_s` on its first `slow_calls` calls and `fast_s` after; the list counts calls."""
    calls = [0]

    def predict(x: np.ndarray) -> np.ndarray:
        calls[0] += 1
        time.sleep(slow_s if calls[0] <= slow_calls else fast_s)
        return x

    return predict, calls


def test_latency_times_each_call_after_the_warm_up() -> None:
    predict, calls = _sleeper(slow_calls=3, slow_s=0.2, fast_s=0.005)
    cfg = MeasureConfig(warmup=2, latency_calls=20, rounds=2, serving_batch=4, throughput_calls=2)
    speed = measure_speed({"m": predict}, np.zeros((3, 5), dtype=np.float32), cfg)["m"]
    assert calls[0] == 2 + 1 + 20 + 2, "warm-up at batch 1 and at the serving batch, then the timed calls"
    assert 5.0 <= speed.latency_ms_p50 <= speed.latency_ms_p95 < 200.0, "the 200 ms warm-up calls must not be timed"


def test_throughput_counts_samples_per_second_at_the_serving_batch_without_the_warm_up() -> None:
    predict, calls = _sleeper(slow_calls=2, slow_s=0.3, fast_s=0.01)
    cfg = MeasureConfig(warmup=1, latency_calls=20, rounds=1, serving_batch=8, throughput_calls=3)
    speed = measure_speed({"m": predict}, np.zeros((3, 5), dtype=np.float32), cfg)["m"]
    assert calls[0] == 1 + 1 + 20 + 3
    # 3 calls x 8 samples in >= 30 ms: at most 800/s; with a 300 ms warm-up counted it would be < 80/s
    assert 150.0 < speed.throughput <= 800.0


def test_the_trained_model_is_timed_as_the_compress_table_s_fp32_row(
    wine: Trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One harness, the same settings (compress.measure) and inputs for evaluate's figure and compress's fp32 row."""
    calls: list[tuple[list[str], MeasureConfig, np.ndarray, np.ndarray]] = []

    def spy(predicts: dict, test_x: np.ndarray, cfg: MeasureConfig) -> dict:
        calls.append((list(predicts), cfg, test_x, predicts["fp32"](test_x[:4])))
        return measure_speed(predicts, test_x, cfg)

    for module in (trainflow.core.evaluate, trainflow.core.compress):
        monkeypatch.setattr(module, "measure_speed", spy)
    off = {"enabled": False}
    cfg = CompressConfig.model_validate(wine.config.compress.model_dump() | {"pruning": off, "combinations": [],
                                        "structured_pruning": off, "distillation": off})  # fmt: skip
    evaluated = evaluate(wine.spec, cfg.measure, wine.trained, wine.store, "eval-again")
    compress(cfg, wine.spec, wine.trained, wine.store, "compress-fp32")
    (
        (evaluate_names, evaluate_cfg, evaluate_x, evaluate_out),
        (compress_names, compress_cfg, compress_x, compress_out),
    ) = calls
    assert evaluate_names == ["fp32"] and "fp32" in compress_names
    assert evaluate_cfg == compress_cfg == wine.config.compress.measure
    np.testing.assert_array_equal(evaluate_x, compress_x)
    np.testing.assert_array_equal(evaluate_out, compress_out)  # the same model, eager on the CPU
    assert evaluated.metrics == wine.evaluated.metrics


def test_serialized_size_is_the_size_of_the_saved_state_dict() -> None:
    model = nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 3))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert _serialized_size(model) == len(buffer.getvalue())
    assert _serialized_size(model) > (13 * 32 + 32 + 32 * 3 + 3) * 4  # float32 weights, plus the archive


# -------------------------------------------------------------------------- classification stage
def test_test_metrics_equal_those_of_the_models_own_predictions(wine: Trained) -> None:
    x, y = wine.test_split()
    assert y is not None and wine.evaluated.n_test == len(y) == 27
    with torch.no_grad():
        logits = wine.model()(torch.from_numpy(x))
    predicted = logits.argmax(dim=1).numpy()
    precision, recall, f1, _ = precision_recall_fscore_support(y, predicted, average="macro", zero_division=0)
    expected = {
        "accuracy": accuracy_score(y, predicted),
        "precision_macro": precision,
        "recall_macro": recall,
        "f1_macro": f1,
        "loss": F.cross_entropy(logits, torch.from_numpy(y)).item(),
    }
    assert wine.evaluated.metrics == pytest.approx(expected, rel=1e-5)
    assert wine.evaluated.metrics["accuracy"] > 0.85, "the tiny MLP learns wine"


def test_latency_throughput_parameters_and_size(wine: Trained) -> None:
    result = wine.evaluated
    assert 0 < result.latency_ms_p50 <= result.latency_ms_p95 < 1000
    assert result.throughput_per_s > 0
    model = wine.model()
    assert result.n_parameters == sum(p.numel() for p in model.parameters()) == wine.trained.n_parameters
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert result.size_bytes == pytest.approx(len(buffer.getvalue()), abs=300)


def test_the_confusion_matrix_png_is_in_the_store(wine: Trained) -> None:
    [uri] = wine.evaluated.plot_uris
    path = wine.store.local_path(uri)
    assert path == wine.store.root / "eval" / "confusion_matrix.png"
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert wine.evaluated.artifact_uris() == [uri]


# ------------------------------------------------------------------------ language modelling
def test_language_modelling_reports_perplexity_and_bits_per_byte(text: Trained) -> None:
    metrics = text.evaluated.metrics
    assert set(metrics) == {"loss", "perplexity", "bits_per_byte"}
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-12)
    assert metrics["bits_per_byte"] == pytest.approx(metrics["loss"] / math.log(2), rel=1e-12)
    assert 0 < metrics["bits_per_byte"] < 8, "a trained byte model beats the 8 bits of a uniform guess"
    assert text.evaluated.plot_uris == []

    tokens, _ = text.test_split()
    windows = TokenWindows(tokens, 16)
    x, y = windows.__getitems__(list(range(len(windows))))
    assert text.evaluated.n_test == len(windows)
    with torch.no_grad():
        loss = F.cross_entropy(text.model()(x).flatten(0, 1), y.flatten()).item()
    assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
    assert 0 < text.evaluated.latency_ms_p50 <= text.evaluated.latency_ms_p95 < 1000
    assert text.evaluated.throughput_per_s > 0


def test_the_doctor_finds_nothing_wrong_with_the_healthy_runs(wine: Trained, text: Trained) -> None:
    """The MLP and the GPT these tests train were watched (train.diagnostics is on by default): no finding."""
    for trained in (wine.trained, text.trained):
        assert trained.diagnosis_uri is not None and trained.findings == []


def test_a_diverged_language_model_is_reported_not_a_crash(text: Trained) -> None:
    weights = load_checkpoint(text.store.local_path(text.trained.checkpoint_uri))["model"]
    weights["norm.weight"] = weights["norm.weight"] * 1e5  # logits in the thousands: a loss far above 709 nats
    path = text.store.root / "diverged" / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": weights}, path)
    diverged = text.trained.model_copy(update={"checkpoint_uri": path.as_uri()})
    result = evaluate(text.spec, text.config.compress.measure, diverged, text.store, "diverged")
    assert result.metrics["loss"] > 710
    assert result.metrics["bits_per_byte"] == pytest.approx(result.metrics["loss"] / math.log(2))
    assert result.metrics["perplexity"] == pytest.approx(math.exp(50))  # capped as in the trainer's validation
