"""The training engine on tiny real problems: accumulation exactness, NaN guard, early stopping,
schedules, checkpoints and in-process resume."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.conftest import tiny_raw
from trainflow.core.config import EarlyStoppingConfig, OptimConfig, TrainConfig, config_from_dict
from trainflow.core.data.loaders import ArrayDataset, EpochSampler, Loaders
from trainflow.core.errors import ConfigError, TrainingError
from trainflow.core.prepare_data import prepare_data
from trainflow.core.train import train
from trainflow.core.training.callbacks import Callback, EarlyStopping, is_improvement
from trainflow.core.training.checkpoint import load_checkpoint, periodic_checkpoints
from trainflow.core.training.optim import build_optimizer, build_scheduler, lr_factor
from trainflow.core.training.spec import TrainingSpec
from trainflow.core.training.state import StopReason
from trainflow.core.training.trainer import Trainer


def _problem(n: int = 64, features: int = 10, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 3))


def _trainer(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, callbacks: list[Callback] = (), **train: Any
) -> Trainer:
    cfg = TrainConfig(**({"max_epochs": 2, "progress_bar": False, "grad_clip_norm": None} | train))
    dataset = ArrayDataset(x.numpy(), y.numpy())
    sampler = EpochSampler(len(dataset), seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=lambda b: b)
    val = torch.utils.data.DataLoader(dataset, batch_size=32, collate_fn=lambda b: b)
    optim_cfg = OptimConfig(lr=0.05, schedule="constant")
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, total_steps=100)
    return Trainer(model, optimizer, scheduler, Loaders(loader, val, val, sampler), cfg, torch.device("cpu"),
                   "classification", callbacks)  # fmt: skip


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------------------ accumulation
@pytest.mark.parametrize("micro_sizes", [[16, 16, 16, 16], [16, 16, 16, 10], [40, 24], [1] * 7])
def test_accumulated_micro_batches_give_the_update_of_one_batch(micro_sizes: list[int]) -> None:
    x, y = _problem(sum(micro_sizes))
    whole, split = _mlp(), _mlp()
    _trainer(whole, x, y).train_step([(x, y)])
    chunks = list(zip(torch.split(x, micro_sizes), torch.split(y, micro_sizes), strict=True))
    out = _trainer(split, x, y).train_step(chunks)
    assert out.finite
    for a, b in zip(_params(whole), _params(split), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_micro_16_x_accumulation_4_trains_like_batch_64_over_epochs() -> None:
    x, y = _problem(200)  # 200 = 3 x 64 + 8: the last step is a short window in both runs
    whole, split = _mlp(), _mlp()
    a = _trainer(whole, x, y, batch_size=64, max_epochs=3).fit()
    b = _trainer(split, x, y, batch_size=16, grad_accum_steps=4, max_epochs=3).fit()
    assert a.steps == b.steps == 12
    for p, q in zip(_params(whole), _params(split), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------- NaN guard
def test_a_non_finite_step_is_skipped_and_counted() -> None:
    x, y = _problem(64)
    model = _mlp()
    trainer = _trainer(model, x, y, batch_size=64)
    before = _params(model)
    bad = x.clone()
    bad[3, 0] = float("nan")
    out = trainer.train_step([(bad, y)])
    assert not out.finite
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model), strict=True)), "a NaN step changed weights"
    assert trainer.train_step([(x, y)]).finite


def test_training_stops_with_a_clear_error_after_n_non_finite_steps_in_a_row() -> None:
    x, y = _problem(64)
    x[0, 0] = float("inf")  # every batch of 64 holds it
    trainer = _trainer(_mlp(), x, y, batch_size=64, max_epochs=10, max_nonfinite_steps=3)
    with pytest.raises(
        TrainingError, match=r"3 optimizer steps in a row had non-finite gradients.*max_nonfinite_steps=3"
    ):
        trainer.fit()
    assert trainer.state.nonfinite_total == 3


# --------------------------------------------------------------------------- early stopping
class _Recorder:
    def __init__(self) -> None:
        self.stops: list[tuple[StopReason, str]] = []

    def request_stop(self, reason: StopReason, message: str) -> None:
        self.stops.append((reason, message))


@pytest.mark.parametrize(
    ("losses", "patience", "min_delta", "stop_at"),
    [
        ([6, 5, 5, 5, 5, 5], 3, 0.0, 4),
        ([6, 5, 4, 3, 2, 1], 1, 0.0, None),
        ([6, 5.9, 5.88, 5.7], 2, 0.15, 2),
        ([1, float("nan"), float("nan")], 2, 0.0, 2),
        ([3, 2, 3, 1, 3, 3], 2, 0.0, 5),
    ],
)
def test_early_stopping_table(losses: list[float], patience: int, min_delta: float, stop_at: int | None) -> None:
    callback = EarlyStopping(EarlyStoppingConfig(patience=patience, min_delta=min_delta))
    trainer = _Recorder()
    stopped = None
    for i, loss in enumerate(losses):
        callback.on_eval_end(trainer, {"val/loss": loss})  # type: ignore[arg-type]
        if trainer.stops and stopped is None:
            stopped = i
    assert stopped == stop_at
    if stop_at is not None:
        assert trainer.stops[0][0] is StopReason.EARLY_STOPPING
        assert f"patience {patience}" in trainer.stops[0][1]


def test_improvement_respects_mode_and_delta() -> None:
    assert is_improvement(0.9, 0.8, "max", 0.05)
    assert not is_improvement(0.84, 0.8, "max", 0.05)
    assert is_improvement(0.1, None, "min", 0.0)
    assert not is_improvement(float("nan"), None, "min", 0.0)


def test_unknown_monitor_is_a_config_error_before_training(store) -> None:
    cfg = config_from_dict(tiny_raw(train={"early_stopping": {"monitor": "val/f1"}}))
    data = prepare_data(cfg.data, cfg.seed, store)
    with pytest.raises(ConfigError, match=r"train.early_stopping.monitor: 'val/f1'.*available: val/loss, val/accuracy"):
        train(TrainingSpec.of(cfg, data), store, "t")
    assert not list((store.root / "t").glob("*.pt"))


# ------------------------------------------------------------------------ optimizer, schedule
def test_weight_decay_only_on_weight_matrices() -> None:
    model = _mlp()
    groups = build_optimizer(model, OptimConfig(lr=0.01, weight_decay=0.1)).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2), name


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_then_decay_to_the_floor(schedule: str) -> None:
    cfg = OptimConfig(schedule=schedule, warmup_steps=4, min_lr_ratio=0.1)
    factors = [lr_factor(step, 20, cfg) for step in range(21)]
    assert factors[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert factors[4] == pytest.approx(1.0)
    assert factors[20] == pytest.approx(1.0 if schedule == "constant" else 0.1)
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(factors[4:])), "decay is monotone"


# ------------------------------------------------------------------------------- precision
def test_bf16_autocast_trains_on_cpu(store) -> None:
    cfg = config_from_dict(tiny_raw(train={"precision": "bf16", "max_epochs": 8}))
    data = prepare_data(cfg.data, cfg.seed, store)
    result = train(TrainingSpec.of(cfg, data), store, "bf16")
    assert result.best_metrics["val/accuracy"] > 0.8
    assert result.nonfinite_steps == 0


def test_fp16_on_cpu_is_refused_before_training(store) -> None:
    cfg = config_from_dict(tiny_raw(train={"precision": "fp16"}))
    data = prepare_data(cfg.data, cfg.seed, store)
    with pytest.raises(ConfigError, match=r"train.precision: 'fp16' needs a CUDA device.*use bf16"):
        train(TrainingSpec.of(cfg, data), store, "fp16")


# ---------------------------------------------------------------------- logging cadence
class _Logger:
    def __init__(self) -> None:
        self.steps: list[tuple[int, tuple[str, ...]]] = []
        self.params: dict[str, Any] = {}

    def log_params(self, params: dict[str, Any]) -> None:
        self.params |= params

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.steps.append((step, tuple(sorted(metrics))))

    def flush(self) -> None:
        pass


def test_train_metrics_are_logged_at_the_interval_and_eval_metrics_each_epoch(store) -> None:
    cfg = config_from_dict(
        tiny_raw(train={"log_every_steps": 4, "max_epochs": 3, "early_stopping": {"enabled": False}})
    )
    data = prepare_data(cfg.data, cfg.seed, store)
    logger = _Logger()
    result = train(TrainingSpec.of(cfg, data), store, "log", logger=logger)
    train_steps = [s for s, keys in logger.steps if "train/loss" in keys]
    eval_steps = [s for s, keys in logger.steps if "val/loss" in keys]
    assert train_steps == list(range(4, result.steps + 1, 4))
    assert len(eval_steps) == 3
    assert {"train/grad_norm", "lr", "train/samples_per_s", "train/peak_memory_mb"} <= set(logger.steps[0][1])
    assert logger.params["effective_batch_size"] == 16


# --------------------------------------------------------------------- checkpoints, resume
class _CrashAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.step == self.step:
            raise KeyboardInterrupt("simulated crash")


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(folder / "model.pt")["model"]


def test_resume_after_a_crash_gives_the_weights_of_an_uninterrupted_run(store) -> None:
    raw = tiny_raw(
        model={"dropout": 0.2},  # dropout draws from the global RNG: resume must restore it
        train={"max_epochs": 5, "checkpoint": {"every_steps": 3, "keep_last": 2}, "early_stopping": {"patience": 100}},
    )
    cfg = config_from_dict(raw)
    data = prepare_data(cfg.data, cfg.seed, store)
    args = (TrainingSpec.of(cfg, data), store)
    full = train(*args, "full")
    with pytest.raises(KeyboardInterrupt):
        train(*args, "resumed", callbacks=[_CrashAt(step=13)])  # mid-epoch 2 (8 steps per epoch)
    assert [p.name for p in periodic_checkpoints(store.root / "resumed")] == ["step-000000009.pt", "step-000000012.pt"]
    resumed = train(*args, "resumed")
    assert resumed.resumed_from_step == 12
    assert resumed.steps == full.steps
    assert resumed.best_step == full.best_step
    for name, tensor in _state(store.root / "full").items():
        torch.testing.assert_close(_state(store.root / "resumed")[name], tensor, rtol=0, atol=0)
    last = load_checkpoint(periodic_checkpoints(store.root / "resumed")[-1])
    reference = load_checkpoint(periodic_checkpoints(store.root / "full")[-1])
    for name, tensor in reference["model"].items():
        torch.testing.assert_close(last["model"][name], tensor, rtol=0, atol=0)
    assert last["state"] == reference["state"]


def test_keep_last_k_periodic_checkpoints_and_the_best(store) -> None:
    cfg = config_from_dict(tiny_raw(train={"max_epochs": 4, "checkpoint": {"keep_last": 2, "min_interval_s": 0}}))
    data = prepare_data(cfg.data, cfg.seed, store)
    result = train(TrainingSpec.of(cfg, data), store, "k")
    folder = store.root / "k"
    assert [p.name for p in periodic_checkpoints(folder)] == ["step-000000024.pt", "step-000000032.pt"]
    best = load_checkpoint(folder / "best.pt")
    assert best["step"] == result.best_step
    assert best["metrics"]["val/loss"] == pytest.approx(result.best_val_loss)
    payload = load_checkpoint(periodic_checkpoints(folder)[-1])
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "state", "callbacks", "config"} <= set(payload)
    assert payload["state"]["epoch"] == 4 and payload["state"]["batch_in_epoch"] == 0
    assert not list(folder.glob(".*tmp*")), "no temp files left behind"


def test_an_unloadable_checkpoint_stops_the_run_instead_of_restarting(store) -> None:
    cfg = config_from_dict(tiny_raw(train={"max_epochs": 2}))
    data = prepare_data(cfg.data, cfg.seed, store)
    args = (TrainingSpec.of(cfg, data), store, "bad")
    train(*args)
    latest = periodic_checkpoints(store.root / "bad")[-1]
    latest.write_bytes(latest.read_bytes()[:100])
    with pytest.raises(TrainingError, match=rf"{latest.name}: checkpoint cannot be loaded.*train.resume=false"):
        train(*args)


def test_resume_false_starts_over(store) -> None:
    cfg = config_from_dict(tiny_raw(train={"max_epochs": 2}))
    data = prepare_data(cfg.data, cfg.seed, store)
    spec = TrainingSpec.of(cfg, data)
    first = train(spec, store, "again")
    second = train(spec.with_values({"train.resume": False}), store, "again")
    assert second.resumed_from_step is None
    assert second.steps == first.steps
    assert math.isclose(second.best_val_loss, first.best_val_loss, rel_tol=1e-6)


def test_by_default_short_epochs_do_not_each_pay_a_checkpoint(store) -> None:
    cfg = config_from_dict(tiny_raw(train={"max_epochs": 5}))  # checkpoint.min_interval_s = 60
    data = prepare_data(cfg.data, cfg.seed, store)
    result = train(TrainingSpec.of(cfg, data), store, "rare")
    folder = store.root / "rare"
    assert [p.name for p in periodic_checkpoints(folder)] == [f"step-{result.steps:09d}.pt"], "only the final state"
    best = load_checkpoint(folder / "best.pt")
    assert best["step"] == result.best_step
    last = load_checkpoint(periodic_checkpoints(folder)[-1])
    saved_best = last["callbacks"]["ModelCheckpoint"]["best_weights"]
    for name, tensor in best["model"].items():
        assert torch.equal(saved_best[name], tensor), "the periodic checkpoint carries the best weights for resume"


def test_loader_workers_see_the_same_batches_as_the_main_process(store) -> None:
    results = []
    for loader in ({"num_workers": 0}, {"num_workers": 2, "persistent_workers": True, "prefetch_factor": 4}):
        cfg = config_from_dict(tiny_raw(data={"loader": loader}, train={"max_epochs": 2}))
        data = prepare_data(cfg.data, cfg.seed, store)
        results.append(train(TrainingSpec.of(cfg, data), store, str(loader)))
    assert results[0].best_val_loss == results[1].best_val_loss
