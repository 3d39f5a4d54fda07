"""The LR range test: the sweep restores every state it touches, its suggestion lands in the decade
a small LR grid finds, the rules on hand-made curves, the stage's artifacts and variants, and how
tuning resolves `optim.lr: auto`."""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import random
import re
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import tiny_raw
from trainflow.core.config import Config, LRRangeTestConfig, config_from_dict
from trainflow.core.data.spec import DataSpec
from trainflow.core.lr_range_test import lr_range_test
from trainflow.core.prepare_data import prepare_data
from trainflow.core.records import LRRangeTestResult, PrepareDataResult
from trainflow.core.training.builder import build_trainer
from trainflow.core.training.metrics import eval_pass
from trainflow.core.training.seed import rng_state, set_rng_state
from trainflow.core.training.spec import TrainingSpec
from trainflow.core.training.steps import optimizer_steps
from trainflow.core.training.trainer import Trainer
from trainflow.core.tuning.lr_finder import RULES, LRCurve, lr_sweep, suggest_lr

SHORT = {"num_steps": 30, "skip_start": 5, "skip_end": 3}  # a 30-step sweep over the default 1e-6 .. 1
SYNTHETIC = {"source": "synthetic", "n_samples": 400, "n_features": 20, "n_classes": 3}


def _config(data: dict[str, Any] | None = None, model: dict[str, Any] | None = None, **sections: Any) -> Config:
    """tiny_raw with `data` and `model` replaced whole (they are tagged unions) and the rest merged."""
    raw = tiny_raw(**sections)
    raw["data"] = data or raw["data"]
    raw["model"] = model or raw["model"]
    return config_from_dict(raw)


def _run_stage(cfg: Config, store, key: str = "lrt") -> LRRangeTestResult:
    data = prepare_data(cfg.data, cfg.seed, store)
    lr_test = cfg.tune.lr_range_test
    return lr_range_test(lr_test, TrainingSpec.of(cfg, data, lr=lr_test.min_lr), store, key)


def _curve_of(result: LRRangeTestResult, store) -> dict[str, list[float]]:
    return json.loads(store.local_path(result.curve_uri).read_text())


# ------------------------------------------------------------------------- the sweep restores
def _digits_cnn(store) -> Trainer:
    cfg = _config(
        data={"source": "sklearn", "name": "digits"},
        model={"name": "cnn", "channels": [8, 16], "dropout": 0.2},  # BatchNorm buffers; dropout draws from torch
        optim={"lr": 0.01, "warmup_steps": 2},
        train={"batch_size": 32},
    )
    data = prepare_data(cfg.data, cfg.seed, store)
    trainer = build_trainer(TrainingSpec.of(cfg, data), store)
    # fp16 needs CUDA; an enabled CPU scaler gives the scaler a state that moves (scale, growth tracker).
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    return trainer


def _snapshot(trainer: Trainer) -> dict[str, Any]:
    return {
        "model": {name: t.clone() for name, t in trainer.model.state_dict().items()},  # buffers included
        "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
        "scheduler": copy.deepcopy(trainer.scheduler.state_dict()),
        "last_lr": list(trainer.scheduler.get_last_lr()),
        "scaler": trainer.scaler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
    }


def _assert_same(actual: Any, expected: Any, where: str = "state") -> None:
    """Bitwise equality through nested dicts, lists and tuples of tensors, arrays and plain values."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), where
    elif isinstance(expected, np.ndarray):
        assert np.array_equal(actual, expected), where
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key, value in expected.items():
            _assert_same(actual[key], value, f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), where
        for i, (a, b) in enumerate(zip(actual, expected, strict=True)):
            _assert_same(a, b, f"{where}[{i}]")
    else:
        assert actual == expected, where


@pytest.mark.parametrize("fail_at_call", [None, 5], ids=["completed", "raised-mid-sweep"])
def test_sweep_restores_every_state_it_touches(
    store, monkeypatch: pytest.MonkeyPatch, fail_at_call: int | None
) -> None:
    swept, twin = _digits_cnn(store), _digits_cnn(store)
    windows = list(itertools.islice(optimizer_steps(swept.loaders.train, 1), 5))
    start = rng_state()
    for trainer in (swept, twin):  # AdamW moments, BatchNorm statistics, a scheduler past warmup, a grown scale
        set_rng_state(start)
        for window in windows[:3]:
            trainer.train_step(window)
    scheduler, before = swept.scheduler, _snapshot(swept)
    first = next(iter(before["model"]))
    step, moved = swept.train_step, []

    def step_drawing_from_every_rng(window: list[Any]) -> Any:  # as data augmentation would
        np.random.rand()
        random.random()
        if len(moved) + 1 == fail_at_call:
            raise RuntimeError("loader broke")
        out = step(window)
        moved.append(not torch.equal(swept.model.state_dict()[first], before["model"][first]))
        return out

    monkeypatch.setattr(swept, "train_step", step_drawing_from_every_rng)
    if fail_at_call is None:
        curve = lr_sweep(swept, 1e-4, 10.0, num_steps=12, smoothing=0.9, diverge_factor=1e9)
        assert len(curve.lrs) == len(moved) == 12
    else:
        with pytest.raises(RuntimeError, match="loader broke"):
            lr_sweep(swept, 1e-4, 10.0, num_steps=12, smoothing=0.9, diverge_factor=1e9)
        assert len(moved) == fail_at_call - 1
    assert all(moved), "the sweep must have changed the weights it then restores"

    _assert_same(_snapshot(swept), before)
    assert swept.scheduler is scheduler
    for window in windows[3:]:  # nothing outside the snapshots leaked either: the next steps match a twin's
        state = rng_state()
        step(window)
        set_rng_state(state)
        twin.train_step(window)
    _assert_same(swept.model.state_dict(), twin.model.state_dict(), "model after two more steps")


# ------------------------------------------------------------------ the suggestion is sensible
def test_suggestion_is_within_a_decade_of_the_best_lr_of_a_grid(store) -> None:
    """An MLP on a synthetic problem: the LR of a 5-point decade grid with the lowest validation loss
    after 3 epochs (AdamW, cosine schedule) is what the sweep should point at."""
    cfg = _config(data=SYNTHETIC | {"n_samples": 600}, optim={"lr": "auto"}, train={"batch_size": 32, "max_epochs": 3},
                  tune={"lr_range_test": {"num_steps": 60}})  # fmt: skip
    data = prepare_data(cfg.data, cfg.seed, store)
    val_loss = {}
    for lr in (1e-4, 1e-3, 1e-2, 1e-1, 1.0):
        trainer = build_trainer(TrainingSpec.of(cfg, data, lr=lr), store)
        val_loss[lr] = trainer.fit().last_metrics["val/loss"]
    best, runner_up = sorted(val_loss, key=val_loss.get)[:2]
    assert val_loss[best] < 0.9 * val_loss[runner_up], f"the grid has no clear winner: {val_loss}"

    result = _run_stage(cfg, store)
    assert result.rule == LRRangeTestConfig().rule and result.suggested_lr is not None, result.reason
    for rule in {result.rule, "min_div_10"}:  # valley (fastai) sits mid-descent, which depends on min_lr: not here
        lr = result.suggestions[rule]
        assert lr is not None and abs(math.log10(lr / best)) <= 1, f"{rule} suggests {lr:.3g}, grid best {best:g}"


class _ScaledLinear(nn.Module):
    """Logistic regression on the features times `input_scale`, from zero weights and without a bias:
    then SGD on c*x at lr/c^2 walks exactly the path of SGD on x at lr (the weights scaled by 1/c)."""

    def __init__(self, in_features: int, n_classes: int, input_scale: float):
        super().__init__()
        self.input_scale = input_scale
        self.linear = nn.Linear(in_features, n_classes, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.input_scale)


def scaled_linear(spec: DataSpec, input_scale: float) -> nn.Module:
    return _ScaledLinear(spec.input_shape[0], spec.n_classes, input_scale)


def test_scaling_the_inputs_by_c_moves_the_sgd_lr_by_one_over_c_squared(store) -> None:
    def sweep(scale: float, min_lr: float, max_lr: float) -> LRRangeTestResult:
        cfg = _config(
            data=SYNTHETIC,
            model={"name": "factory", "factory": f"{__name__}:scaled_linear", "params": {"input_scale": scale}},
            optim={"name": "sgd", "lr": "auto", "weight_decay": 0.0},  # decay and clipping would break the symmetry
            train={"batch_size": 32, "grad_clip_norm": None},
            tune={"lr_range_test": {"num_steps": 60, "min_lr": min_lr, "max_lr": max_lr}},
        )
        return _run_stage(cfg, store, f"scale-{scale}-{min_lr}")

    c = 10.0
    plain, scaled = sweep(1.0, 1e-6, 10.0), sweep(c, 1e-6, 10.0)
    # Same sweep range: the LR of the lowest loss (min_div_10 = it / 10) moves down by about c^2 = 100.
    ratio = plain.suggestions["min_div_10"] / scaled.suggestions["min_div_10"]
    assert c**2 / 2 < ratio < c**2 * 2, ratio
    # The range scaled by 1/c^2 too: the same curve, so every rule's pick is exactly 1/c^2 of the plain one.
    matched = sweep(c, 1e-6 / c**2, 10.0 / c**2)
    np.testing.assert_allclose(_curve_of(matched, store)["loss"], _curve_of(plain, store)["loss"], rtol=1e-4)
    for rule in RULES:
        assert matched.suggestions[rule] == pytest.approx(plain.suggestions[rule] / c**2, rel=1e-6), rule


# -------------------------------------------------------------------- the rules, on hand curves
LRS = np.logspace(-6, 0, 40)  # the sweep's spacing: one geometric step per point


def _curve(losses: np.ndarray | list[float], diverged: bool = False) -> LRCurve:
    return LRCurve(list(LRS[: len(losses)]), [float(v) for v in losses], diverged)


def _index(lr: float | None) -> int:
    assert lr is not None
    return int(np.argmin(np.abs(np.log(LRS) - math.log(lr))))


STEPS = np.arange(40)
TWO_DROPS = 3.0 - 0.3 * np.tanh((STEPS - 12) / 2) - 0.6 * np.tanh((STEPS - 30) / 2)  # steepest at 30


def test_steepest_picks_the_steepest_slope_against_log_lr() -> None:
    lr, reason = suggest_lr(_curve(TWO_DROPS), "steepest", skip_start=0, skip_end=0)
    assert lr == pytest.approx(LRS[30])
    assert "steepest descent" in reason
    # Against the LR itself the drop at 12 would be steeper: the curve tells the two apart.
    assert int(np.argmin(np.gradient(TWO_DROPS, LRS))) < 20


@pytest.mark.parametrize(("skip_start", "picked"), [(0, range(3)), (5, range(30, 31))])
def test_an_early_spike_does_not_decide_once_skipped(skip_start: int, picked: range) -> None:
    losses = TWO_DROPS.copy()
    losses[:3] = [9.0, 6.0, 3.6]  # the moving average's warm-up: a cliff steeper than anything later
    lr, _ = suggest_lr(_curve(losses), "steepest", skip_start=skip_start, skip_end=0)
    assert _index(lr) in picked


def test_min_div_10_is_a_tenth_of_the_lr_of_the_lowest_loss() -> None:
    losses = 1.0 + 0.05 * (STEPS - 27.0) ** 2
    lr, reason = suggest_lr(_curve(losses), "min_div_10", skip_start=0, skip_end=0)
    assert lr == pytest.approx(LRS[27] / 10)
    assert f"{LRS[27]:.3g}" in reason


def test_valley_picks_a_point_inside_the_longest_descent_not_the_steepest() -> None:
    short_steep = np.linspace(2.0, 1.0, 5)  # points 0-4
    long_gentle = np.linspace(2.5, 1.5, 25)  # points 5-29: the longest decreasing run
    rise = np.linspace(1.6, 3.0, 10)  # points 30-39
    losses = np.concatenate([short_steep, long_gentle, rise])
    lr, reason = suggest_lr(_curve(losses), "valley", skip_start=0, skip_end=0)
    assert 5 <= _index(lr) <= 29
    assert "longest descent" in reason
    assert _index(suggest_lr(_curve(losses), "steepest", skip_start=0, skip_end=0)[0]) < 5


@pytest.mark.parametrize("rule", RULES)
def test_a_curve_that_only_rises_has_no_suggestion(rule: str) -> None:
    lr, reason = suggest_lr(_curve(np.linspace(1.0, 3.0, 40)), rule, skip_start=10, skip_end=5)
    assert lr is None
    assert f"did not decrease between LR {LRS[10]:.2g} and 1" in reason


@pytest.mark.parametrize("rule", RULES)
def test_a_curve_that_diverged_after_3_points_has_no_suggestion(rule: str) -> None:
    lr, reason = suggest_lr(_curve([2.0, 1.5, 9.0], diverged=True), rule, skip_start=0, skip_end=0)
    assert lr is None
    assert re.search(r"only 3 steps before the loss diverged.*min_lr", reason), reason


@pytest.mark.parametrize(("diverged", "lowest_kept"), [(False, 39), (True, 34)])
def test_skip_end_drops_the_tail_only_of_a_diverged_curve(diverged: bool, lowest_kept: int) -> None:
    losses = np.linspace(3.0, 1.0, 40)  # the lowest loss is the last point
    lr, _ = suggest_lr(_curve(losses, diverged), "min_div_10", skip_start=10, skip_end=5)
    assert lr == pytest.approx(LRS[lowest_kept] / 10)


def test_a_diverged_curve_shorter_than_skip_end_has_no_suggestion() -> None:
    # Reachable from a valid config: num_steps 100, skip_start 0, skip_end 20, divergence at step 15.
    lr, reason = suggest_lr(_curve(np.linspace(2.0, 1.0, 15), diverged=True), "min_div_10", skip_start=0, skip_end=20)
    assert lr is None, f"suggested {lr:.3g} from points the tail skip should have dropped"
    assert "only 15 steps" in reason


# -------------------------------------------------------------------------------- the stage
def test_stage_writes_the_plot_and_the_curve_and_uses_the_configured_rule(store) -> None:
    result = _run_stage(_config(optim={"lr": "auto"}, tune={"lr_range_test": SHORT | {"rule": "steepest"}}), store)
    assert store.local_path(result.plot_uri).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    curve = _curve_of(result, store)
    assert len(curve["lr"]) == len(curve["loss"]) == result.num_steps_run == 30
    assert curve["lr"][0] == pytest.approx(1e-6) and curve["lr"][-1] == pytest.approx(1.0)
    assert not result.diverged
    assert result.suggestions.keys() == set(RULES)
    assert result.rule == "steepest" and result.suggested_lr == result.suggestions["steepest"] is not None


def test_a_high_max_lr_stops_the_sweep_when_the_loss_diverges(store) -> None:
    cfg = _config(optim={"lr": "auto"}, tune={"lr_range_test": SHORT | {"max_lr": 10.0, "diverge_factor": 1.5}})
    result = _run_stage(cfg, store)
    curve = _curve_of(result, store)
    assert result.diverged
    assert result.num_steps_run < 30 and curve["lr"][-1] < 10.0
    assert curve["loss"][-1] > 1.5 * min(curve["loss"])  # the stop rule, on the point that tripped it
    assert all(loss <= 1.5 * min(curve["loss"][: i + 1]) for i, loss in enumerate(curve["loss"][:-1]))


@pytest.mark.parametrize(
    ("train", "rtol"),
    [
        ({"batch_size": 8, "grad_accum_steps": 2}, 1e-5),  # the same optimizer steps as batch 16: the same curve
        ({"precision": "bf16"}, 5e-2),  # autocast: close to fp32, not equal
    ],
    ids=["grad_accum", "bf16"],
)
def test_the_sweep_runs_the_trainings_own_step(store, train: dict[str, Any], rtol: float) -> None:
    reference = _run_stage(_config(optim={"lr": "auto"}, tune={"lr_range_test": SHORT}), store, "fp32")
    result = _run_stage(_config(optim={"lr": "auto"}, train=train, tune={"lr_range_test": SHORT}), store, "variant")
    assert result.suggested_lr is not None, result.reason
    expected, actual = _curve_of(reference, store), _curve_of(result, store)
    assert actual["lr"] == expected["lr"]
    np.testing.assert_allclose(actual["loss"], expected["loss"], rtol=rtol)
    if train.get("precision") == "bf16":
        assert actual["loss"] != expected["loss"], "bf16 autocast left the losses bit-identical to fp32"


def _val_loss_after_steps(cfg: Config, data: PrepareDataResult, store, lr: float, steps: int = 30) -> float:
    """Validation loss (first 8 batches) after `steps` optimizer steps at a constant `lr`; inf when it blew up."""
    trainer = build_trainer(TrainingSpec.of(cfg, data, lr=lr), store)
    for window in itertools.islice(optimizer_steps(trainer.loaders.train, 1), steps):
        trainer.train_step(window)
    val = list(itertools.islice(trainer.loaders.val, 8))
    loss = eval_pass(trainer.model, val, trainer.device, contextlib.nullcontext()).loss
    return loss if math.isfinite(loss) else math.inf


def test_gpt_on_text_the_suggestion_trains_like_the_best_of_a_grid(store) -> None:
    """A byte-level GPT after 30 steps: LRs from about 3e-3 to 3e-1 reach the same loss, 1e-3 and below or
    0.5 and above clearly worse. The suggestion must land in that band, not merely inside the sweep's range."""
    cfg = _config(data={"source": "text", "seq_len": 32}, model={"name": "gpt", "n_layer": 1, "n_embd": 32},
                  optim={"lr": "auto", "schedule": "constant"}, tune={"lr_range_test": SHORT})  # fmt: skip
    result = _run_stage(cfg, store)
    assert result.suggested_lr is not None, result.reason
    curve = _curve_of(result, store)
    assert all(math.isfinite(loss) for loss in curve["loss"])
    recomputed, _ = suggest_lr(
        LRCurve(curve["lr"], curve["loss"], result.diverged), result.rule, SHORT["skip_start"], SHORT["skip_end"]
    )
    assert result.suggested_lr == recomputed, "the suggestion is the rule applied to the stored curve"

    data = prepare_data(cfg.data, cfg.seed, store)
    grid = {lr: _val_loss_after_steps(cfg, data, store, lr) for lr in (1e-6, 1e-2, 1e-1, 1.0)}
    suggested = _val_loss_after_steps(cfg, data, store, result.suggested_lr)
    assert suggested <= 1.05 * min(grid.values()), f"lr {result.suggested_lr:.3g}: {suggested:.3f}; grid {grid}"
    assert suggested < 0.7 * grid[1e-6] and suggested < 0.7 * grid[1.0], f"{suggested:.3f} vs the ends: {grid}"
