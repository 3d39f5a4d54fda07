"""Per-layer figures of one optimizer step for the training doctor (diagnostics.py): activation statistics from
forward hooks, gradient norms once the step's gradients are final, and the update/weight ratio across the update.

A layer is a module owning a trainable parameter (`requires_grad`: a fine-tune's frozen backbone is not measured,
so it is never "vanishing"). Hooks exist only from `arm` (before the measured step's forward passes) to
`after_backward` (its gradients final), so other steps, and validation, pay nothing. Everything stays on the
device until `finish`, which stacks the figures into one tensor and copies that to the host once.

The statistics are those of the step's first micro-batch. Dead units are seen at a layer's input: a unit (channel
of a convolution or batch norm, else the last dimension) that was never non-zero there over the window belongs to
the trainable layer the forward pass ran just before (the one whose output, through its activation, feeds it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

SATURATION_MARGIN = 0.01  # a tanh within 0.01 of -1 or 1, a sigmoid within 0.01 of 0 or 1
_SATURATING = (nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Softsign)
_CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)  # units along dim 1, else the last


@dataclass
class Measured:
    """One measurement, on the host."""

    step: int
    # layer -> out_mean, out_std (its output), act_zero_share (share of exact zeros in what the next layer receives:
    # after its activation), grad_norm, grad_rms, update_ratio
    layers: dict[str, dict[str, float]]
    loop: dict[str, float]  # the step's own figures read in the same copy (its loss)
    order: list[str]  # the trainable layers in the order the forward pass ran them
    kinds: dict[str, str]  # layer -> its module's class name
    dead: dict[str, float] = field(default_factory=dict)  # layer -> share of its units never active (window's end)
    saturated: dict[str, tuple[str, float]] = field(default_factory=dict)  # layer -> (activation, share at bounds)


class LayerProbe:
    """Measures `module`'s trainable layers over one step: `arm`, the step's forward passes, `after_backward`,
    the update, `finish`. `activations` / `gradients` off: no forward hooks (torch.compile) / no gradient and update
    figures (FSDP, whose sharded parameters would need a collective)."""

    def __init__(self, module: nn.Module, activations: bool = True, gradients: bool = True):
        self.module, self.activations, self.gradients = module, activations, gradients
        self.handles: list[RemovableHandle] = []
        self.armed = self.measuring = False
        self.active: dict[str, torch.Tensor] = {}  # consumer layer -> its input units seen non-zero in the window
        self.producer: dict[str, str] = {}  # consumer layer -> the trainable layer run just before it

    def arm(self) -> None:
        """Take the trainable layers as they are now and hook them for the next step's forward passes."""
        self.close()
        named = [(n, m) for n, m in self.module.named_modules() if next(m.parameters(recurse=False), None) is not None]
        trainable = {n: [p for p in m.parameters(recurse=False) if p.requires_grad] for n, m in named}
        self.params = {n: ps for n, ps in trainable.items() if ps}
        self.kinds = {n: type(m).__name__ for n, m in named if n in self.params}
        self.stats: dict[str, tuple[torch.Tensor, int]] = {}  # layer -> ([sum, sum of squares], count)
        self.fed: dict[str, tuple[torch.Tensor, int]] = {}  # producer -> (zeros at the next layer's input, count)
        self.saturation: dict[str, tuple[torch.Tensor, int, str | None]] = {}  # activation -> (at bounds, n, layer)
        self.order: list[str] = []
        self.seen: set[str] = set()  # layers whose first call of the step was measured
        self.last: str | None = None  # the trainable layer whose forward ran last
        if self.activations:
            for name, module in named:
                hook = self._layer_hook if name in self.params else self._frozen_hook
                self.handles.append(module.register_forward_hook(partial(hook, name)))
            for name, module in self.module.named_modules():
                if isinstance(module, _SATURATING) and not isinstance(module, nn.ReLU6):  # ReLU6's 0 is not a bound
                    self.handles.append(module.register_forward_hook(partial(self._saturation_hook, name)))
        self.armed = True

    def after_backward(self) -> None:
        """The step's gradients are final and the weights not yet updated: remove the hooks, take the gradient
        norms and a copy of the weights (on the device)."""
        self._remove_hooks()
        self.armed, self.measuring = False, True
        if not self.gradients:
            return
        self.flat = [p for ps in self.params.values() for p in ps]
        grads = [p.grad if p.grad is not None else torch.zeros((), device=p.device) for p in self.flat]
        self.grad_sq = _per_layer_sq(torch._foreach_norm(grads), self.params)
        self.before = [p.detach().clone() for p in self.flat]

    def finish(self, step: int, dead: bool, loop: dict[str, torch.Tensor] | None = None) -> Measured:
        """After the update: the step's figures on the host, in one device-to-host copy; with `dead`, the window's
        dead-unit shares too (and a new window starts); `loop`: the step's own figures (its loss) to read with them."""
        parts: list[torch.Tensor] = [torch.stack([v.detach().float() for v in loop.values()])] if loop else []
        layout: list[tuple[str, list[str]]] = [("loop", list(loop))] if loop else []  # (what, names) of each part
        act = [n for n in self.order if n in self.stats]
        if act:
            parts.append(torch.stack([_moments(*self.stats[n]) for n in act]))  # (L, 2): mean, std
            layout.append(("out", act))
        fed = [n for n in self.fed if n in self.params]
        if fed:
            parts.append(torch.stack([self.fed[n][0].float() / self.fed[n][1] for n in fed]))
            layout.append(("fed", fed))
        if self.gradients and self.measuring:
            names = list(self.params)
            now = [p.detach() for p in self.flat]
            update_sq = _per_layer_sq(torch._foreach_norm(torch._foreach_sub(now, self.before)), self.params)
            weight_sq = _per_layer_sq(torch._foreach_norm(self.before), self.params)
            ratio = (update_sq / weight_sq.clamp_min(1e-24)).sqrt()
            parts.append(torch.stack([self.grad_sq.sqrt(), ratio], dim=1))  # (L, 2)
            layout.append(("grad", names))
            self.before = []
        sat = [n for n in self.saturation if self.saturation[n][2] is not None]
        if sat:
            parts.append(torch.stack([self.saturation[n][0] / self.saturation[n][1] for n in sat]))
            layout.append(("sat", sat))
        consumers = [c for c in self.active if self.producer.get(c) in self.params] if dead else []
        if consumers:
            parts.append(torch.stack([1 - self.active[c].float().mean() for c in consumers]))
            layout.append(("dead", [self.producer[c] for c in consumers]))
        if dead:
            self.active, self.producer = {}, {}
        values = torch.cat([p.reshape(-1).float() for p in parts]).tolist() if parts else []  # the one copy
        self.measuring = False
        return self._parse(step, values, layout)

    def close(self) -> None:
        """Remove any hooks left (a step that never reached its update)."""
        self._remove_hooks()
        self.armed = self.measuring = False

    # ------------------------------------------------------------------------------------------- hooks
    def _layer_hook(self, name: str, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        # The step's first micro-batch only; each tensor is read twice at most (the output's var_mean; the input's
        # != 0 and its per-unit count).
        if name in self.seen:
            self.last = name
            return
        self.seen.add(name)
        out = output[0] if isinstance(output, tuple | list) else output
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
            o, n = out.detach(), out.numel()
            var, mean = torch.var_mean(o if o.dtype in (torch.float32, torch.float64) else o.float(), correction=0)
            self.stats[name] = (torch.stack([mean * n, (var + mean.square()) * n]).float(), n)  # sum, sum of squares
            self.order.append(name)
        x = inputs[0] if inputs else None
        if self.last is not None and isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 2:
            unit = 1 if isinstance(module, _CHANNEL_FIRST) else x.dim() - 1
            nonzero = (x.detach() != 0).sum(dim=[d for d in range(x.dim()) if d != unit])  # (units,): non-zeros each
            seen = self.active.get(name)
            active = nonzero > 0
            self.active[name] = active if seen is None or seen.shape != active.shape else seen | active
            self.producer[name] = self.last
            if self.last not in self.fed:  # a layer feeding two: the first
                self.fed[self.last] = (x.numel() - nonzero.sum(), x.numel())
        self.last = name

    def _frozen_hook(self, name: str, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        self.last = None  # what a frozen layer feeds is not a trainable layer's output

    def _saturation_hook(self, name: str, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not isinstance(output, torch.Tensor) or name in self.saturation:  # the first micro-batch only
            return
        low, high = _bounds(module)
        y = output.detach()
        at = ((y <= low + SATURATION_MARGIN) | (y >= high - SATURATION_MARGIN)).sum().float()
        self.saturation[name] = (at, y.numel(), self.last)

    def _remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _parse(self, step: int, values: list[float], layout: list[tuple[str, list[str]]]) -> Measured:
        m = Measured(step, {}, {}, list(self.order), dict(self.kinds))
        i = 0
        for what, names in layout:
            width = {"out": 2, "grad": 2}.get(what, 1)
            for name in names:
                row = values[i : i + width]
                i += width
                if what == "loop":
                    m.loop[name] = row[0]
                elif what == "out":
                    m.layers.setdefault(name, {}).update(out_mean=row[0], out_std=row[1])
                elif what == "fed":
                    m.layers.setdefault(name, {})["act_zero_share"] = row[0]
                elif what == "grad":
                    numel = sum(p.numel() for p in self.params[name])
                    m.layers.setdefault(name, {}).update(grad_norm=row[0], grad_rms=row[0] / numel**0.5,
                                                         update_ratio=row[1])  # fmt: skip
                elif what == "sat":
                    layer = self.saturation[name][2]
                    assert layer is not None, "only activations a trainable layer feeds are reported"
                    m.saturated[layer] = (f"{name} ({type(self.module.get_submodule(name)).__name__})", row[0])
                else:
                    m.dead[name] = max(row[0], m.dead.get(name, 0.0))  # a layer feeding two: the worse
        return m


def _moments(sums: torch.Tensor, count: int) -> torch.Tensor:
    """[mean, std] from [sum, sum of squares] over `count` values (on the device)."""
    mean = sums[0] / count
    return torch.stack([mean, (sums[1] / count - mean.square()).clamp_min(0).sqrt()])


def _per_layer_sq(norms: list[torch.Tensor] | tuple[torch.Tensor, ...], params: dict[str, list[Any]]) -> torch.Tensor:
    """Per-parameter norms -> each layer's sum of squared norms, (L,), in `params`' order."""
    squares = torch.stack([n.float() for n in norms]).square()
    sizes = [len(ps) for ps in params.values()]
    return torch.stack([chunk.sum() for chunk in torch.split(squares, sizes)])


def _bounds(module: nn.Module) -> tuple[float, float]:
    if isinstance(module, nn.Hardtanh):
        return float(module.min_val), float(module.max_val)
    if isinstance(module, nn.Sigmoid | nn.Hardsigmoid):
        return 0.0, 1.0
    return -1.0, 1.0
