"""Trainer features beyond the plain loop: the deferred non-finite check of a fused optimizer, and
torch.compile with its eager fallback. (The loader-wait fraction, LR scaling and the CUDA-only switches:
test_trainer_scaling.py.)"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import tiny_raw
from tests.core.test_trainer import _mlp, _problem
from trainflow.core.config import TrainConfig, config_from_dict
from trainflow.core.data.loaders import ArrayDataset, Batch, EpochSampler, Loaders
from trainflow.core.errors import TrainingError
from trainflow.core.prepare_data import prepare_data
from trainflow.core.storage.store import LocalStore
from trainflow.core.training.builder import build_trainer
from trainflow.core.training.callbacks import Callback
from trainflow.core.training.spec import TrainingSpec
from trainflow.core.training.state import StopReason
from trainflow.core.training.trainer import Trainer

LR = 0.01


# ----------------------------------------------------------------------------------- helpers
def _trainer(
    model: nn.Module,
    data: ArrayDataset,
    fused: bool = False,
    callbacks: Iterable[Callback] = (),
    loss: Any = None,
    module: nn.Module | None = None,
    **train: Any,
) -> Trainer:
    """A CPU Trainer over `data` with AdamW (fused or the single-tensor path) at a constant LR."""
    cfg = TrainConfig(**({"max_epochs": 2, "batch_size": 16, "progress_bar": False, "grad_clip_norm": None} | train))
    sampler = EpochSampler(len(data), seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, sampler=sampler, collate_fn=_same)
    val = torch.utils.data.DataLoader(data, batch_size=32, collate_fn=_same)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return Trainer(model, optimizer, scheduler, Loaders(loader, val, val, sampler), cfg, torch.device("cpu"),
                   "classification", list(callbacks), loss=loss, module=module)  # fmt: skip


def _same(batch: Batch) -> Batch:
    return batch  # __getitems__ already returns the batch's tensors


def _dataset(x: torch.Tensor, y: torch.Tensor) -> ArrayDataset:
    return ArrayDataset(x.numpy(), y.numpy())


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_params(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 0.0) -> None:
    assert len(a) == len(b)
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=atol)


def _optimizer_state(optimizer: torch.optim.Optimizer) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in optimizer.state[p].items()} for g in optimizer.param_groups for p in g["params"]]


class NaNLossAt:
    """A loss hook whose loss (so every gradient) is NaN at the chosen 1-based calls."""

    def __init__(self, calls: Iterable[int]):
        self.calls, self.n = set(calls), 0

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.n += 1
        loss = F.cross_entropy(model(x), y)
        return loss * float("nan") if self.n in self.calls else loss


class Recorder(Callback):
    """What the loop shows its callbacks: metrics at each log, the non-finite count after each step."""

    def __init__(self) -> None:
        self.logs: list[tuple[int, dict[str, float]]] = []
        self.nonfinite: list[int] = []  # state.nonfinite_total after steps 1, 2, ...

    def on_log(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.logs.append((trainer.state.step, metrics))

    def on_step_end(self, trainer: Trainer) -> None:
        self.nonfinite.append(trainer.state.nonfinite_total)


class StateAt(Callback):
    """Keeps a copy of the trainer's checkpoint state at `step` (what a periodic checkpoint holds), then stops."""

    def __init__(self, step: int):
        self.step, self.payload = step, None

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.step == self.step:
            self.payload = copy.deepcopy(trainer.checkpoint_state())
            trainer.request_stop(StopReason.EARLY_STOPPING, "simulated crash")


# -------------------------------------------------------------- deferred non-finite check (fused)
def test_fused_and_single_tensor_adamw_train_to_the_same_weights() -> None:
    data = _dataset(*_problem(64))
    fused_model, plain_model = _mlp(), _mlp()
    fused = _trainer(fused_model, data, fused=True, max_steps=6)
    plain = _trainer(plain_model, data, fused=False, max_steps=6)
    assert fused.deferred_finite_check and not plain.deferred_finite_check
    assert fused.fit().steps == plain.fit().steps == 6
    _assert_params(_params(fused_model), _params(plain_model), atol=1e-6)


def test_a_deferred_nan_step_leaves_weights_and_optimizer_state_unchanged() -> None:
    x, y = _problem(64)
    model = _mlp()
    trainer = _trainer(model, _dataset(x, y), fused=True, batch_size=64)
    assert trainer.deferred_finite_check
    first = trainer.train_step([(x, y)])  # creates the optimizer state (step 1, moments)
    assert isinstance(first.finite, torch.Tensor) and first.finite.item()
    weights, state = _params(model), _optimizer_state(trainer.optimizer)
    bad = x.clone()
    bad[3, 0] = float("nan")
    out = trainer.train_step([(bad, y)])
    assert isinstance(out.finite, torch.Tensor), "the check is deferred: a device tensor, no host sync"
    assert out.finite.dtype == torch.bool and out.finite.ndim == 0 and not out.finite.item()
    _assert_params(_params(model), weights)
    after = _optimizer_state(trainer.optimizer)
    for before_p, after_p in zip(state, after, strict=True):
        assert before_p.keys() == after_p.keys()
        for key in before_p:
            assert torch.equal(before_p[key], after_p[key]), f"optimizer state '{key}' changed on a skipped step"
    assert trainer.train_step([(x, y)]).finite.item()  # type: ignore[union-attr]
    assert not all(torch.equal(a, b) for a, b in zip(weights, _params(model), strict=True)), "training goes on"


def test_a_skipped_fused_step_is_the_same_skip_as_the_single_tensor_one() -> None:
    data = _dataset(*_problem(64))
    fused_model, plain_model = _mlp(), _mlp()
    fused = _trainer(fused_model, data, fused=True, loss=NaNLossAt({3}), max_steps=8, log_every_steps=2).fit()
    plain = _trainer(plain_model, data, fused=False, loss=NaNLossAt({3}), max_steps=8, log_every_steps=2).fit()
    assert fused.nonfinite_steps == plain.nonfinite_steps == 1
    _assert_params(_params(fused_model), _params(plain_model), atol=1e-6)


def test_deferred_non_finite_steps_are_counted_when_metrics_are_collected() -> None:
    data = _dataset(*_problem(64))
    fused_rec, plain_rec = Recorder(), Recorder()
    _trainer(_mlp(), data, fused=True, callbacks=[fused_rec], loss=NaNLossAt({2}), max_steps=8,
             log_every_steps=4).fit()  # fmt: skip
    _trainer(_mlp(), data, fused=False, callbacks=[plain_rec], loss=NaNLossAt({2}), max_steps=8,
             log_every_steps=4).fit()  # fmt: skip
    assert plain_rec.nonfinite == [0, 1, 1, 1, 1, 1, 1, 1], "non-fused: counted at the step"
    assert fused_rec.nonfinite == [0, 0, 0, 1, 1, 1, 1, 1], "fused: counted at the log point (step 4)"
    assert [step for step, _ in fused_rec.logs] == [4, 8]


def test_consecutive_deferred_nan_steps_raise_at_the_next_log_point() -> None:
    x, y = _problem(64)
    model, reference = _mlp(), _mlp()
    recorder = Recorder()
    trainer = _trainer(model, _dataset(x, y), fused=True, callbacks=[recorder], loss=NaNLossAt(range(2, 100)),
                       max_steps=40, max_epochs=20, log_every_steps=5, max_nonfinite_steps=3)  # fmt: skip
    with pytest.raises(TrainingError, match=r"3 optimizer steps in a row had non-finite gradients"):
        trainer.fit()
    assert trainer.state.step == 5, "raised at the log point after the third NaN step, not at once"
    assert len(recorder.nonfinite) == 4 and recorder.nonfinite[-1] == 0
    assert trainer.state.nonfinite_total == 3
    ref = _trainer(reference, _dataset(x, y), fused=True, max_steps=1)
    ref.fit()
    _assert_params(_params(model), _params(reference))  # the NaN steps after step 1 changed nothing


def test_a_fused_fit_ending_between_log_points_counts_its_skipped_step() -> None:
    data = _dataset(*_problem(64))
    plain = _trainer(_mlp(), data, fused=False, loss=NaNLossAt({6}), max_steps=6, log_every_steps=4).fit()
    assert plain.nonfinite_steps == 1
    fused = _trainer(_mlp(), data, fused=True, loss=NaNLossAt({6}), max_steps=6, log_every_steps=4).fit()
    assert fused.nonfinite_steps == 1


def test_a_fused_fit_of_only_nan_steps_shorter_than_the_log_interval_fails() -> None:
    data = _dataset(*_problem(64))
    settings = {"max_steps": 4, "log_every_steps": 25, "max_nonfinite_steps": 3}
    with pytest.raises(TrainingError, match=r"3 optimizer steps in a row"):
        _trainer(_mlp(), data, fused=False, loss=NaNLossAt(range(1, 100)), **settings).fit()
    with pytest.raises(TrainingError, match=r"3 optimizer steps in a row"):
        _trainer(_mlp(), data, fused=True, loss=NaNLossAt(range(1, 100)), **settings).fit()


# ---------------------------------------------------------------------------------- compile
def _broken_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
    raise RuntimeError("this backend cannot compile anything")


def test_a_model_that_cannot_compile_trains_in_eager_mode_to_the_same_weights(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch._dynamo.reset()
    data = _dataset(*_problem(64))
    eager_model, inner = _mlp(), _mlp()
    compiled = torch.compile(inner, backend=_broken_backend)
    eager = _trainer(eager_model, data, max_epochs=2, compile=False).fit()
    trainer = _trainer(compiled, data, module=inner, max_epochs=2, compile=True)
    with caplog.at_level(logging.WARNING, logger="trainflow.core.training.trainer"):
        result = trainer.fit()
    warnings = [r.getMessage() for r in caplog.records if "train.compile: compiling failed" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert "training in eager mode" in warnings[0]
    assert trainer.model is inner, "the compiled wrapper is dropped"
    assert result.steps == eager.steps == 8
    _assert_params(_params(inner), _params(eager_model))
    assert result.last_metrics["val/loss"] == pytest.approx(eager.last_metrics["val/loss"], rel=1e-6)


def test_compile_true_through_build_trainer_compiles_and_trains_on_cpu(
    store: LocalStore, caplog: pytest.LogCaptureFixture
) -> None:
    torch._dynamo.reset()
    weights, metrics = [], []
    for compile_ in (False, True):
        # 124 train / 27 val rows in batches of 31: one training shape and one evaluation shape, two compiles
        cfg = config_from_dict(tiny_raw(train={"compile": compile_, "batch_size": 31, "max_epochs": 1,
                                               "device": "cpu"}))  # fmt: skip
        data = prepare_data(cfg.data, cfg.seed, store)
        trainer = build_trainer(TrainingSpec.of(cfg, data), store)
        with caplog.at_level(logging.WARNING, logger="trainflow.core.training.trainer"):
            result = trainer.fit()
        assert result.steps == 4
        assert hasattr(trainer.model, "_orig_mod") == compile_, "compiled, and still compiled after training"
        weights.append(_params(trainer.module))
        metrics.append(result.last_metrics)
    assert "compiling failed" not in caplog.text
    _assert_params(weights[0], weights[1], atol=1e-5)
    assert metrics[1]["val/loss"] == pytest.approx(metrics[0]["val/loss"], rel=1e-4)
