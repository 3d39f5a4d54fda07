"""The training doctor: each finding made to happen on purpose (an LR far too high, a layer initialised dead, a
loader that sleeps, a model memorising a tiny split, saturated and vanishing stacks, a skipped step, an LR far from
the range test's), checked for its rule, layer and remedy; the figures read in one transfer per measurement; frozen
layers never measured; the rules and their deduplication as tables. In the train stage: test_doctor_fit.py."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from trainflow.core.config import DiagnosticsConfig, OptimConfig, TrainConfig
from trainflow.core.data.loaders import ArrayDataset, EpochSampler, Loaders
from trainflow.core.records import Finding
from trainflow.core.training import doctor_rules as rules
from trainflow.core.training.diagnostics import Doctor
from trainflow.core.training.optim import build_optimizer, build_scheduler
from trainflow.core.training.trainer import Trainer


def _data(n: int = 128, features: int = 10, classes: int = 3, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)
    return ArrayDataset(x.numpy(), y.numpy())


class _Sleepy(torch.utils.data.Dataset):
    """A dataset whose every sample takes `seconds` to load: the loop waits on it."""

    def __init__(self, data: ArrayDataset, seconds: float):
        self.data, self.seconds = data, seconds

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        time.sleep(self.seconds)
        return self.data[i]


def _fit(
    model: nn.Module,
    doctor: Doctor | list[Any],
    train: Any = None,
    val: Any = None,
    optim: dict[str, Any] | None = None,
    loss: Any = None,
    **settings: Any,
) -> Any:
    """`model` fitted on `train` (default: 128 random samples), validated on `val`, watched by `doctor` (or given
    these callbacks)."""
    train = _data() if train is None else train
    cfg = TrainConfig(**({"max_epochs": 4, "batch_size": 16, "progress_bar": False, "grad_clip_norm": None,
                          "log_every_steps": 2} | settings))  # fmt: skip
    sampler = EpochSampler(len(train), seed=0)
    collate = torch.utils.data.default_collate if isinstance(train, _Sleepy) else (lambda b: b)
    loader = torch.utils.data.DataLoader(train, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate)
    val = val if val is not None else getattr(train, "data", train)  # a sleepy loader validates without sleeping
    val_loader = torch.utils.data.DataLoader(val, batch_size=64, collate_fn=lambda b: b)
    optim_cfg = OptimConfig(**({"lr": 0.01, "schedule": "constant"} | (optim or {})))
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, total_steps=1000)
    trainer = Trainer(model, optimizer, scheduler, Loaders(loader, val_loader, val_loader, sampler), cfg,
                      torch.device("cpu"), "classification", doctor if isinstance(doctor, list) else [doctor],
                      loss=loss)  # fmt: skip
    return trainer.fit()


def _relu_mlp(seed: int = 0, width: int = 32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3))


def _rules(doctor: Doctor) -> dict[tuple[str, str | None], Finding]:
    return {(f.rule, f.layer): f for f in doctor.findings}


# ------------------------------------------------------------------------------- findings on purpose
def test_an_lr_far_too_high_is_diverging_with_exploding_gradients() -> None:
    doctor = Doctor(DiagnosticsConfig(every_steps=4))
    _fit(_relu_mlp(), doctor, optim={"name": "sgd", "lr": 10.0}, max_nonfinite_steps=1000)
    found = _rules(doctor)
    diverging = found[("diverging_loss", None)]
    assert diverging.step <= 4 and "lower the LR (optim.lr" in diverging.remedy
    assert ("exploding_gradients", None) in found and "clip gradients (train.grad_clip_norm" in diverging.remedy


def test_a_layer_initialised_dead_is_named_with_its_share_and_remedy() -> None:
    model = _relu_mlp()
    with torch.no_grad():
        model[2].bias.fill_(-100.0)  # every unit of layer `2` negative before its ReLU, for every input
    doctor = Doctor(DiagnosticsConfig(every_steps=2, window_steps=8))
    _fit(model, doctor, max_epochs=2)
    dead = [f for f in doctor.findings if f.rule == "dead_units"]
    assert [(f.layer, f.step, f.figure) for f in dead] == [("2", 8, 1.0)]
    assert "100% of 2's units never activated over the last 8 steps (> 50%)" in dead[0].message
    assert dead[0].remedy.startswith("lower the LR (optim.lr), a leaky activation")


def test_a_loader_that_sleeps_makes_the_loop_loader_bound() -> None:
    doctor = Doctor(DiagnosticsConfig(every_steps=50))
    _fit(_relu_mlp(), doctor, train=_Sleepy(_data(96), 0.01), max_epochs=1, log_every_steps=1)  # 6 log windows
    bound = _rules(doctor)[("loader_bound", None)]
    assert bound.figure is not None and bound.figure > 0.2
    assert "more loader workers (data.loader.num_workers), augmentation on the device (train.augment)" in bound.remedy


def test_a_model_memorising_a_tiny_training_split_has_a_growing_gap() -> None:
    doctor = Doctor(DiagnosticsConfig(every_steps=50))
    # random labels: nothing to learn but the 24 samples themselves; validation on other random samples
    _fit(_relu_mlp(width=128), doctor, train=_data(24, seed=1), val=_data(64, seed=2), max_epochs=15, batch_size=8)
    gap = _rules(doctor)[("growing_gap", None)]
    assert gap.figure is not None and gap.figure > rules.GAP_RISE
    assert "above its best" in gap.message and "while train/loss fell" in gap.message
    assert gap.remedy.startswith("augment (train.augment), regularize (model.dropout, optim.weight_decay)")


def test_saturated_tanh_units_are_named_after_the_layer_that_feeds_them() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    with torch.no_grad():
        model[0].weight.mul_(100.0)
    doctor = Doctor(DiagnosticsConfig(every_steps=2))
    _fit(model, doctor, max_epochs=1)
    saturated = _rules(doctor)[("saturation", "0")]
    assert saturated.step == 1 and "of 1 (Tanh)'s outputs after 0 are within 0.01 of its bounds" in saturated.message


def _sigmoid_stack(depth: int = 16) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(10, 10), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(10, 3))


def test_a_deep_sigmoid_stack_has_vanishing_gradients_in_its_first_layers() -> None:
    doctor = Doctor(DiagnosticsConfig(every_steps=1))
    _fit(_sigmoid_stack(), doctor, max_epochs=1)
    vanishing = [f for f in doctor.findings if f.rule == "vanishing_gradients"]
    assert vanishing and vanishing[0].layer == "0" and vanishing[0].step == 2  # two measurements in a row
    assert "ReLU-family activations instead of sigmoid/tanh" in vanishing[0].remedy


def test_frozen_layers_are_never_measured_nor_reported_as_vanishing() -> None:
    model = _sigmoid_stack()
    for p in model[:20].parameters():  # the first ten Linear layers: a frozen backbone
        p.requires_grad_(False)
    doctor = Doctor(DiagnosticsConfig(every_steps=1))
    _fit(model, doctor, max_epochs=1)
    measured = {layer for m in doctor.series for layer in m["layers"]}
    assert measured == {str(i) for i in range(20, 33, 2)}
    assert [f for f in doctor.findings if f.rule == "vanishing_gradients"] == []


def test_a_layer_unfrozen_at_an_epoch_is_measured_from_that_epoch() -> None:
    """Unfreezing at epoch 1 happens at that epoch's start, after the doctor armed its hooks for the step: it takes
    the layers again, so the first step of epoch 1 (step 9 with 8 steps an epoch) measures the thawed layer."""
    from trainflow.core.config.finetune import FinetuneConfig
    from trainflow.core.training.finetune import Finetuning

    model = _relu_mlp()
    phase = Finetuning(FinetuneConfig(freeze=["0"], unfreeze_at_epoch=1), model)
    doctor = Doctor(DiagnosticsConfig(every_steps=9))
    _fit(model, [phase, doctor], max_epochs=2)
    assert [(m["step"], sorted(m["layers"])) for m in doctor.series] == [(1, ["2", "4"]), (9, ["0", "2", "4"])]


def test_a_skipped_non_finite_step_is_a_finding() -> None:
    calls = iter(range(1000))

    def nan_at_step_3(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(x), y)
        return loss * math.nan if next(calls) == 2 else loss

    doctor = Doctor(DiagnosticsConfig())
    assert _fit(_relu_mlp(), doctor, loss=nan_at_step_3, max_epochs=1).nonfinite_steps == 1
    skipped = _rules(doctor)[("nonfinite_steps", None)]
    assert (skipped.step, skipped.figure) == (3, 1.0) and "check the data for NaN or inf" in skipped.remedy


def test_an_lr_far_from_the_range_test_s_suggestion_is_a_finding_at_the_start() -> None:
    doctor = Doctor(DiagnosticsConfig(), lr=0.5, lr_suggestion=1e-3)
    _fit(_relu_mlp(), doctor, max_epochs=1, optim={"lr": 0.5})
    far = _rules(doctor)[("lr_far_from_suggestion", None)]
    assert (far.step, far.figure) == (0, 500.0) and "use the suggestion (optim.lr: auto)" in far.remedy


def test_a_healthy_fit_has_no_finding() -> None:
    doctor = Doctor(DiagnosticsConfig(every_steps=4, window_steps=16))
    _fit(_relu_mlp(), doctor, max_epochs=6)
    assert doctor.findings == []
    assert [m["step"] for m in doctor.series] == [1, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48]


# ----------------------------------------------------------------------------------------- the cost
def test_each_measurement_is_read_in_one_device_to_host_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every read of a tensor's value made by the doctor's modules is counted: one `tolist` per measurement."""
    reads: list[str] = []
    watched = ("layer_stats.py", "diagnostics.py", "doctor_rules.py")
    for name in ("tolist", "item", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
            if sys._getframe(1).f_code.co_filename.endswith(watched):
                reads.append(_name)
            return _original(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    doctor = Doctor(DiagnosticsConfig(every_steps=4, window_steps=8))
    _fit(_relu_mlp(), doctor, max_epochs=2)  # 16 steps: measured at 1, 4, 8, 12, 16
    assert len(doctor.series) == 5
    assert reads == ["tolist"] * 5
    assert set(doctor.series[-1]["layers"]) == {"0", "2", "4"}


def test_gradients_are_measured_once_final_after_the_last_micro_batch() -> None:
    """32 samples in one micro-batch or in two of 16 accumulated: the same gradients, so the same figures."""
    measured = []
    for batch, accum in ((32, 1), (16, 2)):
        doctor = Doctor(DiagnosticsConfig())
        _fit(_relu_mlp(), doctor, max_steps=1, batch_size=batch, grad_accum_steps=accum)
        measured.append({name: figures["grad_norm"] for name, figures in doctor.series[0]["layers"].items()})
    assert measured[0].keys() == {"0", "2", "4"}
    assert measured[0] == pytest.approx(measured[1], rel=1e-5)


def test_unmeasured_steps_carry_no_hooks() -> None:
    model = _relu_mlp()
    doctor = Doctor(DiagnosticsConfig(every_steps=10))
    seen: list[int] = []

    class _Counting(nn.Module):  # counts the forward hooks on the first layer at each forward pass
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(len(model[0]._forward_hooks))
            return self.inner(x)

    _fit(_Counting(), doctor, max_epochs=1, eval_every_steps=1)  # 8 steps of 16, each validated (2 batches)
    assert seen[:3] == [1, 0, 0] and set(seen[3:]) == {0}, "hooked for step 1's forward only, never in validation"


# ------------------------------------------------------------------------------------- rules as tables
@pytest.mark.parametrize(
    ("loss", "start", "lowest", "fires"),
    [(3.0, 2.3, 1.0, True), (1.9, 2.3, 0.5, False), (2.5, 2.3, 1.3, False), (math.nan, 2.3, 1.0, True),
     (0.02, 2.3, 0.005, False)],
)  # fmt: skip
def test_diverging_loss_needs_the_loss_above_its_start_and_twice_its_lowest(
    loss: float, start: float, lowest: float, fires: bool
) -> None:
    assert (rules.diverging_loss(7, loss, start, lowest) is not None) == fires


@pytest.mark.parametrize(
    ("losses", "fires"),
    [([(s, 1.0) for s in range(0, 201, 10)], True),  # flat at the start's level
     ([(s, 1.0 - s / 400) for s in range(0, 201, 10)], False),  # still falling
     ([(0, 1.0)] + [(s, 0.1) for s in range(10, 201, 10)], False),  # flat, but far below where it started
     ([(s, 1.0) for s in range(0, 100, 10)], False)],  # shorter than a window
)  # fmt: skip
def test_plateau_table(losses: list[tuple[int, float]], fires: bool) -> None:
    assert (rules.plateau(losses[-1][0], losses, 100, start=losses[0][1]) is not None) == fires


def test_one_finding_per_rule_and_layer_keeps_the_first_step_and_the_worst_figure() -> None:
    found: dict[tuple[str, str | None], Finding] = {}
    assert rules.merge(found, rules.dead_units(10, {"a": 0.6}, 0.5, 100)[0])
    assert not rules.merge(found, rules.dead_units(20, {"a": 0.9}, 0.5, 100)[0])
    assert not rules.merge(found, rules.dead_units(30, {"a": 0.7}, 0.5, 100)[0])
    assert rules.merge(found, rules.dead_units(30, {"b": 0.7}, 0.5, 100)[0])
    a = found[("dead_units", "a")]
    assert (a.step, a.figure, a.message[:3]) == (10, 0.9, "90%")
    assert rules.merge(found, rules.vanishing_gradients(5, "c", 1e-4, 1e-3))
    assert not rules.merge(found, rules.vanishing_gradients(6, "c", 1e-6, 1e-3))
    assert found[("vanishing_gradients", "c")].figure == 1e-6  # lower is worse


def test_a_finding_reads_as_one_line_naming_rule_step_layer_figure_and_remedy() -> None:
    f = rules.dead_units(40, {"net.0": 0.75}, 0.5, 200)[0]
    assert f.line() == ("dead_units (step 40, net.0): 75% of net.0's units never activated over the last 200 steps "
                        f"(> 50%). Remedy: {rules.REMEDIES['dead_units']}")  # fmt: skip
    assert json.loads(f.model_dump_json())["figure"] == 0.75


def test_every_rule_has_a_remedy_and_a_line_in_the_docs() -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "doctor.md").read_text()
    for rule in rules.REMEDIES:
        assert f"`{rule}`" in page, rule
    assert np.all([len(r) > 20 for r in rules.REMEDIES.values()])
