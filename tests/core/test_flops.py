"""MFU arithmetic: the GPT FLOPs-per-token formula, our GPT's count, the peak table and its override."""

from __future__ import annotations

import pytest
import torch

from trainflow.core.config import GPTConfig, MLPConfig
from trainflow.core.data.spec import DataSpec
from trainflow.core.models import build_model
from trainflow.core.training.flops import (
    PEAK_BF16_TFLOPS,
    PEAK_TFLOPS_ENV,
    gpt_flops_per_token,
    mfu,
    model_flops_per_token,
    peak_flops,
    peak_flops_for_name,
)

TEXT = DataSpec(task="language_modeling", input_shape=(32,), n_classes=256)


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PEAK_TFLOPS_ENV, raising=False)


def test_formula_on_a_hand_computed_example() -> None:
    # N = 1000 - 100 = 900: 6N = 5,400; 12 * L * H*Q * T = 12 * 2 * 8 * 16 = 3,072
    assert gpt_flops_per_token(1000, n_layer=2, n_embd=8, seq_len=16, n_params_embedding=100) == 8472
    assert gpt_flops_per_token(1000, n_layer=2, n_embd=8, seq_len=16) == 6000 + 3072


def test_gpt2_small_shape_does_about_0_86_gflops_per_token() -> None:
    # GPT-2 small (12 x 768, vocab 50304, T 1024), built on the meta device: no memory, no init cost
    with torch.device("meta"):
        model = build_model(
            GPTConfig(n_layer=12, n_head=12, n_embd=768),
            DataSpec(task="language_modeling", input_shape=(1024,), n_classes=50304),
        )
    n = sum(p.numel() for p in model.parameters()) - 1024 * 768
    assert 123e6 < n < 125e6  # "124M"
    flops = model_flops_per_token(model, seq_len=1024)
    assert flops == 6 * n + 12 * 12 * 768 * 1024
    assert 0.85e9 < flops < 0.86e9


@pytest.mark.parametrize("options", [{}, {"mlp": "swiglu", "norm": "rmsnorm", "bias": True}], ids=["gpt2", "llama"])
def test_our_gpt_counts_its_params_except_the_position_embedding(options: dict[str, object]) -> None:
    model = build_model(GPTConfig(n_layer=3, n_head=2, n_embd=16, **options), TEXT)
    n_params = sum(p.numel() for p in model.parameters())  # the tied token embedding / head counted once
    n = n_params - 32 * 16  # minus the (block_size x n_embd) position embedding
    assert n == sum(p.numel() for name, p in model.named_parameters() if not name.startswith("pos_emb"))
    expected = 6 * n + 12 * 3 * 16 * 24
    assert model_flops_per_token(model, seq_len=24) == expected
    assert model_flops_per_token(torch.compile(model), seq_len=24) == expected  # inside an OptimizedModule


def test_models_other_than_the_gpt_have_no_flops_figure() -> None:
    spec = DataSpec(task="classification", input_shape=(13,), n_classes=3)
    assert model_flops_per_token(build_model(MLPConfig(hidden_sizes=[8]), spec), seq_len=1) is None


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H200", 989),
        ("NVIDIA H200 NVL", 835),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A10G", 70),
        ("NVIDIA A10", 125),
        ("NVIDIA L40S", 362),
        ("NVIDIA L4", 121),
        ("NVIDIA GeForce RTX 4090", 165),
    ],
)
def test_the_most_specific_name_wins(name: str, tflops: float) -> None:
    assert peak_flops_for_name(name) == tflops * 1e12


@pytest.mark.parametrize("name", ["Tesla V100-SXM2-16GB", "Tesla T4", "NVIDIA Quadro P1000"])
def test_gpus_without_bf16_tensor_cores_or_unknown_have_no_peak(name: str) -> None:
    assert peak_flops_for_name(name) is None


def test_no_key_is_shadowed_by_an_earlier_one() -> None:
    keys = [key for key, _ in PEAK_BF16_TFLOPS]
    for i, key in enumerate(keys):
        assert not [earlier for earlier in keys[:i] if earlier.lower() in key.lower()], key


def test_cpu_has_no_peak_even_with_the_override(monkeypatch: pytest.MonkeyPatch) -> None:
    assert peak_flops(torch.device("cpu")) is None
    monkeypatch.setenv(PEAK_TFLOPS_ENV, "100")
    assert peak_flops(torch.device("cpu")) is None


def test_the_environment_overrides_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_flops(torch.device("cuda")) == 756e12
    monkeypatch.setenv(PEAK_TFLOPS_ENV, "400.5")
    assert peak_flops(torch.device("cuda")) == 400.5e12
    assert peak_flops(torch.device("mps")) == 400.5e12
    monkeypatch.setenv(PEAK_TFLOPS_ENV, "fast")
    with pytest.raises(ValueError, match=PEAK_TFLOPS_ENV):
        peak_flops(torch.device("cuda"))


def test_mfu_is_achieved_over_peak() -> None:
    # 500k tokens/s x 0.86 GFLOP/token = 430 TFLOP/s, on a 989 TFLOP/s GPU
    assert mfu(500_000, 0.86e9, 989e12) == pytest.approx(430 / 989)
