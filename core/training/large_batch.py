"""LARS and LAMB: layer-wise trust ratios for large effective batches.

Both scale each parameter tensor's step by a ratio of its weight norm to its update norm, so layers whose
gradients are large relative to their weights do not diverge at the high learning rates large batches need.
Norms stay tensors and the zero-norm case goes through `torch.where`: a step never syncs with the host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


def _trust_ratio(w_norm: Tensor, u_norm: Tensor, ratio: Tensor) -> Tensor:
    """`ratio` where both norms are positive, else 1.0 (a zero weight or update gives no scale to match)."""
    return torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))


def _grads(group: dict[str, Any]) -> Iterable[tuple[Tensor, Tensor]]:
    """(param, grad) for the group's parameters that have a dense gradient."""
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("LARS/LAMB do not support sparse gradients")
        yield p, p.grad


def _loss_of(closure: Callable[[], float] | None) -> float | None:
    """The optimizer protocol's closure: re-evaluates the loss (with gradients) when given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You, Gitman, Ginsburg 2017, arXiv:1708.03888).

    Per parameter tensor: `trust = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w||)` (1.0 if a norm
    is 0), `v = momentum * v + lr * trust * (g + weight_decay * w)`, `w -= v`. A group with
    `trust_adaptation=False` (biases, norm scales) takes the same step with `trust = 1`: plain SGD momentum.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        trust_adaptation: bool = True,
    ) -> None:
        if lr < 0:
            raise ValueError(f"LARS lr {lr} must be >= 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"LARS momentum {momentum} must be in [0, 1)")
        if weight_decay < 0:
            raise ValueError(f"LARS weight_decay {weight_decay} must be >= 0")
        if trust_coefficient <= 0:
            raise ValueError(f"LARS trust_coefficient {trust_coefficient} must be > 0")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "trust_adaptation": trust_adaptation,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter with a gradient; returns `closure()`'s loss if given."""
        loss = _loss_of(closure)
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p, g in _grads(group):
                update = g.add(p, alpha=wd) if wd else g.clone()
                if group["trust_adaptation"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    ratio = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm)
                    update.mul_(_trust_ratio(w_norm, g_norm, ratio))
                update.mul_(lr)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.mul_(momentum).add_(update)
                p.sub_(buf)
        return loss


class LAMB(torch.optim.Optimizer):
    """Adam moments with a layer-wise trust ratio (You et al. 2019, arXiv:1904.00962, Algorithm 2).

    Per parameter tensor at step t: bias-corrected moments `m_hat`, `v_hat`;
    `r = m_hat / (sqrt(v_hat) + eps) + weight_decay * w`; `trust = ||w|| / ||r||` (1.0 if a norm is 0);
    `w -= lr * trust * r`. A group with `trust_adaptation=False` takes the step with `trust = 1` (AdamW-like).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        trust_adaptation: bool = True,
    ) -> None:
        if lr < 0:
            raise ValueError(f"LAMB lr {lr} must be >= 0")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"LAMB betas {list(betas)} must each be in [0, 1)")
        if eps <= 0:
            raise ValueError(f"LAMB eps {eps} must be > 0")
        if weight_decay < 0:
            raise ValueError(f"LAMB weight_decay {weight_decay} must be >= 0")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "trust_adaptation": trust_adaptation,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter with a gradient; returns `closure()`'s loss if given."""
        loss = _loss_of(closure)
        for group in self.param_groups:
            (beta1, beta2), eps, wd = group["betas"], group["eps"], group["weight_decay"]
            for p, g in _grads(group):
                state = self.state[p]
                if not state:
                    state["step"] = 0  # a Python int: the bias corrections need no device op
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v / (1 - beta2**t)).sqrt_().add_(eps)
                update = (m / (1 - beta1**t)).div_(denom)
                if wd:
                    update.add_(p, alpha=wd)
                if group["trust_adaptation"]:
                    w_norm, r_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    update.mul_(_trust_ratio(w_norm, r_norm, w_norm / r_norm))
                p.sub_(update.mul_(group["lr"]))
        return loss
