"""A tiny model trained and evaluated through the real stages, shared by the tests that need one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from trainflow.core.config import Config
from trainflow.core.data.prepared import load_splits
from trainflow.core.evaluate import evaluate
from trainflow.core.models import build_model
from trainflow.core.prepare_data import prepare_data
from trainflow.core.records import EvaluateResult, PrepareDataResult, TrainResult
from trainflow.core.storage.store import LocalStore
from trainflow.core.train import train
from trainflow.core.training.checkpoint import load_checkpoint


@dataclass(frozen=True)
class Trained:
    """A config's prepared data, trained weights and evaluation in one store."""

    config: Config
    store: LocalStore
    data: PrepareDataResult
    trained: TrainResult
    evaluated: EvaluateResult

    def model(self) -> nn.Module:
        """The trained weights in a fresh model, in eval mode."""
        model = build_model(self.config.model, self.data.spec)
        model.load_state_dict(load_checkpoint(self.store.local_path(self.trained.checkpoint_uri))["model"])
        return model.eval()

    def test_split(self) -> tuple[np.ndarray, np.ndarray | None]:
        splits = load_splits(self.store.local_path(self.data.uri), self.data.spec)
        return splits.x["test"], splits.y.get("test")


def train_and_evaluate(root: Path, cfg: Config) -> Trained:
    """prepare_data, train and evaluate `cfg` into a store under `root`."""
    store = LocalStore(root / "artifacts")
    data = prepare_data(cfg.data, cfg.seed, store)
    trained = train(cfg.model, cfg.optim, cfg.train, cfg.data.loader, cfg.seed, data, store, "train")
    evaluated = evaluate(cfg.evaluate, cfg.model, cfg.train, cfg.data.loader, cfg.seed, data, trained, store, "eval")
    return Trained(cfg, store, data, trained, evaluated)
