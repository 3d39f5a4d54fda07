"""The model zoo: output shapes, GPT causality, tied embeddings and checkpointing, user factories,
and the ConfigErrors for a model that does not fit the data."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import tiny_raw
from trainflow.core.config import CNNConfig, GPTConfig, MLPConfig, ModelConfig, config_from_dict
from trainflow.core.data.spec import DataSpec
from trainflow.core.errors import ConfigError
from trainflow.core.models import build_model

TABULAR = DataSpec(task="classification", input_shape=(13,), n_classes=3, class_names=["a", "b", "c"])
IMAGES = DataSpec(task="classification", input_shape=(1, 8, 8), n_classes=10)
TEXT = DataSpec(task="language_modeling", input_shape=(16,), n_classes=256)
REPO = Path(__file__).resolve().parents[2]


def tiny_gpt(**options: Any) -> GPTConfig:
    return GPTConfig(**({"n_layer": 2, "n_head": 2, "n_embd": 16} | options))


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


# -------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("norm", ["none", "layernorm", "batchnorm"])
@pytest.mark.parametrize(("spec", "batch"), [(TABULAR, (5, 13)), (IMAGES, (5, 1, 8, 8))], ids=["tabular", "images"])
def test_mlp_gives_one_logit_per_class(norm: str, spec: DataSpec, batch: tuple[int, ...]) -> None:
    model = build_model(MLPConfig(hidden_sizes=[16, 8], norm=norm), spec)
    assert sum(isinstance(m, nn.LayerNorm) for m in model.modules()) == (2 if norm == "layernorm" else 0)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == (2 if norm == "batchnorm" else 0)
    for mode in (model.train, model.eval):
        mode()
        assert model(torch.randn(batch)).shape == (5, spec.n_classes)


def test_cnn_gives_one_logit_per_class_on_8x8_images() -> None:
    model = build_model(CNNConfig(channels=[8, 16], blocks_per_stage=2), IMAGES)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].in_channels == 1
    assert sum(m.kernel_size == (3, 3) for m in convs) == 1 + 2 * 2 * 2  # stem + 2 stages x 2 blocks x 2 convs
    for mode in (model.train, model.eval):
        mode()
        assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_gpt_gives_vocabulary_logits_per_position(norm: str, mlp: str, bias: bool) -> None:
    model = build_model(tiny_gpt(norm=norm, mlp=mlp, bias=bias), TEXT)
    norm_type = nn.LayerNorm if norm == "layernorm" else nn.RMSNorm
    assert sum(isinstance(m, norm_type) for m in model.modules()) == 2 * 2 + 1
    with_bias = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.LayerNorm)) and m is not model.lm_head]
    assert all((m.bias is not None) == bias for m in with_bias)
    assert model.blocks[0].ff.up.out_features == (2 * 64 if mlp == "swiglu" else 4 * 16)
    for length in (16, 5):
        assert model(tokens(3, length)).shape == (3, length, 256)


# ---------------------------------------------------------------------------------------- GPT
@pytest.mark.parametrize("options", [{}, {"norm": "rmsnorm", "mlp": "swiglu", "bias": True}], ids=["gpt2", "llama"])
def test_gpt_is_causal(options: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_gpt(**options), TEXT).eval()
    idx = tokens(2, 16)
    with torch.no_grad():
        logits = model(idx)
        for t in (0, 7, 14):
            changed = idx.clone()
            changed[:, t + 1 :] = (changed[:, t + 1 :] + 1 + torch.arange(16 - t - 1)) % 256
            other = model(changed)
            torch.testing.assert_close(other[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-6)
            assert not torch.allclose(other[:, t + 1 :], logits[:, t + 1 :], atol=1e-4), "later positions see it"


def test_gpt_ties_input_and_output_embeddings() -> None:
    model = build_model(tiny_gpt(), TEXT)
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.tok_emb.weight.shape == (256, 16)
    names = [name for name, _ in model.named_parameters()]
    assert "tok_emb.weight" in names and "lm_head.weight" not in names  # one parameter, counted once


@pytest.mark.parametrize("options", [{}, {"norm": "rmsnorm", "mlp": "swiglu", "bias": True}], ids=["gpt2", "llama"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(options: dict[str, Any]) -> None:
    def loss_and_grads(checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(3)
        model = build_model(tiny_gpt(activation_checkpointing=checkpointing, dropout=0.0, **options), TEXT).train()
        idx = tokens(4, 16, seed=1)
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), idx[:, 1:].reshape(-1))
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters()}

    loss, grads = loss_and_grads(checkpointing=False)
    loss_ckpt, grads_ckpt = loss_and_grads(checkpointing=True)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-5)
    assert grads_ckpt.keys() == grads.keys()
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=0, atol=1e-5, msg=name)


def test_gpt_rejects_a_sequence_longer_than_its_block_size() -> None:
    model = build_model(tiny_gpt(), TEXT)
    with pytest.raises(ValueError, match=r"^sequence of length 17 is longer than the model's block_size 16$"):
        model(tokens(1, 17))


# ---------------------------------------------------------------------------------- factories
@pytest.fixture
def repo_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """`tests.core.factories` is importable however pytest was started."""
    monkeypatch.syspath_prepend(str(REPO))


def factory_model(factory: str, **params: Any) -> ModelConfig:
    raw = tiny_raw()
    raw["model"] = {"factory": factory, "params": params}
    return config_from_dict(raw).model


@pytest.mark.usefixtures("repo_importable")
@pytest.mark.parametrize(("params", "hidden"), [({}, 8), ({"hidden": 5}, 5)])
def test_factory_model_is_built_with_the_spec_and_params(params: dict[str, Any], hidden: int) -> None:
    model = build_model(factory_model("tests.core.factories:tiny_net", **params), TABULAR)
    assert model.spec == TABULAR
    assert model.net[1].in_features == 13 and model.net[1].out_features == hidden
    assert model(torch.randn(2, 13)).shape == (2, 3)
    image_model = build_model(factory_model("tests.core.factories:tiny_net", **params), IMAGES)
    assert image_model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


BAD_FACTORIES = [
    pytest.param(
        "tests.core.no_such_module:tiny_net",
        {},
        r"model\.factory: cannot import 'tests\.core\.no_such_module:tiny_net' \(No module named",
        id="missing module",
    ),
    pytest.param(
        "tests.core.factories:no_such_function",
        {},
        r"model\.factory: cannot import 'tests\.core\.factories:no_such_function' \(.*no_such_function",
        id="missing function",
    ),
    pytest.param(
        "tests.core.factories:tiny_net",
        {"width": 4},
        r"model\.params: tests\.core\.factories:tiny_net\(spec, \*\*params\) does not accept them \(.*'width'",
        id="unknown param",
    ),
    pytest.param(
        "tests.core.factories:not_a_module",
        {},
        r"model\.factory: 'tests\.core\.factories:not_a_module' returned dict, not a torch\.nn\.Module",
        id="not a module",
    ),
]


@pytest.mark.usefixtures("repo_importable")
@pytest.mark.parametrize(("factory", "params", "message"), BAD_FACTORIES)
def test_bad_factory_raises_config_error(factory: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="^" + message):
        build_model(factory_model(factory, **params), TABULAR)


# ------------------------------------------------------------------------------ model vs data
IS_LM = "is for language modelling (data.source: text)"
MISMATCHES = [
    pytest.param(CNNConfig(), TABULAR, "model.name: 'cnn' needs image data (C, H, W), such as data.name: digits, "
                 "but each sample of this data has 1 dimension(s); use mlp", id="cnn"),
    pytest.param(tiny_gpt(), TABULAR, f"model.name: 'gpt' {IS_LM} but the data is for classification; "
                 "use data.source: text", id="gpt"),
    pytest.param(MLPConfig(), TEXT, f"model.name: 'mlp' is for classification but the data {IS_LM}; "
                 "use gpt, or a classification data source", id="mlp"),
    pytest.param(CNNConfig(), TEXT, f"model.name: 'cnn' is for classification but the data {IS_LM}; "
                 "use gpt, or a classification data source", id="cnn-lm"),
]  # fmt: skip


@pytest.mark.parametrize(("cfg", "spec", "message"), MISMATCHES)
def test_model_that_does_not_fit_the_data_raises_config_error(cfg: Any, spec: DataSpec, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        build_model(cfg, spec)


@pytest.mark.parametrize("task", ["classification", "language_modeling"])
def test_the_evaluation_reports_exactly_the_metrics_a_config_may_monitor(task: str) -> None:
    """`check_metric` (run by the preflight, before torch loads) and `pass_metrics` (run by the loop) agree."""
    from trainflow.core.data.spec import metric_names
    from trainflow.core.training.metrics import EvalPass, pass_metrics

    reported = pass_metrics(EvalPass(loss=0.5, n_targets=10, correct=7), task, "val")  # type: ignore[arg-type]
    assert list(reported) == metric_names(task)  # type: ignore[arg-type]
    assert reported["val/loss"] == 0.5
