"""`train.batch_size: auto` finds the largest micro-batch under a (simulated) memory limit, once, and a CUDA
out-of-memory error in a step splits the micro-batch and multiplies accumulation: the weights end as a run
started at the smaller micro-batch with the larger accumulation."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from tests.conftest import tiny_raw
from trainflow.core.config import config_from_dict
from trainflow.core.errors import TrainingError
from trainflow.core.prepare_data import prepare_data
from trainflow.core.storage.store import LocalStore
from trainflow.core.train import train
from trainflow.core.training.batch_size import RECORDS, largest_fitting
from trainflow.core.training.checkpoint import FINAL, load_checkpoint
from trainflow.core.training.spec import TrainingSpec


@pytest.mark.parametrize(("threshold", "limit"), [(1, 100), (2, 100), (37, 100), (64, 100), (100, 100), (500, 124)])
def test_largest_fitting_finds_the_threshold_by_doubling_then_bisection(threshold: int, limit: int) -> None:
    tried: list[int] = []

    def fits(size: int) -> bool:
        tried.append(size)
        return size <= threshold

    assert largest_fitting(fits, limit) == min(threshold, limit)
    assert len(tried) <= 2 * limit.bit_length() + 1, tried


def test_largest_fitting_fails_clearly_when_nothing_fits() -> None:
    with pytest.raises(TrainingError, match="not even a micro-batch of 1 fits"):
        largest_fitting(lambda size: False, 50)


def _cfg(max_batch: int, **train: Any) -> Any:
    model = {
        "name": "factory",
        "factory": "tests.core.factories:memory_limited_net",
        "params": {"max_batch": max_batch},
    }
    settings = {"max_epochs": 2, "early_stopping": {"enabled": False, "restore_best": False}} | train
    raw = tiny_raw(train=settings)
    raw["model"] = model  # replaces the MLP (tiny_raw merges sections)
    return config_from_dict(raw)


def _train(cfg: Any, store: LocalStore, key: str) -> Any:
    data = prepare_data(cfg.data, cfg.seed, store)
    return train(TrainingSpec.of(cfg, data), store, key)


@pytest.mark.slow
def test_auto_batch_size_is_the_largest_under_the_limit_and_is_searched_once(store: LocalStore) -> None:
    first = _train(_cfg(37, batch_size="auto"), store, "auto-1")
    assert first.micro_batch_size == 37 and first.effective_batch_size == 37
    records = list((store.root / RECORDS).glob("*.json"))
    assert len(records) == 1
    trials = json.loads(records[0].read_text())["trials"]
    assert trials["37"] is True and trials["38"] is False
    records[0].write_text(json.dumps({"batch_size": 20, "trials": {}}))  # a re-run reads the record, no search
    assert _train(_cfg(37, batch_size="auto"), store, "auto-2").micro_batch_size == 20


@pytest.mark.slow
def test_auto_batch_size_runs_as_the_explicit_size_would(store: LocalStore) -> None:
    _train(_cfg(37, batch_size="auto"), store, "auto")
    _train(_cfg(37, batch_size=37), store, "explicit")
    auto, explicit = (load_checkpoint(store.workdir(k) / FINAL)["model"] for k in ("auto", "explicit"))
    for name in auto:
        torch.testing.assert_close(auto[name], explicit[name], rtol=0, atol=0)


def test_out_of_memory_splits_the_micro_batch_and_keeps_the_update(store: LocalStore) -> None:
    recovered = _train(_cfg(8, batch_size=16, grad_accum_steps=1), store, "recovered")
    assert recovered.micro_batch_size == 8 and recovered.effective_batch_size == 16
    planned = _train(_cfg(8, batch_size=8, grad_accum_steps=2), store, "planned")
    assert recovered.steps == planned.steps
    a, b = (load_checkpoint(store.workdir(k) / FINAL)["model"] for k in ("recovered", "planned"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)
    three = _train(_cfg(5, batch_size=15, grad_accum_steps=2), store, "odd")
    assert three.micro_batch_size == 5 and three.effective_batch_size == 30  # 15 = 3 x 5: split by 3


def test_out_of_memory_at_a_micro_batch_of_one_is_a_clear_error(store: LocalStore) -> None:
    with pytest.raises(TrainingError, match=r"CUDA out of memory at micro-batch 1 \(a micro-batch of 1 cannot"):
        _train(_cfg(0, batch_size=4), store, "none")
