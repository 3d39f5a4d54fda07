"""The stage cache covers the code that computes a stage's result: the user's own `model.factory` module (edited,
it trains again and the published weights change shape), and each run parses and preflights its config once."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import trainflow.core.preflight
from tests.conftest import tiny_raw
from trainflow.core.preflight import check_and_hand_over
from trainflow.flows.pipeline import training_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

FACTORY = '''
import math
from torch import nn


def build(spec, hidden=16):
    """The user's own model: an MLP whose width lives in this file."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(spec.input_shape), hidden), nn.ReLU(),
                         nn.Linear(hidden, spec.n_classes))
'''


def _config(root: Path) -> Path:
    raw = tiny_raw(compress={"enabled": False}, publish={"log_mlflow_model": False}, train={"max_epochs": 2})
    raw["model"] = {"name": "factory", "factory": "userfactory:build"}
    raw |= {"tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "code"},
            "store": {"uri": str(root / "artifacts")}}  # fmt: skip
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cached(summary: dict[str, Any]) -> dict[str, bool]:
    return {name: stage["cached"] for name, stage in summary["stages"].items()}


def _published_shapes(summary: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    weights = Path(summary["stages"]["publish"]["objects"][0]["uri"].removeprefix("file://"))
    assert weights.name == "model.pt"
    return {name: tuple(t.shape) for name, t in torch.load(weights, weights_only=True)["model"].items()}


def test_editing_the_model_factory_trains_again_and_publishes_the_new_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "userfactory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(code))  # the user's PYTHONPATH
    monkeypatch.delitem(sys.modules, "userfactory", raising=False)
    config = str(_config(tmp_path))

    first = training_pipeline(config, [], str(tmp_path / "out"))
    assert not any(_cached(first).values())
    assert _published_shapes(first)["1.weight"] == (16, 13)
    again = training_pipeline(config, [], str(tmp_path / "out"))
    assert all(_cached(again).values()), "nothing changed: every stage cached"

    (code / "userfactory.py").write_text(FACTORY.replace("hidden=16", "hidden=160") + "\n# wider\n")
    edited = training_pipeline(config, [], str(tmp_path / "out"))
    assert _cached(edited) == {"prepare_data": True, "train": False, "evaluate": False, "publish": False}
    assert _published_shapes(edited)["1.weight"] == (160, 13), "the edited factory's model is the one published"
    assert edited["stages"]["train"]["n_parameters"] > first["stages"]["train"]["n_parameters"]

    (code / "userfactory.py").write_text(FACTORY.replace("hidden=16", "hidden=160") + "\n# wider, commented\n")
    assert all(_cached(training_pipeline(config, [], str(tmp_path / "out"))).values()), "a comment changes nothing"


def test_a_run_parses_and_preflights_its_config_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`trainflow run` checks the config before Prefect starts and hands it to the flow; a served run (nothing
    handed over) checks it in the flow, once."""
    calls = {"load_config": 0, "preflight": 0}
    for name in calls:
        real = getattr(trainflow.core.preflight, name)

        def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(trainflow.core.preflight, name, counted)
    raw = tiny_raw(compress={"enabled": False}, publish={"log_mlflow_model": False}, train={"max_epochs": 1})
    raw |= {"tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, "store": {"uri": str(tmp_path / "a")}}
    config = tmp_path / "once.yaml"
    config.write_text(yaml.safe_dump(raw))

    check_and_hand_over(config, [])  # what the CLI does before Prefect boots
    training_pipeline(str(config), [], str(tmp_path / "out"))
    assert calls == {"load_config": 1, "preflight": 1}
    training_pipeline(str(config), [], str(tmp_path / "out"))  # a served run: nothing handed over
    assert calls == {"load_config": 2, "preflight": 2}
