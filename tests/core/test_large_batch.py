"""LARS and LAMB (core/training/large_batch.py): each step against the papers' formulas recomputed here in
plain Python arithmetic, the zero-norm and excluded-group cases, convergence, checkpoint resume, the
optimizer builder and the config."""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from trainflow.core.config import OptimConfig, config_from_dict
from trainflow.core.errors import ConfigError
from trainflow.core.training.large_batch import LAMB, LARS
from trainflow.core.training.optim import build_optimizer

Matrix = list[list[float]]
Make = Callable[[torch.Tensor, torch.Tensor], torch.optim.Optimizer]
Optim = torch.optim.Optimizer
Sched = torch.optim.lr_scheduler.LRScheduler

W0: Matrix = [[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]]  # a 3x2 weight
B0: Matrix = [[0.1, -0.2, 0.3]]  # its bias, as one row
# hand-set gradients for three steps
W_GRADS: list[Matrix] = [
    [[0.3, -0.1], [0.2, 0.4], [-0.5, 0.05]],
    [[-0.2, 0.6], [0.1, -0.3], [0.25, 0.2]],
    [[0.05, 0.05], [-0.4, 0.1], [0.3, -0.6]],
]
B_GRADS: list[Matrix] = [[[0.2, 0.1, -0.3]], [[-0.1, 0.4, 0.2]], [[0.3, -0.2, 0.1]]]


def _norm(a: Matrix) -> float:
    return math.sqrt(sum(x * x for row in a for x in row))


def _zip(f: Callable[..., float], *mats: Matrix) -> Matrix:
    return [[f(*xs) for xs in zip(*rows, strict=True)] for rows in zip(*mats, strict=True)]


def _lars_reference(
    w: Matrix, grads: list[Matrix], lr: float, momentum: float, wd: float, eta: float, adapt: bool
) -> Matrix:
    """You, Gitman, Ginsburg 2017, Algorithm 1, written out element by element."""
    v = _zip(lambda _: 0.0, w)
    for g in grads:
        wn, gn = _norm(w), _norm(g)
        trust = eta * wn / (gn + wd * wn) if adapt and wn > 0 and gn > 0 else 1.0
        v = _zip(lambda vi, gi, wi, k=lr * trust: momentum * vi + k * (gi + wd * wi), v, g, w)
        w = _zip(lambda wi, vi: wi - vi, w, v)
    return w


def _lamb_reference(
    w: Matrix, grads: list[Matrix], lr: float, betas: tuple[float, float], eps: float, wd: float, adapt: bool
) -> Matrix:
    """You et al. 2019, Algorithm 2 (with Adam's bias correction), written out element by element."""
    b1, b2 = betas
    m, v = _zip(lambda _: 0.0, w), _zip(lambda _: 0.0, w)
    for t, g in enumerate(grads, start=1):
        m = _zip(lambda mi, gi: b1 * mi + (1 - b1) * gi, m, g)
        v = _zip(lambda vi, gi: b2 * vi + (1 - b2) * gi * gi, v, g)
        r = _zip(
            lambda mi, vi, wi, c1=1 - b1**t, c2=1 - b2**t: (mi / c1) / (math.sqrt(vi / c2) + eps) + wd * wi, m, v, w
        )
        wn, rn = _norm(w), _norm(r)
        trust = wn / rn if adapt and wn > 0 and rn > 0 else 1.0
        w = _zip(lambda wi, ri, k=lr * trust: wi - k * ri, w, r)
    return w


def _run(make: Make, w0: Matrix, b0: Matrix, w_grads: list[Matrix], b_grads: list[Matrix]) -> tuple[Matrix, Matrix]:
    """Steps an optimizer built by `make(weight, bias)` with the hand-set gradients."""
    w = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    b = nn.Parameter(torch.tensor(b0, dtype=torch.float64).squeeze(0))
    opt = make(w, b)
    for gw, gb in zip(w_grads, b_grads, strict=True):
        w.grad, b.grad = torch.tensor(gw, dtype=torch.float64), torch.tensor(gb, dtype=torch.float64).squeeze(0)
        opt.step()
    return w.detach().tolist(), [b.detach().tolist()]


def _close(actual: Matrix, expected: Matrix) -> None:
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------ LARS
def test_lars_first_step_by_hand() -> None:
    # ||w|| = 5, ||g|| = 1, no decay: trust = 0.001 * 5 / 1 = 0.005; v = 1 * 0.005 * g; w -= v
    w = nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    w.grad = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    LARS([w], lr=1.0, momentum=0.9, trust_coefficient=0.001).step()
    _close(w.detach().tolist(), [[3.0 - 0.003, 4.0 - 0.004]])


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_lars_matches_the_paper_with_an_excluded_group(steps: int) -> None:
    lr, momentum, wd, eta = 2.0, 0.9, 0.05, 0.02

    def make(w: torch.Tensor, b: torch.Tensor) -> LARS:
        groups = [{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0, "trust_adaptation": False}]
        return LARS(groups, lr=lr, momentum=momentum, trust_coefficient=eta)

    w, b = _run(make, W0, B0, W_GRADS[:steps], B_GRADS[:steps])
    _close(w, _lars_reference(W0, W_GRADS[:steps], lr, momentum, wd, eta, adapt=True))
    _close(b, _lars_reference(B0, B_GRADS[:steps], lr, momentum, 0.0, eta, adapt=False))
    # the excluded group really is plain SGD momentum: without the switch its step would differ
    assert not torch.allclose(
        torch.tensor(b), torch.tensor(_lars_reference(B0, B_GRADS[:steps], lr, momentum, 0.0, eta, adapt=True))
    )


def test_lars_zero_norms_give_trust_one() -> None:
    lr, momentum, wd, eta = 0.5, 0.9, 0.1, 0.01
    zero_w = [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    zero_g = [[0.0, 0.0, 0.0]]
    # step 1: the weight is 0 (||w|| = 0); the bias has no gradient (||g|| = 0) but decays
    w, b = _run(
        lambda w, b: LARS([w, b], lr=lr, momentum=momentum, weight_decay=wd, trust_coefficient=eta),
        zero_w, B0, W_GRADS[:2], [zero_g, B_GRADS[1]],
    )  # fmt: skip
    _close(w, _lars_reference(zero_w, W_GRADS[:2], lr, momentum, wd, eta, adapt=True))
    _close(b, _lars_reference(B0, [zero_g, B_GRADS[1]], lr, momentum, wd, eta, adapt=True))
    assert all(math.isfinite(x) for row in w + b for x in row)


# ------------------------------------------------------------------------------------ LAMB
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_lamb_matches_the_paper_with_an_excluded_group(steps: int) -> None:
    lr, betas, eps, wd = 0.01, (0.9, 0.99), 1e-6, 0.1

    def make(w: torch.Tensor, b: torch.Tensor) -> LAMB:
        groups = [{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0, "trust_adaptation": False}]
        return LAMB(groups, lr=lr, betas=betas, eps=eps)

    w, b = _run(make, W0, B0, W_GRADS[:steps], B_GRADS[:steps])
    _close(w, _lamb_reference(W0, W_GRADS[:steps], lr, betas, eps, wd, adapt=True))
    _close(b, _lamb_reference(B0, B_GRADS[:steps], lr, betas, eps, 0.0, adapt=False))
    assert not torch.allclose(
        torch.tensor(b), torch.tensor(_lamb_reference(B0, B_GRADS[:steps], lr, betas, eps, 0.0, adapt=True))
    )


def test_lamb_zero_norms_give_trust_one() -> None:
    lr, betas, eps, wd = 0.01, (0.9, 0.999), 1e-6, 0.1
    zero_w = [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    zero = [[0.0, 0.0, 0.0]]
    # the weight starts at 0; the bias starts at 0 with a zero gradient: r = 0 and it must stay 0, not NaN
    w, b = _run(lambda w, b: LAMB([w, b], lr=lr, betas=betas, eps=eps, weight_decay=wd), zero_w, zero, W_GRADS[:2],
                [zero, zero])  # fmt: skip
    _close(w, _lamb_reference(zero_w, W_GRADS[:2], lr, betas, eps, wd, adapt=True))
    _close(b, zero)


# ------------------------------------------------------------------------------------ both
def _regression(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, nn.Linear]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.5 + 0.01 * torch.randn(256, 1, generator=g)
    torch.manual_seed(seed)
    return x, y, nn.Linear(8, 1)


def _groups(model: nn.Module) -> list[dict]:
    return [
        {"params": [model.weight], "weight_decay": 1e-4},
        {"params": [model.bias], "weight_decay": 0.0, "trust_adaptation": False},
    ]


OPTIMIZERS: dict[str, Callable[[list[dict]], Optim]] = {
    "lars": lambda groups: LARS(groups, lr=1.0, momentum=0.9, trust_coefficient=0.02),
    "lamb": lambda groups: LAMB(groups, lr=0.1),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_least_squares_loss_falls(name: str) -> None:
    x, y, model = _regression()
    opt = OPTIMIZERS[name](_groups(model))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / 150)
    first = nn.functional.mse_loss(model(x), y).item()
    for _ in range(100):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
    last = nn.functional.mse_loss(model(x), y).item()
    assert last < 0.01 * first, (first, last)
    assert sched.get_last_lr()[0] == pytest.approx(opt.defaults["lr"] * (1 - 100 / 150))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resuming_from_state_dict_matches_uninterrupted(name: str) -> None:
    x, y, _ = _regression()

    def steps(model: nn.Module, opt: Optim, sched: Sched, n: int) -> None:
        for _ in range(n):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()

    def fresh() -> tuple[nn.Module, Optim, Sched]:
        model = _regression()[2]
        opt = OPTIMIZERS[name](_groups(model))
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.97**step)

    whole = fresh()
    steps(*whole, 10)

    first = fresh()
    steps(*first, 4)
    saved = {"model": first[0].state_dict(), "opt": first[1].state_dict(), "sched": first[2].state_dict()}
    saved = torch.load(_roundtrip(saved), weights_only=True)  # as a checkpoint file would
    resumed = fresh()
    resumed[0].load_state_dict(saved["model"])
    resumed[1].load_state_dict(saved["opt"])
    resumed[2].load_state_dict(saved["sched"])
    assert resumed[1].param_groups[1]["trust_adaptation"] is False
    steps(*resumed, 6)
    for a, b in zip(whole[0].parameters(), resumed[0].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _roundtrip(obj: object) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_step_never_syncs_with_the_host(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y, model = _regression()
    opt = OPTIMIZERS[name](_groups(model))
    nn.functional.mse_loss(model(x), y).backward()

    def refuse(*_: object) -> None:
        raise AssertionError("host sync in an optimizer step")

    for method in ("item", "__bool__", "tolist", "__float__"):
        monkeypatch.setattr(torch.Tensor, method, refuse)
    opt.step()
    opt.step()


# ------------------------------------------------------------------------------ builder, config
def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))


@pytest.mark.parametrize(("name", "cls"), [("lars", LARS), ("lamb", LAMB)])
def test_build_optimizer_large_batch_groups(name: str, cls: type) -> None:
    model = _model()
    cfg = OptimConfig(name=name, lr=0.1, weight_decay=0.02, momentum=0.8, trust_coefficient=0.005, betas=(0.8, 0.9),
                      eps=1e-7)  # fmt: skip
    opt = build_optimizer(model, cfg)
    assert type(opt) is cls
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [(3, 4), (2, 3)]
    assert [p.shape for p in no_decay["params"]] == [(3,), (3,), (3,), (2,)]
    assert (decay["weight_decay"], decay["trust_adaptation"]) == (0.02, True)
    assert (no_decay["weight_decay"], no_decay["trust_adaptation"]) == (0.0, False)
    assert decay["lr"] == 0.1
    if name == "lars":
        assert (decay["momentum"], decay["trust_coefficient"]) == (0.8, 0.005)
    else:
        assert (decay["betas"], decay["eps"]) == ((0.8, 0.9), 1e-7)


def test_build_optimizer_adamw_on_cpu_is_unfused_and_has_no_trust_switch() -> None:
    opt = build_optimizer(_model(), OptimConfig(lr=0.1))
    assert type(opt) is torch.optim.AdamW
    assert all(not g["fused"] and "trust_adaptation" not in g for g in opt.param_groups)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_build_optimizer_adamw_on_cuda_is_fused() -> None:
    model = _model().cuda()
    opt = build_optimizer(model, OptimConfig(lr=0.1))
    assert all(g["fused"] for g in opt.param_groups)
    model(torch.randn(5, 4, device="cuda")).sum().backward()
    opt.step()


def test_unknown_optimizer_name_is_one_line_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"^config: optim\.name: 'lion' is not one of adamw, sgd, lars, lamb$"):
        config_from_dict({"data": {"source": "sklearn", "name": "wine"}, "optim": {"name": "lion"}})


def test_trust_coefficient_out_of_range_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^config: optim\.trust_coefficient: 0(\.0)? must be > 0(\.0)?$"):
        config_from_dict({"data": {"source": "sklearn", "name": "wine"}, "optim": {"trust_coefficient": 0}})
    cfg = config_from_dict({"data": {"source": "sklearn", "name": "wine"}, "optim": {"name": "lars"}})
    assert (cfg.optim.name, cfg.optim.trust_coefficient) == ("lars", 0.001)
