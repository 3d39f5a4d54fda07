"""The loop's measurements and scaling: the loader-wait fraction and throughput windows, LR scaling over
ranks, and the CUDA-only switches (channels-last, TF32) staying off on CPU."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import tiny_raw
from tests.core.test_trainer import _mlp, _problem
from tests.core.test_trainer_features import Recorder, StateAt, _trainer
from trainflow.core.config import config_from_dict
from trainflow.core.config.distributed import DistributedConfig
from trainflow.core.data.loaders import ArrayDataset, Batch
from trainflow.core.models import build_model
from trainflow.core.prepare_data import prepare_data
from trainflow.core.storage.store import LocalStore
from trainflow.core.training.builder import build_trainer
from trainflow.core.training.checkpoint import FINAL, load_checkpoint, periodic_checkpoints
from trainflow.core.training.fit import fit_in_folder
from trainflow.core.training.parallel import uses_channels_last
from trainflow.core.training.spec import TrainingSpec

LR = 0.01


# ---------------------------------------------------------------------- data wait fraction
class SlowDataset(ArrayDataset):
    """An ArrayDataset whose batch fetch takes `delay_s` (a slow disk or decoder)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, delay_s: float):
        super().__init__(x, y)
        self.delay_s = delay_s

    def __getitems__(self, indices: list[int]) -> Batch:
        if self.delay_s:  # sleep(0) would yield the CPU: on a busy machine, a wait of its own
            time.sleep(self.delay_s)
        return super().__getitems__(indices)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Timing tests on one intra-op thread: on a busy machine, spinning OpenMP workers distort short timings."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _wait_fractions(delay_s: float, sleep_before_fit: float = 0.0) -> list[float]:
    """train/data_wait_fraction at each log of a 1-epoch fit (8 steps, a log every 4) whose loader takes `delay_s`
    per batch; the model is wide enough that a step's compute dwarfs an in-memory batch fetch."""
    x, y = _problem(256)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 3))
    recorder = Recorder()
    trainer = _trainer(model, SlowDataset(x.numpy(), y.numpy(), delay_s), callbacks=[recorder], batch_size=32,
                       max_epochs=1, log_every_steps=4)  # fmt: skip
    time.sleep(sleep_before_fit)
    trainer.fit()
    fractions = [m["train/data_wait_fraction"] for _, m in recorder.logs]
    assert len(fractions) == 2 and all(0.0 <= f <= 1.0 for f in fractions), fractions
    return fractions


@pytest.mark.usefixtures("one_thread")
def test_data_wait_fraction_is_large_with_a_slow_loader_and_small_without() -> None:
    slow = _wait_fractions(delay_s=0.06)
    fast = _wait_fractions(delay_s=0.0)
    assert min(slow) > 0.5, slow
    assert max(fast) < 0.3, fast


@pytest.mark.usefixtures("one_thread")
def test_time_before_fit_does_not_dilute_the_first_windows_wait_fraction() -> None:
    slow = _wait_fractions(delay_s=0.06, sleep_before_fit=1.0)  # e.g. a checkpoint restore, MLflow params
    assert slow[0] > 0.5, slow


@pytest.mark.usefixtures("one_thread")
def test_throughput_after_a_resume_counts_only_the_new_samples() -> None:
    x, y = _problem(128)
    data = SlowDataset(x.numpy(), y.numpy(), 0.05)  # the loader sets the pace: every window takes the same time
    crash = StateAt(step=6)  # a periodic checkpoint mid-run, and the process dies
    settings = {"batch_size": 16, "max_steps": 12, "log_every_steps": 2, "max_epochs": 3, "eval_every_steps": 100}
    _trainer(_mlp(), data, callbacks=[crash], **settings).fit()  # eval only at the end: windows are all training
    recorder = Recorder()
    resumed = _trainer(_mlp(), data, callbacks=[recorder], **settings)
    resumed.restore(crash.payload)
    resumed.fit()
    rates = [m["train/samples_per_s"] for _, m in recorder.logs]
    assert len(rates) == 3
    assert rates[0] < 1.5 * rates[1], f"first window after resume: {rates}"


# ------------------------------------------------------------------------------- LR scaling
@pytest.mark.parametrize(
    ("scaling", "nproc", "nnodes", "tuned", "factor"),
    [
        ("linear", 2, 1, 1, 2.0),
        ("sqrt", 2, 1, 1, math.sqrt(2)),
        ("none", 2, 1, 1, 1.0),
        ("linear", 2, 2, 1, 4.0),
        ("linear", 2, 1, 2, 1.0),
        ("sqrt", 1, 1, 1, 1.0),
    ],
)
def test_lr_scale_follows_the_world_size(scaling: str, nproc: int, nnodes: int, tuned: int, factor: float) -> None:
    cfg = DistributedConfig(nproc_per_node=nproc, nnodes=nnodes, lr_scaling=scaling, tuned_world_size=tuned,
                            rdzv_endpoint="localhost:29400")  # fmt: skip
    assert cfg.lr_scale() == pytest.approx(factor)


class JsonLinesLogger:
    """A MetricLogger (picklable: it travels to the main rank) that appends to a file, with the rank."""

    def __init__(self, path: Path):
        self.path = path

    def log_params(self, params: dict[str, Any]) -> None:
        self._write({"params": params})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._write({"step": step, "metrics": metrics})

    def flush(self) -> None:
        pass

    def _write(self, entry: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(entry | {"rank": os.environ.get("RANK")}) + "\n")


@pytest.mark.slow
def test_linear_lr_scaling_on_two_ranks_trains_at_twice_the_lr(store: LocalStore, tmp_path: Path) -> None:
    def cfg(world: int, batch: int, lr: float, scaling: str) -> Any:
        distributed = {
            "nproc_per_node": world,
            "rdzv_endpoint": "localhost:0",
            "lr_scaling": scaling,
            "collective_timeout_s": 30,
        }
        return config_from_dict(tiny_raw(
            optim={"lr": lr, "schedule": "constant"},
            train={"batch_size": batch, "max_epochs": 2, "max_steps": 8, "log_every_steps": 4,
                   "checkpoint": {"every_steps": 8}, "early_stopping": {"enabled": False, "restore_best": False},
                   "distributed": distributed},
        ))  # fmt: skip

    def fit(c: Any, key: str, logger: Any = None) -> Any:
        data = prepare_data(c.data, c.seed, store)
        return fit_in_folder(TrainingSpec.of(c, data), store, key, logger=logger)

    log_file = tmp_path / "metrics.jsonl"
    two = fit(cfg(2, 8, LR, "linear"), "two", JsonLinesLogger(log_file))
    fit(cfg(1, 16, 2 * LR, "none"), "one")  # one process at 2 x lr on the same global batches
    assert two.world_size == 2 and two.effective_batch_size == 16
    payload = load_checkpoint(periodic_checkpoints(store.workdir("two"))[-1])
    assert [g["lr"] for g in payload["optimizer"]["param_groups"]] == pytest.approx([2 * LR] * 2)
    assert payload["scheduler"]["base_lrs"] == pytest.approx([2 * LR] * 2)
    entries = [json.loads(line) for line in log_file.read_text().splitlines()]
    train_logs = [e for e in entries if "train/loss" in e.get("metrics", {})]
    assert [e["step"] for e in train_logs] == [4, 8], "logged once per log point, by the main rank only"
    assert {e["rank"] for e in entries} == {"0"}
    assert all(e["metrics"]["lr"] == pytest.approx(2 * LR) for e in train_logs)
    # rank 1 at another lr would drift from rank 0 and change the averaged gradients: the weights tell
    for name, tensor in load_checkpoint(store.workdir("one") / FINAL)["model"].items():
        torch.testing.assert_close(load_checkpoint(store.workdir("two") / FINAL)["model"][name], tensor,
                                   atol=2e-6, rtol=1e-5)  # fmt: skip


# ------------------------------------------------------------------ CUDA-only switches on CPU
def test_channels_last_and_tf32_stay_off_on_cpu(store: LocalStore) -> None:
    raw = tiny_raw(data={"name": "digits"}, train={"device": "cpu", "batch_size": 8})
    cfg = config_from_dict(raw | {"model": {"name": "cnn", "channels": [8, 16]}})
    data = prepare_data(cfg.data, cfg.seed, store)
    cnn = build_model(cfg.model, data.spec)
    assert not uses_channels_last(cnn, torch.device("cpu"))
    assert uses_channels_last(cnn, torch.device("cuda")), "a CNN on CUDA would go channels-last"
    assert not uses_channels_last(_mlp(), torch.device("cuda")), "no convolution, no channels-last"
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    trainer = build_trainer(TrainingSpec.of(cfg, data), store)
    assert trainer.input_format == torch.preserve_format
    convs = [m for m in trainer.module.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous() for m in convs), "weights stay in the default layout"
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == tf32
    assert trainer.train_step([next(iter(trainer.loaders.train))]).finite
