"""A tiny model trained and evaluated through the real stages, shared by the tests that need one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from trainflow.core.config import Config
from trainflow.core.data.prepared import load_splits
from trainflow.core.evaluate import evaluate
from trainflow.core.prepare_data import prepare_data
from trainflow.core.records import EvaluateResult, PrepareDataResult, TrainResult
from trainflow.core.storage.store import LocalStore
from trainflow.core.train import train
from trainflow.core.training.checkpoint import trained_model
from trainflow.core.training.spec import TrainingSpec


@dataclass(frozen=True)
class Trained:
    """A config's prepared data, trained weights and evaluation in one store."""

    config: Config
    store: LocalStore
    spec: TrainingSpec
    trained: TrainResult
    evaluated: EvaluateResult

    @property
    def data(self) -> PrepareDataResult:
        return self.spec.data

    def model(self) -> nn.Module:
        """The trained weights in a fresh model, in eval mode."""
        return trained_model(self.spec, self.store, self.trained.checkpoint_uri)

    def test_split(self) -> tuple[np.ndarray, np.ndarray | None]:
        splits = load_splits(self.store, self.data)
        return splits.x["test"], splits.y.get("test")


def train_and_evaluate(root: Path, cfg: Config) -> Trained:
    """prepare_data, train and evaluate `cfg` into a store under `root`."""
    store = LocalStore(root / "artifacts")
    spec = TrainingSpec.of(cfg, prepare_data(cfg.data, cfg.seed, store))
    trained = train(spec, store, "train")
    evaluated = evaluate(spec, cfg.compress.measure, trained, store, "eval")
    return Trained(cfg, store, spec, trained, evaluated)
