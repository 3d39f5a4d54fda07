"""A signal during a fit (a cancelled flow run's SIGTERM, Ctrl-C) leaves a checkpoint at the end of a step,
then its exception goes on as usual; a re-run resumes from it to the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from core.config import config_from_dict
from core.prepare_data import prepare_data
from core.train import train
from core.training.callbacks import Callback
from core.training.checkpoint import load_checkpoint, periodic_checkpoints
from core.training.trainer import Trainer
from tests.conftest import tiny_raw


class _Signal(Callback):
    """Sends `signum` to this process at the end of step `step` (a real signal, delivered by the OS)."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.step == self.step:
            os.kill(os.getpid(), self.signum)


class _Cancelled(BaseException):
    """Stands for Prefect's TerminationSignal: what the handler in place before the fit raises."""


@pytest.fixture
def prefect_like_sigterm() -> Iterator[None]:
    """SIGTERM raises as Prefect's handler does; SIGINT is Python's own (another test's library may have left
    its handler there)."""

    def handler(signum: int, frame: Any) -> None:
        raise _Cancelled

    previous = signal.signal(signal.SIGTERM, handler), signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGTERM, previous[0])
    signal.signal(signal.SIGINT, previous[1])


def _setup(store) -> tuple[Any, ...]:
    raw = tiny_raw(model={"dropout": 0.2}, train={"max_epochs": 4, "checkpoint": {"every_steps": 1000},
                                                  "early_stopping": {"patience": 100}})  # fmt: skip
    cfg = config_from_dict(raw)
    data = prepare_data(cfg.data, cfg.seed, store)
    return cfg.model, cfg.optim, cfg.train, cfg.data.loader, cfg.seed, data, store


@pytest.mark.parametrize(("signum", "raised"), [(signal.SIGTERM, _Cancelled), (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_checkpoints_the_step_then_stops_and_the_rerun_resumes_exactly(
    store, prefect_like_sigterm: None, signum: int, raised: type[BaseException]
) -> None:
    args = _setup(store)
    full = train(*args, "full")
    with pytest.raises(raised):
        train(*args, "stopped", callbacks=[_Signal(step=13, signum=signum)])
    # the signal is sent in step 13's callbacks; the fit stops at the end of a step soon after, with a checkpoint
    [checkpoint] = periodic_checkpoints(store.root / "stopped")
    step = load_checkpoint(checkpoint)["state"]["step"]
    assert 13 <= step < full.steps
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers untouched
    resumed = train(*args, "stopped")
    assert resumed.resumed_from_step == step
    assert resumed.steps == full.steps
    weights = load_checkpoint(store.root / "full" / "model.pt")["model"]
    for name, tensor in load_checkpoint(store.root / "stopped" / "model.pt")["model"].items():
        torch.testing.assert_close(tensor, weights[name], rtol=0, atol=0)


def test_without_a_signal_nothing_changes(store, prefect_like_sigterm: None) -> None:
    before = signal.getsignal(signal.SIGTERM)
    result = train(*_setup(store), "plain")
    assert result.stop_reason == "max_epochs"
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_launch_of_ranks_puts_the_signal_handlers_back(store, prefect_like_sigterm: None) -> None:
    """torch's elastic launcher installs its own SIGTERM/SIGINT handlers; after a launch ours are back, so a
    later cancel still reaches Prefect's handler."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    model, optim, train_cfg, loader, seed, data, _ = _setup(store)
    two_ranks = train_cfg.model_copy(update={"max_epochs": 1, "distributed": train_cfg.distributed.model_copy(
        update={"nproc_per_node": 2, "backend": "gloo", "rdzv_endpoint": "localhost:0"})})  # fmt: skip
    result = train(model, optim, two_ranks, loader, seed, data, store, "ranks")
    assert result.world_size == 2
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
