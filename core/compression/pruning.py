"""Weight pruning: unstructured (zeros in place) and structured (channels and neurons really removed).

Unstructured pruning (`prune_unstructured`) zeroes the smallest-magnitude weights globally (Han et al. 2015);
tensors keep their shape, so it saves memory or time only with sparse storage or kernels. Structured pruning
(`StructuredPruner`, `prune_structured`) removes whole output channels and hidden units with Torch-Pruning's
dependency graph (Fang et al. 2023), so tensors shrink and a plain forward gets faster. A structurally pruned
model no longer matches its config's shapes: keep it with `save_pruned` and rebuild it with `load_pruned`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune

from trainflow.core.models.gpt import FeedForward

_PRUNABLE = (nn.Linear, nn.Conv2d)
# Module attributes that describe tensor shapes; `load_pruned` sets them so a module's repr and any
# shape-dependent forward (LayerNorm's normalized_shape, GroupNorm's num_channels) match the loaded tensors.
_SHAPE_ATTRS = (
    "in_features",
    "out_features",
    "in_channels",
    "out_channels",
    "num_features",
    "normalized_shape",
    "num_channels",
    "num_embeddings",
    "embedding_dim",
)
_FORMAT = "trainflow-pruned/1"


@dataclass(frozen=True)
class SparsityReport:
    """Zero fractions of a model's prunable weights and its parameter count (JSON friendly via `to_dict`).

    `overall` and `layers` count exact zeros in nn.Linear and nn.Conv2d weights (a weight tied to an
    embedding, such as the GPT's lm_head, is not a prunable layer). `n_parameters` counts every parameter
    once, tied ones included once. `params_removed` is the fraction of parameters structured pruning took
    out (0.0 for unstructured pruning, which only zeroes them).
    """

    overall: float
    layers: dict[str, float]
    n_parameters: int
    params_removed: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """nn.Linear and nn.Conv2d layers by name, leaving out any whose weight is an embedding's (tied heads)."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    seen: set[int] = set()
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, _PRUNABLE) and id(module.weight) not in embedding_weights | seen:
            seen.add(id(module.weight))
            layers.append((name, module))
    return layers


def _n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def sparsity_report(model: nn.Module) -> SparsityReport:
    """Fraction of zero weights overall and per prunable layer, and the model's parameter count."""
    layers, zeros, total = {}, 0, 0
    for name, module in _prunable_layers(model):
        weight = module.weight.detach()
        n_zero = int((weight == 0).sum())
        layers[name] = n_zero / weight.numel()
        zeros, total = zeros + n_zero, total + weight.numel()
    return SparsityReport(overall=zeros / total if total else 0.0, layers=layers, n_parameters=_n_parameters(model))


def prune_unstructured(model: nn.Module, sparsity: float) -> SparsityReport:
    """Zero the `sparsity` fraction of smallest-|w| weights, ranked globally over all prunable layers; in place.

    Global L1 ranking lets layers with many redundant weights give up more than small ones (Lightning's
    ModelPruning and Han et al. prune every layer, the classifier included; so do we). A tied GPT head is
    left out: its weight is the token embedding, which is not pruned. `sparsity` is the total target, so
    calling again with a larger value prunes further (existing zeros rank first). The masks are made
    permanent: plain `weight` parameters with zeros, no `weight_orig`, `weight_mask` or hooks.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) (the fraction of weights to zero), got {sparsity}")
    targets = [(module, "weight") for _, module in _prunable_layers(model)]
    if sparsity > 0 and targets:
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
        for module, name in targets:
            prune.remove(module, name)
    return sparsity_report(model)


def _output_layers(model: nn.Module, example_input: torch.Tensor) -> list[nn.Module]:
    """The last nn.Linear or nn.Conv2d that runs in a forward pass: it makes the outputs (class logits)."""
    called: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda module, _inputs, _output: called.append(module))
        for m in model.modules()
        if isinstance(m, _PRUNABLE)
    ]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    return called[-1:]


class StructuredPruner:
    """Removes the `ratio` fraction of channels / hidden units in every prunable group, over `rounds` steps.

    Channels are ranked by the L2 norm of all weights they own in their dependency group (Torch-Pruning's
    GroupMagnitudeImportance), and each group is pruned by the same ratio (local, not global, ranking: no
    layer collapses). Coupled layers stay consistent: a ResNet block's residual sum prunes the same
    channels in both branches, BatchNorm and LayerNorm follow their layer. The layer that makes the
    model's outputs (classifier logits) keeps all its outputs.

    For the GPT only the feed-forward hidden units are pruned (FeedForward.up outputs, down inputs; for
    SwiGLU the same unit in the gate and the value half, ranked together). The vocabulary, embeddings,
    the residual stream (n_embd) and attention (heads and head dims) are left whole: the tied head, the
    residual adds and `view(B, T, n_head, C // n_head)` all depend on them.

    Each `step()` replaces the pruned parameters, so rebuild the optimizer after it before fine-tuning.
    Rounds follow a linear schedule: after round k of n, ratio * k / n of the channels are gone.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor, ratio: float, rounds: int = 1):
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"ratio must be in (0, 1) (the fraction of channels to remove), got {ratio}")
        if rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {rounds}")
        self.model, self.ratio, self.rounds = model, ratio, rounds
        self.rounds_done = 0
        self._n_before = _n_parameters(model)
        ffs = [m for m in model.modules() if isinstance(m, FeedForward)]
        if ffs:
            keep = {ff.up for ff in ffs}
            ignored: list[nn.Module | nn.Parameter] = [
                m for m in model.modules() if isinstance(m, (*_PRUNABLE, nn.Embedding)) and m not in keep
            ]
            # Torch-Pruning has no RMSNorm pruner and warns about its weights as loose parameters: declare
            # them (dim 0) and keep them, as the residual stream they scale is not pruned anyway.
            rms = [m.weight for m in model.modules() if isinstance(m, nn.RMSNorm) and m.weight is not None]
            ignored += rms
            unwrapped = [(w, 0) for w in rms]
            groups = {ff.up: 2 for ff in ffs if ff.swiglu}  # up's output is [gate | value]: unit j is j and h + j
        was_training = model.training  # Torch-Pruning traces in eval mode and leaves the model there
        try:
            if not ffs:
                ignored, groups, unwrapped = _output_layers(model.eval(), example_input), {}, []
            self._pruner = tp.pruner.BasePruner(
                model,
                example_input,
                importance=tp.importance.GroupMagnitudeImportance(p=2),
                pruning_ratio=ratio,
                iterative_steps=rounds,
                ignored_layers=ignored,
                in_channel_groups={},  # fresh dicts: Torch-Pruning writes into its shared mutable defaults
                out_channel_groups=groups,
                unwrapped_parameters=unwrapped,
            )
        finally:
            model.train(was_training)

    @property
    def done(self) -> bool:
        return self.rounds_done >= self.rounds

    def step(self) -> SparsityReport:
        """Prune one round in place; the report after it."""
        if self.done:
            raise RuntimeError(f"all {self.rounds} pruning round(s) are done")
        self._pruner.step()
        self.rounds_done += 1
        return self.report()

    def report(self) -> SparsityReport:
        """The model's sparsity now, with the fraction of its parameters removed so far."""
        removed = 1.0 - _n_parameters(self.model) / self._n_before
        return dataclasses.replace(sparsity_report(self.model), params_removed=removed)


def prune_structured(model: nn.Module, example_input: torch.Tensor, ratio: float) -> SparsityReport:
    """One-shot structured pruning of `ratio` of the channels / hidden units, in place (see StructuredPruner)."""
    return StructuredPruner(model, example_input, ratio).step()


def save_pruned(model: nn.Module, path: str | Path) -> None:
    """Save a (structurally pruned) model as its state dict plus its layers' shape attributes.

    Only tensors and plain numbers are stored, so `load_pruned` reads it with `weights_only=True`.
    (Torch-Pruning's own `tp.state_dict` pickles every module object, which needs `weights_only=False`
    and replaces the fresh model's submodules with the unpickled ones.)
    """
    shapes = {}
    for name, module in model.named_modules():
        attrs = {a: getattr(module, a) for a in _SHAPE_ATTRS if isinstance(getattr(module, a, None), (int, tuple))}
        if attrs:
            shapes[name] = attrs
    torch.save({"format": _FORMAT, "state_dict": model.state_dict(), "shapes": shapes}, path)


def load_pruned(fresh_model: nn.Module, path: str | Path) -> nn.Module:
    """Give a freshly built model of the same config the saved pruned shapes and weights; returns it.

    Parameters and buffers whose saved shape differs are replaced (tied parameters stay tied), shape
    attributes are set, then the state dict loads strictly.
    """
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a pruned model saved by save_pruned")
    state: dict[str, torch.Tensor] = saved["state_dict"]
    replaced: dict[int, nn.Parameter] = {}
    for name, module in fresh_model.named_modules():
        prefix = f"{name}." if name else ""
        for key, param in list(module._parameters.items()):
            saved_tensor = state.get(prefix + key)
            if param is None or saved_tensor is None or saved_tensor.shape == param.shape:
                continue
            if id(param) not in replaced:
                fresh = torch.empty(saved_tensor.shape, dtype=param.dtype, device=param.device)
                replaced[id(param)] = nn.Parameter(fresh, requires_grad=param.requires_grad)
            setattr(module, key, replaced[id(param)])
        for key, buffer in list(module._buffers.items()):
            saved_tensor = state.get(prefix + key)
            if buffer is not None and saved_tensor is not None and saved_tensor.shape != buffer.shape:
                module._buffers[key] = torch.empty(saved_tensor.shape, dtype=buffer.dtype, device=buffer.device)
        for attr, value in saved["shapes"].get(name, {}).items():
            setattr(module, attr, value)
    fresh_model.load_state_dict(state)
    return fresh_model
