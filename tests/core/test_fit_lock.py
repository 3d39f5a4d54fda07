"""Two runs training the same thing on one machine (two flows of one config, a schedule beside an event) take
turns on the fit's folder: the second waits, then resumes from what the first left; never both at once."""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from tests.conftest import tiny_raw
from trainflow.core.config import config_from_dict
from trainflow.core.prepare_data import prepare_data
from trainflow.core.train import train
from trainflow.core.training.callbacks import Callback
from trainflow.core.training.checkpoint import load_checkpoint
from trainflow.core.training.spec import TrainingSpec
from trainflow.core.training.state import FitResult
from trainflow.core.training.trainer import Trainer


class _Span(Callback):
    """When this fit trained: its first and last moments."""

    def __init__(self) -> None:
        self.started = self.ended = 0.0

    def on_fit_start(self, trainer: Trainer) -> None:
        self.started = time.monotonic()

    def on_step_end(self, trainer: Trainer) -> None:
        time.sleep(0.01)  # long enough for the other run to try

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        self.ended = time.monotonic()


def test_a_second_run_of_the_same_fit_waits_then_resumes_what_the_first_finished(store) -> None:
    cfg = config_from_dict(tiny_raw(train={"max_epochs": 3, "early_stopping": {"enabled": False}}))
    data = prepare_data(cfg.data, cfg.seed, store)
    spans, results = [_Span(), _Span()], [None, None]

    def run(i: int) -> None:
        results[i] = train(TrainingSpec.of(cfg, data), store, "same",
                           callbacks=[spans[i]])  # fmt: skip

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join(timeout=120)
    first, second = sorted(range(2), key=lambda i: spans[i].started)
    assert spans[second].started >= spans[first].ended  # one after the other
    done: Any = results[first]
    assert results[second].resumed_from_step == done.steps and results[second].steps == done.steps
    train(TrainingSpec.of(cfg, data), store, "alone")
    alone = load_checkpoint(store.root / "alone" / "model.pt")["model"]
    for name, tensor in load_checkpoint(store.root / "same" / "model.pt")["model"].items():
        torch.testing.assert_close(tensor, alone[name], rtol=0, atol=0)
