"""Pruning: unstructured sparsity made permanent, structured pruning that really shrinks tensors and keeps
outputs whole, iterative rounds, the save/load round trip of pruned shapes, and bad arguments."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from trainflow.core.compression.pruning import (
    StructuredPruner,
    load_pruned,
    prune_structured,
    prune_unstructured,
    save_pruned,
    sparsity_report,
)
from trainflow.core.config import CNNConfig, GPTConfig, MLPConfig
from trainflow.core.data.spec import DataSpec
from trainflow.core.models import build_model

TABULAR = DataSpec(task="classification", input_shape=(13,), n_classes=3)
IMAGES = DataSpec(task="classification", input_shape=(1, 8, 8), n_classes=10)
TEXT = DataSpec(task="language_modeling", input_shape=(16,), n_classes=256)


def tiny_gpt(**options: Any) -> nn.Module:
    torch.manual_seed(0)
    return build_model(GPTConfig(**({"n_layer": 2, "n_head": 2, "n_embd": 16} | options)), TEXT)


def tokens(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 16), generator=torch.Generator().manual_seed(0))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return build_model(MLPConfig(hidden_sizes=[32, 16], norm="layernorm"), TABULAR)


def cnn(blocks: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return build_model(CNNConfig(channels=[16, 32], blocks_per_stage=blocks), IMAGES)


IMAGE_BATCH = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
ROW_BATCH = torch.randn(3, 13, generator=torch.Generator().manual_seed(0))
CASES = {
    "mlp": (mlp, ROW_BATCH, (3, 3)),
    "cnn-1block": (cnn, IMAGE_BATCH, (3, 10)),
    "cnn-2blocks": (lambda: cnn(2), IMAGE_BATCH, (3, 10)),
    "gpt-gelu": (tiny_gpt, tokens(), (2, 16, 256)),
    "gpt-swiglu": (lambda: tiny_gpt(mlp="swiglu", bias=True, norm="rmsnorm"), tokens(), (2, 16, 256)),
}


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


# --------------------------------------------------------------------------------- unstructured
@pytest.mark.parametrize("build", [mlp, cnn, tiny_gpt], ids=["mlp", "cnn", "gpt"])
def test_unstructured_reaches_the_sparsity_and_makes_it_permanent(build: Any) -> None:
    model = build()
    embedding = model.tok_emb.weight.detach().clone() if hasattr(model, "tok_emb") else None
    report = prune_unstructured(model, 0.6)
    assert abs(report.overall - 0.6) < 1e-3
    assert report == sparsity_report(model)
    weights = {name: m.weight for name, m in model.named_modules() if name in report.layers}
    zeros = sum(report.layers[n] * w.numel() for n, w in weights.items())
    assert zeros / sum(w.numel() for w in weights.values()) == pytest.approx(report.overall)
    assert report.n_parameters == sum(p.numel() for p in model.parameters())
    assert not any("weight_orig" in n or "weight_mask" in n for n, _ in model.named_parameters())
    assert not any("weight_mask" in n for n, _ in model.named_buffers())
    assert not any(m._forward_pre_hooks for m in model.modules())
    json.dumps(report.to_dict())
    if embedding is not None:  # the tied head is the embedding: neither listed nor pruned
        assert "lm_head" not in report.layers
        assert model.lm_head.weight is model.tok_emb.weight
        assert torch.equal(model.tok_emb.weight, embedding)
        assert model(tokens()).shape == (2, 16, 256)
    # pruning again with a larger target adds zeros on top (the target is the total)
    assert abs(prune_unstructured(model, 0.8).overall - 0.8) < 1e-3


def test_unstructured_model_still_runs_and_zero_sparsity_changes_nothing() -> None:
    model = cnn()
    before = copy.deepcopy(model.state_dict())
    assert prune_unstructured(model, 0.0).overall == 0.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    prune_unstructured(model, 0.5)
    assert model(IMAGE_BATCH).shape == (3, 10)


# ----------------------------------------------------------------------------------- structured
@pytest.mark.parametrize("case", list(CASES))
def test_structured_pruning_shrinks_tensors_and_keeps_outputs(case: str) -> None:
    build, batch, out_shape = CASES[case]
    model = build()
    model.train()
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    n_out = head.out_features
    before = shapes(model)
    report = prune_structured(model, batch[:1], 0.5)
    assert model.training  # the mode is restored after tracing
    assert head.out_features == n_out
    assert model(batch).shape == out_shape
    assert 0.1 < report.params_removed < 0.8  # the GPT keeps its embeddings and attention
    assert report.n_parameters == sum(p.numel() for p in model.parameters())
    after = shapes(model)
    if case.startswith("cnn"):
        convs = [n for n, s in before.items() if len(s) == 4]
        assert all(after[n][0] == before[n][0] // 2 for n in convs)  # out-channels halved
    if case == "mlp":
        assert after["net.1.weight"] == (16, 13) and after["net.5.weight"] == (8, 16)
    if case.startswith("gpt"):
        for name, shape in before.items():
            if ".ff." not in name:  # embeddings, attention, norms, residual stream untouched
                assert after[name] == shape, name
        assert model.lm_head.weight is model.tok_emb.weight
        ff = model.blocks[0].ff
        assert ff.down.in_features == 64 // 2  # 4 * 16 for GELU, 64 * ceil(8 * 16 / 3 / 64) for SwiGLU
        assert ff.up.out_features == ff.down.in_features * (2 if ff.swiglu else 1)


def test_swiglu_prunes_the_same_unit_in_gate_and_value() -> None:
    """The pruned model equals the original with the dropped hidden units' down columns zeroed."""
    model = tiny_gpt(mlp="swiglu").eval()
    for name, p in model.named_parameters():
        if ".ff." in name:
            nn.init.normal_(p, std=0.3)
    original = copy.deepcopy(model)
    prune_structured(model, tokens(1), 0.5)
    for block, old in zip(model.blocks, original.blocks, strict=True):
        h = old.ff.down.in_features
        rows = [int((old.ff.up.weight - r).abs().sum(1).argmin()) for r in block.ff.up.weight]
        kept = sorted(r for r in rows if r < h)
        assert sorted(r - h for r in rows if r >= h) == kept  # gate j kept <=> value j kept
        mask = torch.zeros(h)
        mask[kept] = 1.0
        with torch.no_grad():
            old.ff.down.weight.mul_(mask)
            assert torch.equal(block.ff.down.weight, old.ff.down.weight[:, kept])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()), original(tokens()))


@pytest.mark.parametrize("case", ["cnn-2blocks", "gpt-gelu"])
def test_iterative_rounds_reach_the_one_shot_shapes(case: str) -> None:
    build, batch, _ = CASES[case]
    one_shot, iterative = build(), build()
    one_shot_report = prune_structured(one_shot, batch[:1], 0.5)
    pruner = StructuredPruner(iterative, batch[:1], 0.5, rounds=3)
    removed = []
    while not pruner.done:
        removed.append(pruner.step().params_removed)
    assert removed == sorted(removed) and removed[0] > 0
    assert shapes(iterative) == shapes(one_shot)
    assert removed[-1] == pytest.approx(one_shot_report.params_removed)
    with pytest.raises(RuntimeError, match="round"):
        pruner.step()


@pytest.mark.parametrize("case", ["mlp", "cnn-2blocks", "gpt-swiglu"])
def test_save_and_load_pruned_round_trips_on_a_fresh_model(case: str, tmp_path: Path) -> None:
    build, batch, _ = CASES[case]
    model = build()
    prune_structured(model, batch[:1], 0.5)
    path = tmp_path / "pruned.pt"
    save_pruned(model, path)
    torch.load(path, weights_only=True)  # plain tensors and numbers only
    loaded = load_pruned(build(), path)
    assert shapes(loaded) == shapes(model)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(batch), model(batch))
    if case.startswith("gpt"):
        assert loaded.lm_head.weight is loaded.tok_emb.weight


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_bad_sparsity_is_refused(sparsity: float) -> None:
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        prune_unstructured(mlp(), sparsity)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.5])
def test_bad_ratio_is_refused(ratio: float) -> None:
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\)"):
        prune_structured(mlp(), ROW_BATCH[:1], ratio)
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        StructuredPruner(mlp(), ROW_BATCH[:1], 0.5, rounds=0)


def test_load_pruned_refuses_a_plain_state_dict(tmp_path: Path) -> None:
    torch.save(mlp().state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a pruned model"):
        load_pruned(mlp(), tmp_path / "plain.pt")
