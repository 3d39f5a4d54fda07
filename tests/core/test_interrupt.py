"""A signal during a fit (a cancelled flow run's SIGTERM, Ctrl-C) leaves a checkpoint, then its exception goes on
as usual; a re-run resumes from it to the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests.conftest import tiny_raw
from trainflow.core.config import config_from_dict
from trainflow.core.prepare_data import prepare_data
from trainflow.core.train import train
from trainflow.core.training.callbacks import Callback
from trainflow.core.training.checkpoint import load_checkpoint, periodic_checkpoints
from trainflow.core.training.spec import TrainingSpec
from trainflow.core.training.trainer import Trainer


class _Signal(Callback):
    """Sends `signum` to this process at the end of step `step` (a real signal, delivered by the OS)."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.step == self.step:
            os.kill(os.getpid(), self.signum)


class _Cancelled(BaseException):
    """Stands for Prefect's TerminationSignal."""


def _prefect_like(signum: int, frame: Any) -> None:
    raise _Cancelled


_prefect_like.__module__ = "prefect.stand_in"  # a handler that must stay installed, as Prefect's must


@pytest.fixture
def handlers() -> Iterator[None]:
    """Python's own SIGINT handler (another test's library may have left its own) and the default SIGTERM."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler), signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGINT, previous[0])
    signal.signal(signal.SIGTERM, previous[1])


def _args(store, at: int = 0, signum: int = 15) -> tuple[Any, ...]:
    raw = tiny_raw(train={"max_epochs": 4, "checkpoint": {"every_steps": 1000}, "early_stopping": {"patience": 100}})
    raw["model"] = {"name": "factory", "factory": "tests.core.factories:signalling_net",
                    "params": {"at": at, "signum": signum}}  # fmt: skip
    cfg = config_from_dict(raw)
    data = prepare_data(cfg.data, cfg.seed, store)
    return TrainingSpec.of(cfg, data), store


def _same_weights(store, key: str, reference: str) -> None:
    weights = load_checkpoint(store.root / reference / "model.pt")["model"]
    for name, tensor in load_checkpoint(store.root / key / "model.pt")["model"].items():
        torch.testing.assert_close(tensor, weights[name], rtol=0, atol=0)


def _step_of_the_only_checkpoint(store, key: str) -> int:
    [checkpoint] = periodic_checkpoints(store.root / key)
    return load_checkpoint(checkpoint)["state"]["step"]


def test_ctrl_c_checkpoints_at_the_end_of_the_step_and_the_rerun_resumes_exactly(store, handlers: None) -> None:
    full = train(*_args(store), "full")
    with pytest.raises(KeyboardInterrupt):
        train(*_args(store), "stopped", callbacks=[_Signal(step=13, signum=signal.SIGINT)])
    # sent in step 13's last callback: noted, and the checkpoint written at the end of the next step
    assert _step_of_the_only_checkpoint(store, "stopped") == 14
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    resumed = train(*_args(store), "stopped")
    assert (resumed.resumed_from_step, resumed.steps) == (14, full.steps)
    _same_weights(store, "stopped", "full")


def test_sigterm_with_the_default_handler_exits_after_its_checkpoint(store, handlers: None) -> None:
    with pytest.raises(SystemExit) as exited:
        train(*_args(store), "stopped", callbacks=[_Signal(step=5, signum=signal.SIGTERM)])
    assert exited.value.code == 128 + signal.SIGTERM
    assert _step_of_the_only_checkpoint(store, "stopped") == 6


def test_a_kept_handler_raising_mid_step_gets_the_previous_steps_checkpoint_with_its_rng(store, handlers: None) -> None:
    """Prefect's handler stays installed and raises inside the 13th forward: the checkpoint is that of step 12,
    dropout's RNG draws of the interrupted step undone, so the resumed run matches the uninterrupted one."""
    signal.signal(signal.SIGTERM, _prefect_like)
    full = train(*_args(store), "full")
    with pytest.raises(_Cancelled):
        train(*_args(store, at=13), "stopped")
    assert signal.getsignal(signal.SIGTERM) is _prefect_like  # never replaced
    assert _step_of_the_only_checkpoint(store, "stopped") == 12
    resumed = train(*_args(store), "stopped")
    assert (resumed.resumed_from_step, resumed.steps) == (12, full.steps)
    _same_weights(store, "stopped", "full")


def test_without_a_signal_nothing_changes(store, handlers: None) -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert train(*_args(store), "plain").stop_reason == "max_epochs"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@pytest.mark.slow
def test_a_launch_of_ranks_puts_the_signal_handlers_back(store, handlers: None) -> None:
    """torch's elastic launcher installs its own SIGTERM/SIGINT handlers; after a launch ours are back, so a
    later cancel still reaches Prefect's handler."""
    signal.signal(signal.SIGTERM, _prefect_like)
    spec, _ = _args(store)
    ranks = {"nproc_per_node": 2, "backend": "gloo", "rdzv_endpoint": "localhost:0"}
    two_ranks = spec.with_values({"train.max_epochs": 1} | {f"train.distributed.{k}": v for k, v in ranks.items()})
    assert train(two_ranks, store, "ranks").world_size == 2
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == (
        _prefect_like, signal.default_int_handler)  # fmt: skip
