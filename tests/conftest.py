"""Shared fixtures: tiny real data and configs that train in about a second on 2 CPU cores."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from trainflow.core.config import Config, config_from_dict
from trainflow.core.storage.store import LocalStore

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test inside an empty temporary folder (relative paths such as ./artifacts land there)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "artifacts")


def tiny_raw(**sections: Any) -> dict[str, Any]:
    """A config mapping for a seconds-long run: wine (178 rows, 13 features) and a small MLP."""
    raw: dict[str, Any] = {
        "seed": 0,
        "data": {"source": "sklearn", "name": "wine"},
        "model": {"name": "mlp", "hidden_sizes": [32], "dropout": 0.0},
        "optim": {"lr": 0.01},
        "train": {"max_epochs": 6, "batch_size": 16, "progress_bar": False, "log_every_steps": 5},
        "compress": {  # every technique on, each kept short
            "measure": {"latency_calls": 20, "warmup": 2, "rounds": 2, "serving_batch": 32, "throughput_calls": 2},
            "structured_pruning": {"finetune_epochs": 1},
            "distillation": {"max_epochs": 2},
        },
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values} if isinstance(values, dict) else values
    return raw


@pytest.fixture
def tiny_config() -> Config:
    return config_from_dict(tiny_raw())


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One Prefect test server for the whole session (it takes ~18 s to start)."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    # The harness does not isolate default result storage; our stages set theirs, other tasks must not leak.
    settings = {PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path_factory.mktemp("prefect-results")}
    with temporary_settings(settings), prefect_test_harness(server_startup_timeout=120):
        yield
