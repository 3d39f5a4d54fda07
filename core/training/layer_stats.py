"""Per-layer figures of one optimizer step for the training doctor (diagnostics.py): activation statistics from
forward hooks, gradient norms once the step's gradients are final, and the update/weight ratio across the update.

A layer is a module owning a trainable parameter (`requires_grad`: a fine-tune's frozen backbone is not measured,
so it is never "vanishing"). Hooks exist only from `arm` (before the measured step's forward passes) to
`after_backward` (its gradients final), so other steps, and validation, pay nothing. The statistics are those of
the step's first micro-batch. On the device each hook runs a few cheap passes (the sum and the norm of the layer's
output; the non-zeros per unit of its input as a sum of |sign|, several times faster on CPU than `count_nonzero` or
`var_mean`), and the gradient and update figures are per-parameter norms from fused `_foreach` ops; `finish`
concatenates the raw figures, copies them to the host once and aggregates them there.

Dead units are seen at a layer's input: a unit (a channel of a convolution or batch norm, else the last dimension)
that was never non-zero there over the window belongs to the trainable layer the forward pass ran just before
(the one whose output, through its activation, feeds it).
"""

from __future__ import annotations

import math
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
        self.counts: dict[str, list[torch.Tensor]] = {}  # consumer layer -> non-zeros per input unit, each measurement
        self.producer: dict[str, str] = {}  # consumer layer -> the trainable layer run just before it

    def arm(self) -> None:
        """Take the trainable layers as they are now and hook them for the next step's forward passes."""
        self.close()
        named = [(n, m) for n, m in self.module.named_modules() if next(m.parameters(recurse=False), None) is not None]
        trainable = {n: [p for p in m.parameters(recurse=False) if p.requires_grad] for n, m in named}
        self.params = {n: ps for n, ps in trainable.items() if ps}
        self.kinds = {n: type(m).__name__ for n, m in named if n in self.params}
        self.moments: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}  # layer -> its output's sum, norm, n
        self.fed: dict[str, tuple[torch.Tensor, int]] = {}  # producer -> (non-zeros per unit the next layer got, n)
        self.saturation: dict[str, tuple[torch.Tensor, int, str]] = {}  # activation -> (at bounds, n, its layer)
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
        """The step's gradients are final and the weights not yet updated: remove the hooks, take the gradients'
        norms and a copy of the weights (on the device)."""
        self._remove_hooks()
        self.armed, self.measuring = False, True
        if not self.gradients:
            return
        self.flat = [p.detach() for ps in self.params.values() for p in ps]
        grads = [p.grad if p.grad is not None else torch.zeros((), device=p.device) for ps in self.params.values()
                 for p in ps]  # fmt: skip
        self.grad_norms = torch.stack(torch._foreach_norm(grads))
        self.before = torch._foreach_mul(self.flat, 1.0)  # a copy, in one fused op

    def finish(self, step: int, dead: bool, loop: dict[str, torch.Tensor] | None = None) -> Measured:
        """After the update: the step's figures on the host, in one device-to-host copy; with `dead`, the window's
        dead-unit shares too (and a new window starts); `loop`: the step's own figures (its loss) to read with them."""
        parts: dict[str, torch.Tensor] = {}
        if loop:
            parts["loop"] = torch.stack([v.detach().float() for v in loop.values()])
        out = [n for n in self.order if n in self.moments]
        if out:
            parts["out"] = torch.stack([v for n in out for v in self.moments[n][:2]])  # sum, norm of each
        fed = [n for n in self.fed if n in self.params]
        if fed:
            parts["fed"] = torch.cat([self.fed[n][0] for n in fed])
        if self.gradients and self.measuring:
            update = torch._foreach_norm(torch._foreach_sub(self.flat, self.before))
            parts["grad"] = torch.stack(
                [self.grad_norms, torch.stack(update), torch.stack(torch._foreach_norm(self.before))]
            )
            self.before = []
        sat = list(self.saturation)
        if sat:
            parts["sat"] = torch.stack([self.saturation[n][0] for n in sat])
        consumers = [c for c in self.counts if self.producer.get(c) in self.params] if dead else []
        if consumers:  # units seen non-zero at any measurement of the window
            parts["dead"] = torch.cat([sum(_same_shape(self.counts[c])) for c in consumers])  # type: ignore[misc]
        sizes = [p.numel() for p in parts.values()]
        values = torch.cat([p.reshape(-1).float() for p in parts.values()]).tolist() if parts else []  # the one copy
        raw = dict(zip(parts, _split(values, sizes), strict=True))
        self.measuring = False
        m = Measured(step, {}, dict(zip(loop or {}, raw.get("loop", []), strict=True)), list(self.order),
                     dict(self.kinds))  # fmt: skip
        self._out(m, out, raw.get("out", []))
        self._fed(m, fed, raw.get("fed", []))
        self._grads(m, raw.get("grad", []))
        for name, at in zip(sat, raw.get("sat", []), strict=True):
            count, layer = self.saturation[name][1:]
            m.saturated[layer] = (f"{name} ({type(self.module.get_submodule(name)).__name__})", at / count)
        self._dead(m, consumers, raw.get("dead", []))
        if dead:
            self.counts, self.producer = {}, {}
        return m

    def close(self) -> None:
        """Remove any hooks left (a step that never reached its update)."""
        self._remove_hooks()
        self.armed = self.measuring = False

    # ------------------------------------------------------------------------------------------- hooks
    def _layer_hook(self, name: str, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if name in self.seen:  # the step's first micro-batch only
            self.last = name
            return
        self.seen.add(name)
        out = output[0] if isinstance(output, tuple | list) else output
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
            o = out.detach()
            self.moments[name] = (
                o.sum(dtype=torch.float32),
                torch.linalg.vector_norm(o, dtype=torch.float32),
                o.numel(),
            )
            self.order.append(name)
        x = inputs[0] if inputs else None
        if self.last is not None and isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 2:
            unit = 1 if isinstance(module, _CHANNEL_FIRST) else x.dim() - 1
            dims = tuple(d for d in range(x.dim()) if d != unit)
            nonzero = torch.sign(x.detach()).abs_().sum(dim=dims, dtype=torch.float32)  # (units,): non-zeros each
            self.counts.setdefault(name, []).append(nonzero)
            self.producer[name] = self.last
            self.fed.setdefault(self.last, (nonzero, x.numel()))  # a layer feeding two: the first
        self.last = name

    def _frozen_hook(self, name: str, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        self.last = None  # what a frozen layer feeds is not a trainable layer's output

    def _saturation_hook(self, name: str, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not isinstance(output, torch.Tensor) or name in self.saturation or self.last is None:
            return  # the first micro-batch only, and only after a trainable layer
        low, high = _bounds(module)
        y = output.detach()
        at = ((y <= low + SATURATION_MARGIN) | (y >= high - SATURATION_MARGIN)).sum()
        self.saturation[name] = (at, y.numel(), self.last)

    def _remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    # ------------------------------------------------------------------------- aggregation on the host
    def _out(self, m: Measured, names: list[str], values: list[float]) -> None:
        for name, total, norm in zip(names, values[::2], values[1::2], strict=True):
            n = self.moments[name][2]
            mean = total / n
            m.layers.setdefault(name, {}).update(
                out_mean=mean, out_std=math.sqrt(max(norm * norm / n - mean * mean, 0))
            )

    def _fed(self, m: Measured, names: list[str], values: list[float]) -> None:
        sizes = [self.fed[n][0].numel() for n in names]
        for name, counts in zip(names, _split(values, sizes), strict=True):
            m.layers.setdefault(name, {})["act_zero_share"] = 1 - sum(counts) / self.fed[name][1]

    def _grads(self, m: Measured, values: list[float]) -> None:
        if not values:
            return
        n = len(values) // 3
        grads, updates, weights = values[:n], values[n : 2 * n], values[2 * n :]
        i = 0
        for name, params in self.params.items():
            j = i + len(params)
            grad, update, weight = (math.sqrt(sum(v * v for v in part[i:j])) for part in (grads, updates, weights))
            numel = sum(p.numel() for p in params)
            m.layers.setdefault(name, {}).update(grad_norm=grad, grad_rms=grad / math.sqrt(numel),
                                                 update_ratio=update / weight if weight > 0 else math.nan)  # fmt: skip
            i = j

    def _dead(self, m: Measured, consumers: list[str], values: list[float]) -> None:
        sizes = [self.counts[c][-1].numel() for c in consumers] if consumers else []
        for consumer, counts in zip(consumers, _split(values, sizes), strict=True):
            share = sum(1 for c in counts if c == 0) / len(counts)
            layer = self.producer[consumer]
            m.dead[layer] = max(share, m.dead.get(layer, 0.0))  # a layer feeding two: the worse


def _same_shape(counts: list[torch.Tensor]) -> list[torch.Tensor]:
    """The window's counts shaped as the last one (a layer whose width changed starts again)."""
    return [c for c in counts if c.shape == counts[-1].shape]


def _split(values: list[float], sizes: list[int]) -> list[list[float]]:
    out, i = [], 0
    for size in sizes:
        out.append(values[i : i + size])
        i += size
    return out


def _bounds(module: nn.Module) -> tuple[float, float]:
    if isinstance(module, nn.Hardtanh):
        return float(module.min_val), float(module.max_val)
    if isinstance(module, nn.Sigmoid | nn.Hardsigmoid):
        return 0.0, 1.0
    return -1.0, 1.0
